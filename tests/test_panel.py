"""GenerationPanel without a browser: ipywidgets run on a dummy comm when there is no kernel, so buttons are
clicked with `Button.click()` and the worker thread is joined with a timeout."""

from __future__ import annotations

import html
import threading
from typing import Any

import pytest

import cascade_lab
from cascade_lab import Sampler, hookimpl
from cascade_lab.api import Cascade
from cascade_lab.notebook.options import parse_cell
from cascade_lab.notebook.panel import GenerationPanel, cascade_cell
from cascade_lab.notebook.session import Defaults, Session

TINY: dict[str, Any] = {"width": 128, "height": 128, "steps_c": 2, "steps_b": 2, "seed": 3}
TIMEOUT = 120  # seconds for one tiny job on a busy 2-core machine


@pytest.fixture(scope="module")
def tiny() -> Cascade:
    cascade = Cascade("tiny")
    cascade.pipeline  # build the tiny models once for the module  # noqa: B018
    return cascade


@pytest.fixture
def session(tiny: Cascade) -> Session:
    s = Session(Defaults(variant="tiny", preview_interval=0.0))
    s.use(tiny)
    return s


@pytest.fixture
def panel(session: Session):  # type: ignore[no-untyped-def]
    p = GenerationPanel("tiny", prompt="a red circle", session=session, **TINY)
    yield p
    p.cancel()
    p.wait(TIMEOUT)


def test_the_widget_layer_runs_on_a_dummy_comm(panel: GenerationPanel) -> None:
    assert type(panel.generate_button.comm).__name__ == "DummyComm"
    bundle = panel._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id


def test_clicking_generate_produces_a_result(panel: GenerationPanel, session: Session) -> None:
    panel.generate_button.click()
    assert panel.running and panel.generate_button.disabled and not panel.cancel_button.disabled
    result = panel.wait(TIMEOUT)
    assert panel.error is None, panel.error_box.value
    assert result is not None and result.images[0].size == (128, 128)
    assert result.params.seed == 3 and result.params.steps_c == 2 and result.params.prompt == "a red circle"
    assert session.results[-1] is result and panel.results == [result]
    assert panel.progress.value == panel.progress.max == 4 and panel.progress.bar_style == "success"
    assert "done" in panel.status.value and "seed 3" in panel.status.value
    assert panel.preview.value[:8] == b"\x89PNG\r\n\x1a\n"  # the final image replaces the live previews
    assert len(panel.gallery.children) == 1
    assert not panel.generate_button.disabled and panel.cancel_button.disabled


def test_live_preview_shows_stage_c_while_running(panel: GenerationPanel) -> None:
    seen: list[tuple[str, int]] = []
    panel.preview.observe(lambda change: seen.append((panel.preview.format, len(change["new"]))), "value")
    panel.generate()
    panel.wait(TIMEOUT)
    assert [fmt for fmt, _ in seen[:-1]] == ["jpeg", "jpeg"]  # one per Stage C step (interval 0), then the PNG
    assert all(size > 0 for _, size in seen)


def test_cancel_from_the_progress_callback_stops_within_one_step(panel: GenerationPanel) -> None:
    panel.stage["c"]["steps"].value = 30
    steps: list[int] = []

    def on_progress(change: dict[str, int]) -> None:  # runs in the worker thread, inside the step callback
        steps.append(change["new"])
        if change["new"] == 2:
            panel.cancel()

    panel.progress.observe(on_progress, "value")
    panel.generate()
    assert panel.wait(TIMEOUT) is None
    assert max(steps) <= 3, steps  # cancelled after step 2: at most the step under way finishes
    assert "cancelled" in panel.status.value and panel.progress.bar_style == "warning"
    assert panel.error is None and panel.error_box.value == ""
    assert not panel.generate_button.disabled and panel.cancel_button.disabled


def test_cancel_right_after_start_stops_within_one_step(panel: GenerationPanel) -> None:
    panel.stage["c"]["steps"].value = 30
    panel.generate_button.click()
    panel.cancel_button.click()
    assert panel.wait(TIMEOUT) is None
    assert panel.progress.value <= 1 and "cancelled" in panel.status.value


