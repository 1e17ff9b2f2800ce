"""Latent inspector: pure figure builders on known tensors, statistics against torch, the step slider and export."""

from __future__ import annotations

import io
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from cascade_lab.notebook.inspector import (
    LatentInspector,
    channel_stats,
    channels_figure,
    export_figures,
    figure_png,
    histograms_figure,
    latent_rgb,
    result_figures,
    step_change_figure,
    step_changes,
    trajectory_figure,
)

matplotlib.use("Agg")  # the builders never touch pyplot; this only keeps any stray pyplot use headless


def fake_result(steps_c: int = 4, steps_b: int = 3, batch: int = 1) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    trajectory_c = [torch.randn(batch, 16, 3, 4, generator=g) * (i + 1) for i in range(steps_c)]
    trajectory_b = [torch.randn(batch, 4, 16, 12, generator=g) for _ in range(steps_b)]
    return SimpleNamespace(latent_c=trajectory_c[-1] if steps_c else torch.randn(batch, 16, 3, 4, generator=g),
                           latent_b=trajectory_b[-1] if steps_b else torch.randn(batch, 4, 16, 12, generator=g),
                           trajectory_c=trajectory_c, trajectory_b=trajectory_b)


def fake_preview(latent: torch.Tensor) -> torch.Tensor:
    """A stand-in Previewer: [B, 16, h, w] → [B, 3, 8h, 8w] in [0, 1]."""
    rgb = latent_rgb(latent)
    return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")


def test_channel_stats_equal_torch() -> None:
    result = fake_result(batch=2)
    for index in (0, 1):
        stats = channel_stats(result.latent_c, index)
        assert [s.channel for s in stats] == list(range(16))
        for s in stats:
            x = result.latent_c[index, s.channel]
            assert (s.mean, s.std, s.min, s.max) == pytest.approx(
                (x.mean().item(), x.std().item(), x.min().item(), x.max().item()), rel=1e-6, abs=1e-7)


def test_step_changes_are_norms_of_successive_x0_differences() -> None:
    result = fake_result(steps_c=5)
    expected = [(result.trajectory_c[i][0] - result.trajectory_c[i - 1][0]).norm().item() for i in range(1, 5)]
    assert step_changes(result.trajectory_c) == pytest.approx(expected)
    assert step_changes(result.trajectory_c[:1]) == []


def test_channel_figures_have_one_axes_per_channel_plus_a_colour_bar() -> None:
    result = fake_result()
    assert len(channels_figure(result.latent_c).axes) == 16 + 1
    assert len(channels_figure(result.latent_c, shared_scale=False).axes) == 16
    fig_b = channels_figure(result.latent_b, title="Stage B latent")
    assert len(fig_b.axes) == 4 + 1 and fig_b.get_suptitle() == "Stage B latent"
    shown = fig_b.axes[2].images[0].get_array()
    assert torch.equal(torch.from_numpy(np.asarray(shown)), result.latent_b[0, 2])


def test_histograms_figure_has_one_axes_per_channel_titled_with_its_stats() -> None:
    result = fake_result()
    fig = histograms_figure(result.latent_c)
    stats = channel_stats(result.latent_c)
    assert len(fig.axes) == 16
    assert fig.axes[5].get_title() == f"ch 5: μ {stats[5].mean:.2f} σ {stats[5].std:.2f}"


def test_trajectory_figure_shows_the_previewed_x0_of_the_chosen_step() -> None:
    result = fake_result(steps_c=4)
    fig = trajectory_figure(result.trajectory_c, 2, fake_preview)
    assert len(fig.axes) == 2
    shown = fig.axes[0].images[0].get_array()
    expected = fake_preview(result.trajectory_c[2][:1])[0].permute(1, 2, 0)
    assert torch.allclose(torch.from_numpy(np.asarray(shown)).float(), expected)
    assert "step 3 of 4" in fig.get_suptitle()
    with pytest.raises(ValueError, match="step=4: the trajectory has 4 steps"):
        trajectory_figure(result.trajectory_c, 4, fake_preview)