def test_a_job_can_run_again_after_a_cancel(panel: GenerationPanel) -> None:
    panel.generate()
    panel.cancel()
    panel.wait(TIMEOUT)
    panel.generate()
    assert panel.wait(TIMEOUT) is not None and panel.error is None


class LaterSampler:
    """A plugin defined after the panel was built: DDIM under a new name."""

    @staticmethod
    @hookimpl
    def register_samplers(register):  # type: ignore[no-untyped-def]
        from cascade_lab.diffusion.samplers import sample_ddim

        register(Sampler("panel_test_later", "DDIM under another name (test)", sample_ddim))


def names(dropdown: Any) -> list[str]:
    """The values of a dropdown whose options are (label, value) pairs."""
    return [value for _, value in dropdown.options]


def test_dropdowns_show_a_plugin_registered_later(panel: GenerationPanel) -> None:
    assert "panel_test_later" not in names(panel.stage["c"]["sampler"])
    cascade_lab.register_plugin(LaterSampler, name="panel_test_later_plugin")
    try:
        panel._repr_mimebundle_()  # displaying the panel again refreshes the lists
        for stage in ("c", "b"):
            assert "panel_test_later" in names(panel.stage[stage]["sampler"])
        cascade_lab.unregister_plugin("panel_test_later_plugin")
        panel.refresh.click()  # so does the refresh button
        assert "panel_test_later" not in names(panel.stage["c"]["sampler"])
        cascade_lab.register_plugin(LaterSampler, name="panel_test_later_plugin")
        panel.refresh.click()
        panel.stage["c"]["sampler"].value = "panel_test_later"
        panel.generate_button.click()
        result = panel.wait(TIMEOUT)
        assert result is not None and result.params.sampler_c == "panel_test_later", panel.error_box.value
    finally:
        cascade_lab.unregister_plugin("panel_test_later_plugin")
    panel.generate_button.click()  # Generate refreshes too: the gone sampler falls back to a registered one
    assert "panel_test_later" not in names(panel.stage["c"]["sampler"])
    assert panel.stage["c"]["sampler"].value in names(panel.stage["c"]["sampler"])
    panel.wait(TIMEOUT)


def test_an_invalid_size_shows_its_message_in_the_panel(panel: GenerationPanel) -> None:
    panel.width.value = 100
    assert panel.size.value is None  # no preset matches: "custom"
    panel.generate_button.click()
    assert not panel.running and panel.results == []
    assert isinstance(panel.error, ValueError)
    assert "width=100" in panel.error_box.value and "multiple of 8" in panel.error_box.value
    panel.width.value = 128
    panel.generate_button.click()
    assert panel.wait(TIMEOUT) is not None and panel.error_box.value == ""  # the next run clears it


class Broken:
    @staticmethod
    @hookimpl
    def register_samplers(register):  # type: ignore[no-untyped-def]
        def explode(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("the broken sampler exploded")

        register(Sampler("panel_test_broken", "raises (test)", explode))


def test_an_error_inside_the_job_lands_in_the_panel(panel: GenerationPanel) -> None:
    cascade_lab.register_plugin(Broken, name="panel_test_broken_plugin")
    try:
        panel.refresh_options()
        panel.stage["b"]["sampler"].value = "panel_test_broken"
        panel.generate_button.click()
        assert panel.wait(TIMEOUT) is None
    finally:
        cascade_lab.unregister_plugin("panel_test_broken_plugin")
    assert isinstance(panel.error, RuntimeError)
    assert "RuntimeError: the broken sampler exploded" in panel.error_box.value
    assert "Traceback" in panel.error_box.value  # the details are folded under the message
    assert panel.status.value == "failed" and panel.progress.bar_style == "danger"
    assert not panel.generate_button.disabled and panel.cancel_button.disabled


def test_a_busy_session_is_reported_in_the_panel(panel: GenerationPanel, session: Session) -> None:
    with session.job("a %%cascade cell"):
        panel.generate_button.click()
        panel.wait(TIMEOUT)
    assert "already running" in panel.error_box.value and "%%cascade cell" in panel.error_box.value


def test_size_presets_and_seed_controls(panel: GenerationPanel) -> None:
    panel.size.value = (1216, 832)
    assert (panel.width.value, panel.height.value) == (1216, 832)
    panel.height.value = 1024
    panel.width.value = 1024
    assert panel.size.value == (1024, 1024)
    seeds = set()
    for _ in range(3):
        panel.randomise.click()
        seeds.add(panel.seed.value)
    assert len(seeds) == 3
    panel.new_seed_each_run.value = True
    before = panel.seed.value
    panel.width.value = 100  # fail fast: only the seed handling is under test here
    panel.generate()
    assert panel.seed.value != before


def test_a_typed_seed_is_kept_and_large_step_counts_are_not_clamped(panel: GenerationPanel) -> None:
    """Issues 18/20: typing a seed while "new seed each run" is ticked unticks it (the typed seed is used), the
    steps sliders take 1000 steps, and a refused run leaves no old green bar or "done" status beside its error."""
    panel.new_seed_each_run.value = True
    panel.seed.value = 1234
    assert panel.new_seed_each_run.value is False
    panel.randomise.click()  # the dice button draws without unticking anything else
    assert panel.seed.value != 1234
    for stage in ("c", "b"):
        panel.stage[stage]["steps"].value = 1000
        assert panel.stage[stage]["steps"].value == 1000
    assert panel.params().steps_c == 1000
    panel.progress.value, panel.progress.max, panel.progress.bar_style = 5, 5, "success"
    panel.status.value = "done in 0.2 s"
    panel.width.value = 100
    assert panel.generate() is False
    assert (panel.progress.value, panel.progress.bar_style, panel.status.value) == (0, "", "")


def test_copy_as_cascade_cell_round_trips_through_the_magic_parser(panel: GenerationPanel) -> None:
    panel.negative.value = "blurry\nlow quality"
    panel.stage["b"]["shift"].value = 1.5
    panel.stage["c"]["sampler"].value = "ddim"
    panel.generate_button.click()
    result = panel.wait(TIMEOUT)
    assert result is not None
    item = panel.gallery.children[0]
    copy_button = item.children[-1].children[1].children[0]
    assert panel.copy_area.layout.display == "none"
    copy_button.click()
    text = panel.copy_area.value
    assert panel.copy_area.layout.display is None and text == cascade_cell(result.params)
    assert panel.status.value.startswith("done")  # copying keeps the status of the job
    line, body = text.split("\n", 1)
    assert line.startswith("%%cascade ")
    request = parse_cell(line[len("%%cascade "):], body + "\n", {})  # IPython ends a cell body with a newline
    p = result.params
    assert request.prompt == p.prompt and request.negative_prompt == p.negative_prompt
    for name in ("seed", "width", "height", "variant", "steps_c", "steps_b", "cfg_c", "cfg_b", "shift_b",
                 "sampler_c", "sampler_b", "scheduler_c", "scheduler_b"):
        assert request.options[name] == getattr(p, name), name


def test_inspect_button_shows_a_latent_inspector(panel: GenerationPanel) -> None:
    panel.generate()
    panel.wait(TIMEOUT)
    inspect_button = panel.gallery.children[0].children[-1].children[1].children[1]
    inspect_button.click()
    (shown,) = panel.inspector_box.children
    assert len(shown.children[0].children) == 5  # the inspector's tabs


def test_jobs_run_off_the_calling_thread(panel: GenerationPanel) -> None:
    threads: set[str] = set()
    panel.progress.observe(lambda _: threads.add(threading.current_thread().name), "value")
    panel.generate()
    panel.wait(TIMEOUT)
    assert threads == {"cascade_lab-panel"}


def test_the_form_starts_from_the_session_defaults(session: Session) -> None:
    session.configure(width=256, height=128, steps_c=5, steps_b=3, cfg_c=2.5, sampler="ddim", scheduler="karras")
    panel = GenerationPanel(session=session)
    assert panel.variant.value == "tiny" and (panel.width.value, panel.height.value) == (256, 128)
    assert panel.stage["c"]["steps"].value == 5 and panel.stage["b"]["steps"].value == 3
    assert panel.stage["c"]["cfg"].value == 2.5
    assert {panel.stage[s][k].value for s in "cb" for k in ("sampler",)} == {"ddim"}
    assert panel.stage["b"]["scheduler"].value == "karras"
    assert GenerationPanel(session=session, steps_c=7).stage["c"]["steps"].value == 7  # explicit beats defaults


def test_the_gallery_keeps_the_newest_results(session: Session) -> None:
    panel = GenerationPanel("tiny", prompt="x", session=session, keep_results=2, **TINY)
    seeds = []
    for seed in (1, 2, 3):
        panel.seed.value = seed
        panel.generate()
        seeds.append(panel.wait(TIMEOUT).params.seed)
    assert seeds == [1, 2, 3] and [r.params.seed for r in panel.results] == [2, 3]
    assert len(panel.gallery.children) == 2
    assert "seed 3" in panel.gallery.children[0].children[-1].children[0].value  # newest first


def test_compat_switch_denoise_and_family_labels(panel: GenerationPanel) -> None:
    """Issue 15: the ComfyUI mode from the panel, its defaults, and the copied cell that replays it."""
    sampler = panel.stage["c"]["sampler"]
    labels = dict((value, label) for label, value in sampler.options)
    assert labels["ddpm"] == "ddpm (official)" and labels["uni_pc"] == "uni_pc (comfyui)"
    assert labels["comfyui.euler_ancestral"] == "comfyui.euler_ancestral (comfyui)"
    panel.compat.value = "comfyui"  # official defaults are swapped for ComfyUI's
    assert [panel.stage[s][k].value for s in "cb" for k in ("sampler", "scheduler")] == \
        ["euler_ancestral", "simple"] * 2
    panel.stage["b"]["sampler"].value = "dpmpp_2m_sde"
    panel.denoise.value = 0.75
    params = panel.params()
    assert (params.compat, params.compression, params.cfg_rho, params.denoise) == ("comfyui", 42.0, 0.0, 0.75)
    cell = cascade_cell(params)
    assert "--compat comfyui" in cell and "--denoise 0.75" in cell and "--sampler-b dpmpp_2m_sde" in cell
    request = parse_cell(cell.split("\n", 1)[0].removeprefix("%%cascade "), cell.split("\n", 1)[1] + "\n", {})
    assert request.options["compat"] == "comfyui" and request.options["sampler_b"] == "dpmpp_2m_sde"
    panel.generate_button.click()
    result = panel.wait(TIMEOUT)
    assert result is not None and result.params.compat == "comfyui", panel.error_box.value
    assert result.params.sampler_b == "dpmpp_2m_sde" and result.params.denoise == 0.75
    panel.compat.value = "official"  # back: the ComfyUI defaults still in place go back to the official ones
    assert panel.stage["c"]["sampler"].value == "ddpm" and panel.stage["b"]["sampler"].value == "dpmpp_2m_sde"


# -- ControlNet section (issue 16, part 4) ----------------------------------------------------------------------
def square_png(path: Any, size: int = 128) -> Any:
    from PIL import Image

    image = Image.new("RGB", (size, size), "black")
    image.paste((255, 255, 255), (32, 32, 96, 96))
    image.save(path)
    return path


def upload_value(path: Any) -> tuple[dict[str, Any], ...]:
    """What a browser upload of ``path`` puts in a `FileUpload`'s value."""
    import datetime

    data = path.read_bytes()
    return ({"name": path.name, "type": "image/png", "size": len(data), "content": memoryview(data),
             "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def preview_pixels(panel: GenerationPanel) -> list[Any]:
    import io

    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(item.children[1].value))) for item in panel.control.preview.children]