def test_step_change_figure_plots_both_stages() -> None:
    result = fake_result(steps_c=4, steps_b=3)
    fig = step_change_figure(result)
    assert [ax.get_title() for ax in fig.axes] == ["Stage C", "Stage B"]
    for ax, trajectory in zip(fig.axes, (result.trajectory_c, result.trajectory_b), strict=True):
        assert np.asarray(ax.lines[0].get_ydata()).tolist() == pytest.approx(step_changes(trajectory))
    empty = step_change_figure(fake_result(steps_c=0, steps_b=0))
    assert "keep_trajectory=True" in empty.axes[0].texts[0].get_text()


def test_export_writes_png_and_svg_of_every_figure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = fake_result()
    figures = result_figures(result, preview=fake_preview)
    assert set(figures) == {"stage_c_channels", "stage_c_histograms", "stage_b_channels", "step_change",
                            "stage_c_trajectory"}
    figures = {name: figures[name] for name in ("stage_b_channels", "step_change")}  # the button test does all
    written = export_figures(figures, tmp_path / "figs", dpi=60)
    assert sorted(p.name for p in written) == ["stage_b_channels.png", "stage_b_channels.svg", "step_change.png",
                                               "step_change.svg"]
    for path in written:
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.format == "PNG" and image.width > 50
        else:
            assert "<svg" in path.read_text()[:2000]
    with pytest.raises(ValueError, match="formats \\['jpg'\\]"):
        export_figures(figures, tmp_path, formats=["jpg"])


def test_inspector_slider_changes_the_shown_step() -> None:
    result = fake_result(steps_c=4)
    inspector = LatentInspector(result, preview=fake_preview)
    assert inspector.step.max == 3 and inspector.shown_step == 3
    last = inspector.trajectory_image.value
    inspector.step.value = 1
    assert inspector.shown_step == 1
    assert inspector.trajectory_image.value != last
    assert inspector.trajectory_image.value == figure_png(trajectory_figure(result.trajectory_c, 1, fake_preview))
    inspector.show_step(3)
    assert inspector.step.value == 3 and inspector.trajectory_image.value == last


def test_inspector_draws_tabs_when_shown_and_lists_the_stats() -> None:
    result = fake_result()
    inspector = LatentInspector(result)
    stage_b_image = inspector.tabs.children[3]
    assert stage_b_image.value == b""  # not drawn until its tab is selected
    inspector.tabs.selected_index = 3
    assert Image.open(io.BytesIO(stage_b_image.value)).format == "PNG"
    table = inspector.tabs.children[1].children[0].value
    assert table.count("<tr>") == 17 and f"{channel_stats(result.latent_c)[0].mean:.4f}" in table


def test_inspector_export_button_writes_files_and_reports(tmp_path) -> None:  # type: ignore[no-untyped-def]
    inspector = LatentInspector(fake_result(steps_c=2, steps_b=2), export_folder=tmp_path / "out")
    inspector.step.value = 0
    inspector.export_button.click()
    assert len(list((tmp_path / "out").glob("*.png"))) == 5 and len(list((tmp_path / "out").glob("*.svg"))) == 5
    assert "wrote 10 files" in inspector.export_status.value
    blocker = tmp_path / "file"
    blocker.write_text("")
    inspector.folder.value = str(blocker / "sub")  # a file where a folder should be
    inspector.export_button.click()
    assert "Error" in inspector.export_status.value and "color:#b00020" in inspector.export_status.value


def test_inspector_without_trajectory_or_previewer() -> None:
    result = fake_result(steps_c=0, steps_b=0)
    inspector = LatentInspector(result)
    assert "keep_trajectory=True" in inspector.tabs.children[2].value
    assert "stage_c_trajectory" not in inspector.figures()

    def no_previewer(latent: torch.Tensor) -> torch.Tensor:
        raise ValueError("variant 'x' has no previewer")

    inspector = LatentInspector(fake_result(steps_c=3), preview=no_previewer)
    assert inspector.preview is None and inspector.trajectory_image.value  # fell back to channels 0–2
    with pytest.raises(ValueError, match="index=1"):
        LatentInspector(fake_result(), index=1)