def test_the_control_section_previews_what_the_controlnet_sees(panel: GenerationPanel, tmp_path: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import torch

    from cascade_lab.controls import filters

    section = panel.control
    assert section.widget.selected_index is None and section.widget.titles == ("ControlNet: off",)  # collapsed
    assert section.preview.children == () and section.control() is None  # no image: no ControlNet
    path = square_png(tmp_path / "square.png")
    image = torch.zeros(1, 3, 128, 128)
    image[..., 32:96, 32:96] = 1.0
    section.image_path.value = str(path)
    assert section.widget.titles == ("ControlNet: canny, strength 1",)
    [edges] = preview_pixels(panel)
    assert np.array_equal(edges, filters.canny(image).mul(255).round().byte()[0, 0].numpy())
    assert section.mask_box.layout.display == "none"

    section.kind.value = "inpainting"
    assert section.mask_box.layout.display is None and "needs a mask" in section.message.value
    section.mask_text.value = "40,40,88,88"
    painted, mask = preview_pixels(panel)
    assert (mask[40:88, 40:88] == 255).all() and mask.sum() == 255 * 48 * 48
    assert (painted[40:88, 40:88] == 255).all() and (painted[0:8, 0:8] == 0).all()
    section.grow.value = 4
    assert preview_pixels(panel)[1].sum() == 255 * 56 * 56  # grown by 4 px on every side
    section.mask_text.value = "0,0,128,128"
    assert "covers the whole image" in section.message.value and section.preview.children == ()

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the preview ran the EfficientNet")

    monkeypatch.setattr(filters, "super_resolution", no_model)
    section.kind.value = "super_resolution"  # the low-res input at half the generation size, no features
    section.image_path.value = str(square_png(tmp_path / "small.png", 64))
    [low] = preview_pixels(panel)
    assert low.shape == (64, 64, 3) and section.message.value == ""  # 128 px from a 64 px image: as official
    panel.width.value = 256  # the preview follows the generation size
    assert preview_pixels(panel)[0].shape == (64, 128, 3)
    assert "is stretched to the generation" in section.message.value and "128x64" in section.message.value
    assert "the official recipe makes 128x128 from this 64x64 image" in section.message.value
    assert "b00020" not in section.message.value
    section.clear.click()
    assert not section.active and section.preview.children == () and section.widget.titles == ("ControlNet: off",)


def tiny_controlnet(c_in: int) -> Any:
    import torch

    from cascade_lab.models.controlnet import ControlNet

    torch.manual_seed(c_in)
    net = ControlNet(c_in=c_in, c_proj=32, proj_blocks=[0, 5], bottleneck_mode="simple").eval()
    for p in net.parameters():  # random projections: the control visibly moves the result
        torch.nn.init.normal_(p, std=0.2)
    return net


def test_generate_applies_the_uploaded_control_and_copies_its_flags(panel: GenerationPanel, tiny: Cascade,
                                                                    tmp_path: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    net = tiny_controlnet(1)
    monkeypatch.setattr(tiny, "_controlnet", lambda control: seen.append(control) or net)  # no file to look for
    panel.generate()
    plain = panel.wait(TIMEOUT)
    section = panel.control
    section.upload_folder = tmp_path / "uploads"
    section.image_upload.value = upload_value(square_png(tmp_path / "square.png"))
    section.strength.value, section.steps.value = 0.8, (0.0, 0.5)
    panel.generate_button.click()
    result = panel.wait(TIMEOUT)
    assert result is not None and panel.error is None, panel.error_box.value
    [control] = seen
    assert (control.kind, control.strength, control.start, control.end) == ("canny", 0.8, 0.0, 0.5)
    [(kind, image, strength, start, end, mask, model, grow, feather)] = result.params.controls
    assert (kind, strength, start, end, mask, model, grow, feather) == ("canny", 0.8, 0.0, 0.5, "", "", 0, 0)
    assert image == control.image and image.startswith(str(tmp_path / "uploads" / "control_"))  # the upload, saved
    assert result.control_images[0].shape == (1, 1, 128, 128)
    assert not torch_equal(plain.latent_c, result.latent_c)
    assert "ControlNet canny, strength 0.8, steps 0–0.5" in panel.gallery.children[0].children[-1].children[0].value

    text = panel.copy_cell(result)
    assert f"--control canny:{image}:0.8" in text and "--controlnet" not in text
    assert "no flag for its steps 0–0.5" in panel.status.value
    line, body = text.split("\n", 1)
    request = parse_cell(line.removeprefix("%%cascade "), body + "\n", {})
    [parsed] = request.options["controls"]
    assert (parsed.kind, parsed.image, parsed.strength) == ("canny", image, 0.8)


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_inpainting_mask_boxes_grow_and_controlnet_file_in_the_copied_cell(tmp_path: Any) -> None:
    from cascade_lab.params import GenerationParams

    image, mask, net = (str(square_png(tmp_path / name)) for name in ("in put.png", "mask.png", "inpainting.png"))
    params = GenerationParams("x", width=128, height=128, seed=1, controls=(
        ("inpainting", image, 0.5, 0.0, 1.0, "[(40, 40, 88, 88), (0, 0, 8, 8)]", net),))
    cell = cascade_cell(params)
    assert f"--control 'inpainting:{image}:0.5' --mask '40,40,88,88;0,0,8,8' --controlnet {net}" in cell
    line, body = cell.split("\n", 1)
    [control] = parse_cell(line.removeprefix("%%cascade "), body + "\n", {}).options["controls"]
    assert (control.kind, control.image, control.strength, control.model) == ("inpainting", image, 0.5, net)
    assert control.mask == [(40, 40, 88, 88), (0, 0, 8, 8)]
    params = params.replace(controls=(("inpainting", image, 1.0, 0.0, 1.0, mask, "", 0, 0),))
    assert f"--control 'inpainting:{image}:1' --mask {mask}" in cascade_cell(params)


def test_a_grown_mask_is_saved_and_named_in_the_job(panel: GenerationPanel, tmp_path: Any) -> None:
    import numpy as np
    from PIL import Image

    section = panel.control
    section.upload_folder = tmp_path / "uploads"
    section.kind.value = "inpainting"
    section.image_path.value = str(square_png(tmp_path / "square.png"))
    section.mask_text.value = "40,40,88,88"
    assert section.job_control().mask == [(40, 40, 88, 88)]  # boxes stay boxes (the cell writes them back)
    section.grow.value = -8
    control = section.job_control()
    assert control.mask.startswith(str(tmp_path / "uploads" / "mask_"))
    assert np.asarray(Image.open(control.mask)).sum() == 255 * 32 * 32  # eroded by 8 px on every side


@pytest.mark.parametrize(("setup", "words"), [
    ({"image_path": "missing.png"}, "ControlNet image 'missing.png': file not found"),
    ({"kind": "inpainting"}, "needs a mask"),
    ({"kind": "inpainting", "mask_text": "50,50,40,40"}, "needs x0 < x1"),
    ({"controlnet": "nowhere.safetensors"}, "ControlNet file 'nowhere.safetensors': file not found"),
    ({"steps": (0.5, 0.5)}, "start=0.5, end=0.5"),
])
def test_control_mistakes_show_in_the_panel_before_any_model_runs(panel: GenerationPanel, tmp_path: Any,
                                                                  setup: dict[str, Any], words: str) -> None:
    section = panel.control
    section.image_path.value = str(square_png(tmp_path / "square.png"))
    for name, value in setup.items():
        getattr(section, name).value = value
    assert panel.generate() is False and panel._thread is None  # refused before a job (or a model) starts
    assert isinstance(panel.error, ValueError) and html.escape(words) in panel.error_box.value
    assert "color:#b00020" in panel.error_box.value and "<details>" not in panel.error_box.value  # one red line