def test_inspector_on_a_tiny_generation_uses_the_previewer() -> None:
    from cascade_lab.api import Cascade
    from cascade_lab.notebook.session import Session

    cascade = Cascade("tiny")
    result = cascade.generate("a cat", width=128, height=128, steps_c=3, steps_b=2, seed=0, keep_trajectory=True)
    assert len(result.trajectory_c) == 3 and len(result.trajectory_b) == 2
    session = Session()
    assert LatentInspector(result, session=session).preview is None  # nothing loaded: channels 0–2, no loading
    session.use(cascade)
    inspector = LatentInspector(result, session=session)  # the loaded cascade's Previewer, found by variant
    assert inspector.preview == cascade.preview
    inspector.step.value = 0
    fig = trajectory_figure(result.trajectory_c, 0, cascade.preview)
    expected = cascade.preview(result.trajectory_c[0][:1])[0].permute(1, 2, 0)
    assert torch.allclose(torch.from_numpy(np.asarray(fig.axes[0].images[0].get_array())).float(), expected)
    assert inspector.trajectory_image.value == figure_png(fig)


def square_image(size: int = 128) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[..., 32:96, 32:96] = 1.0
    return image


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def test_inspector_shows_each_control_image_labelled_with_kind_and_strength() -> None:
    result = fake_result()
    edges = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    edges[..., 8, :] = 255
    painted = torch.full((1, 4, 32, 32), 40, dtype=torch.uint8)
    painted[:, 3] = 0
    painted[:, :, 4:12, 4:12] = 255  # white where the mask (channel 3) is 1
    result.control_images = [edges, painted]
    result.params = SimpleNamespace(variant="tiny", controls=(("canny", "e.png", 0.8, 0.0, 0.5, "", "", 0, 0),
                                                              ("inpainting", "p.png", 1.0, 0.0, 1.0, "[]", "")))
    inspector = LatentInspector(result, preview=fake_preview)
    row = inspector.controls
    assert row is not None and inspector.tabs.children[2].children[0] is row  # in the trajectory tab, above it
    labels = [item.children[0].value for item in row.children]
    assert len(labels) == 3 and "<b>canny</b>, strength 0.8: edges" in labels[0]
    assert "<b>inpainting</b>, strength 1: input" in labels[1] and labels[2].endswith("mask</small>")
    shown = [png_pixels(item.children[1].value) for item in row.children]
    assert np.array_equal(shown[0], edges[0, 0].numpy())
    assert np.array_equal(shown[1], painted[0, :3].permute(1, 2, 0).numpy())
    assert np.array_equal(shown[2], painted[0, 3].numpy())
    fig = inspector.figures()["controls"]
    assert [ax.get_title() for ax in fig.axes] == ["canny ×0.8: edges", "inpainting ×1: input", "inpainting ×1: mask"]

    plain = LatentInspector(fake_result(), preview=fake_preview)  # no controls: nothing extra
    assert plain.controls is None and plain.tabs.children[2].children[0] is plain.step
    assert "controls" not in plain.figures()


def test_a_generation_keeps_what_each_controlnet_saw() -> None:
    """`Result.control_images`: the canny edges and the inpainting input (painted RGB + mask) at the generation size,
    as uint8, in the order of `params.controls`; the inspector shows them."""
    from cascade_lab.api import Cascade
    from cascade_lab.controls import Control, filters
    from cascade_lab.models.controlnet import ControlNet

    def net(c_in: int) -> ControlNet:
        torch.manual_seed(c_in)
        return ControlNet(c_in=c_in, c_proj=32, proj_blocks=[0, 5], bottleneck_mode="simple").eval()

    image = square_image()
    controls = [Control("canny", image, 0.5, model=net(1)),
                Control("inpainting", image, mask=[(40, 40, 88, 88)], model=net(4))]
    result = Cascade("tiny").generate("x", width=128, height=128, steps_c=2, steps_b=1, seed=0, controls=controls,
                                      keep_trajectory=True)
    edges, painted = result.control_images
    assert edges.dtype == painted.dtype == torch.uint8
    assert edges.shape == (1, 1, 128, 128) and painted.shape == (1, 4, 128, 128)
    assert torch.equal(edges, filters.canny(image).mul(255).round().to(torch.uint8))
    assert painted[0, 3, 40:88, 40:88].eq(255).all() and painted[0, 3].sum() == 255 * 48 * 48
    assert painted[0, :3, 40:88, 40:88].eq(255).all() and painted[0, :3, 0:8, 0:8].eq(0).all()
    inspector = LatentInspector(result)
    assert inspector.controls is not None and len(inspector.controls.children) == 3
