"""`LatentInspector`: look inside a `Result` — Stage C / Stage B channels, statistics, trajectory, step change,
and what its ControlNets saw.

The figure builders are pure functions (tensors or a result in, a `matplotlib.figure.Figure` out) built on
`Figure` directly, never pyplot: no global state, no GUI backend, safe in worker threads and tests (Agg
renders them). The widget class only turns those figures into PNG images and wires a step slider.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

Preview = Callable[[Any], Any]  # Stage C latent [B, 16, h, w] → RGB [B, 3, H, W] in [0, 1] (`Cascade.preview`)


@dataclass(frozen=True)
class ChannelStats:
    channel: int
    mean: float
    std: float  # torch's default (unbiased) standard deviation
    min: float
    max: float


def channel_stats(latent: Any, index: int = 0) -> list[ChannelStats]:
    """Mean, std, min and max of every channel of image ``index`` of a latent [B, C, h, w]."""
    x = latent[index].float()  # [C, h, w]
    return [ChannelStats(c, float(x[c].mean()), float(x[c].std()), float(x[c].min()), float(x[c].max()))
            for c in range(x.shape[0])]


def step_changes(trajectory: Sequence[Any], index: int = 0) -> list[float]:
    """‖x0[i] − x0[i−1]‖ (L2 over all values of image ``index``) for i = 1 … N−1: how much each step moved x0."""
    return [float((trajectory[i][index].float() - trajectory[i - 1][index].float()).norm())
            for i in range(1, len(trajectory))]


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns) for n panels: one row up to 4, else as square as possible (16 → 4 × 4)."""
    columns = n if n <= 4 else math.ceil(math.sqrt(n))
    return math.ceil(n / columns), columns


def channels_figure(latent: Any, *, index: int = 0, title: str = "", shared_scale: bool = True) -> Figure:
    """One image per channel of a latent [B, C, h, w] (C axes, plus a colour bar when the scale is shared)."""
    x = latent[index].float().cpu()  # [C, h, w]
    n = x.shape[0]
    rows, columns = _grid(n)
    fig = Figure(figsize=(1.8 * columns + (0.6 if shared_scale else 0), 1.8 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    vmax = float(x.abs().max()) or 1.0
    image = None
    for c, ax in enumerate(axes.flat):
        if c >= n:
            fig.delaxes(ax)
            continue
        image = ax.imshow(x[c].numpy(), cmap="RdBu_r", vmin=-vmax if shared_scale else None,
                          vmax=vmax if shared_scale else None, interpolation="nearest")
        ax.set_title(f"ch {c}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    if shared_scale and image is not None:
        fig.colorbar(image, ax=[ax for ax in axes.flat if ax.figure is fig], shrink=0.8)
    fig.suptitle(title or f"{n} channels, {x.shape[1]}×{x.shape[2]} (image {index})")
    return fig


def histograms_figure(latent: Any, *, index: int = 0, bins: int = 40, title: str = "") -> Figure:
    """A histogram per channel (C axes), each titled with its mean and std."""
    x = latent[index].float().cpu()
    stats = channel_stats(latent, index)
    rows, columns = _grid(x.shape[0])
    fig = Figure(figsize=(2.2 * columns, 1.7 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for c, ax in enumerate(axes.flat):
        if c >= x.shape[0]:
            fig.delaxes(ax)
            continue
        counts, edges = np.histogram(x[c].flatten().numpy(), bins=bins)
        ax.stairs(counts, edges, fill=True, color="tab:blue")  # one artist per channel, not one per bin
        ax.set_title(f"ch {c}: μ {stats[c].mean:.2f} σ {stats[c].std:.2f}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.locator_params(axis="both", nbins=3)  # few ticks: readable when the figure is shown at 600 px
    fig.suptitle(title or f"value histograms per channel (image {index})")
    return fig


def latent_rgb(latent: Any) -> Any:
    """A previewer-free look at a latent: channels 0–2, each min–max scaled, as RGB [B, 3, h, w]."""
    x = latent[:, :3].float()
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-8)


def trajectory_figure(trajectory: Sequence[Any], step: int, preview: Preview | None = None, *,
                      index: int = 0) -> Figure:
    """Step ``step`` of a Stage C trajectory: its predicted clean latent through the Previewer (left, or channels
    0–2 without one) and the step-change curve with this step marked (right). Two axes."""
    if not 0 <= step < len(trajectory):
        raise ValueError(f"step={step}: the trajectory has {len(trajectory)} steps (0 … {len(trajectory) - 1})")
    x0 = trajectory[step][index:index + 1]
    rgb = preview(x0) if preview is not None else latent_rgb(x0)  # [1, 3, H, W]
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.4])
    left.imshow(rgb[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    left.set_xticks([]), left.set_yticks([])
    left.set_title("predicted clean latent" + (" (Previewer)" if preview is not None else " (channels 0–2)"),
                   fontsize=9)
    changes = step_changes(trajectory, index)
    right.plot(range(1, len(trajectory)), changes, marker="o", color="tab:gray")
    if step >= 1:
        right.plot([step], [changes[step - 1]], marker="o", markersize=10, color="tab:red")
    right.axvline(step, color="tab:red", alpha=0.4)
    right.set_xlim(-0.5, max(len(trajectory) - 0.5, 1))
    right.set_xlabel("step"), right.set_ylabel("‖x0[i] − x0[i−1]‖")
    fig.suptitle(f"Stage C step {step + 1} of {len(trajectory)}")
    return fig


def result_controls(result: Any) -> list[tuple[str, float, list[tuple[str, Any]]]]:
    """(kind, strength, labelled PIL views) of each ControlNet of a result (`Result.control_images`, the kinds and
    strengths from its params' records); [] for a result without controls."""
    from .control_section import control_views

    images = getattr(result, "control_images", None) or []
    records = getattr(getattr(result, "params", None), "controls", ())
    return [(kind, float(strength), control_views(x, kind))
            for (kind, _, strength, *_), x in zip(records, images, strict=False)]


def controls_figure(result: Any) -> Figure:
    """What each ControlNet of a result saw (edges; painted input and mask; low-res input), one axes per image."""
    panels = [(f"{kind} ×{strength:g}: {label}", image) for kind, strength, views in result_controls(result)
              for label, image in views]
    fig = Figure(figsize=(2.4 * max(len(panels), 1), 2.6), layout="constrained")
    for ax, (title, image) in zip(fig.subplots(1, len(panels), squeeze=False).flat, panels, strict=True):
        ax.imshow(np.asarray(image), cmap="gray" if image.mode == "L" else None, vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("ControlNet inputs")
    return fig


def step_change_figure(result: Any, *, index: int = 0) -> Figure:
    """How far x0 moves per step, Stage C (left) and Stage B (right): two axes."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    for ax, name, trajectory in zip(fig.subplots(1, 2), ("Stage C", "Stage B"),
                                    (result.trajectory_c, result.trajectory_b), strict=True):
        changes = step_changes(trajectory, index)
        if changes:
            ax.plot(range(1, len(trajectory)), changes, marker="o")
            ax.set_yscale("log" if min(changes) > 0 else "linear")
        else:
            ax.text(0.5, 0.5, "needs a trajectory of ≥ 2 steps\n(generate with keep_trajectory=True)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_title(name), ax.set_xlabel("step i"), ax.set_ylabel("‖x0[i] − x0[i−1]‖")
    return fig


def result_figures(result: Any, *, preview: Preview | None = None, step: int | None = None,
                   index: int = 0) -> dict[str, Figure]:
    """Every inspector figure of a result, by file-friendly name (the trajectory at ``step``, default the last)."""
    figures = {
        "stage_c_channels": channels_figure(result.latent_c, index=index, title="Stage C latent"),
        "stage_c_histograms": histograms_figure(result.latent_c, index=index),
        "stage_b_channels": channels_figure(result.latent_b, index=index, title="Stage B latent"),
        "step_change": step_change_figure(result, index=index),
    }
    if result.trajectory_c:
        last = len(result.trajectory_c) - 1
        figures["stage_c_trajectory"] = trajectory_figure(result.trajectory_c, last if step is None else step,
                                                          preview, index=index)
    if result_controls(result):
        figures["controls"] = controls_figure(result)
    return figures


def export_figures(figures: dict[str, Figure], folder: str | Path,
                   formats: Iterable[str] = ("png", "svg"), *, dpi: int = 150) -> list[Path]:
    """Save each figure as ``folder/<name>.<format>``; returns the files written."""
    formats = list(formats)
    unknown = [f for f in formats if f not in ("png", "svg", "pdf")]
    if unknown:
        raise ValueError(f"formats {unknown}: use 'png', 'svg' or 'pdf'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = folder / f"{name}.{fmt}"
            fig.savefig(path, format=fmt, dpi=dpi)
            written.append(path)
    return written


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def stats_html(stats: list[ChannelStats]) -> str:
    rows = "".join(f"<tr><td>{s.channel}</td><td>{s.mean:.4f}</td><td>{s.std:.4f}</td><td>{s.min:.4f}</td>"
                   f"<td>{s.max:.4f}</td></tr>" for s in stats)
    head = "".join(f"<th>{h}</th>" for h in ("channel", "mean", "std", "min", "max"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def session_preview(result: Any, session: Any = None) -> Preview | None:
    """`Cascade.preview` of a cascade of ``result``'s variant already loaded in the session (never loads one)."""
    from .session import get_session

    variant = getattr(getattr(result, "params", None), "variant", None)
    session = session if session is not None else get_session()
    for key in reversed(session.loaded):
        cascade = session.cascade(*key)
        if variant is not None and variant in (key[0], getattr(cascade, "variant_name", None)):
            return cascade.preview  # type: ignore[no-any-return]
    return None


class LatentInspector:
    """Tabs over one result: Stage C channels, statistics + histograms, trajectory (step slider; above it what
    each ControlNet saw, when the result has controls), Stage B channels, step change; and an Export button
    writing every figure as PNG and SVG.

    ``preview`` turns a Stage C latent into RGB (``cascade.preview``); by default the Previewer of a cascade of
    the result's variant loaded in the session, else the trajectory shows channels 0–2. Display it as the
    last expression of a cell.
    """

    def __init__(self, result: Any, *, preview: Preview | None = None, index: int = 0,
                 export_folder: str | Path = "cascade_figures", session: Any = None) -> None:
        if not 0 <= index < result.latent_c.shape[0]:
            raise ValueError(f"index={index}: the result holds {result.latent_c.shape[0]} image(s)")
        preview = preview if preview is not None else session_preview(result, session)
        self.result, self.preview, self.index = result, preview, index
        self.stats = channel_stats(result.latent_c, index)
        steps = len(result.trajectory_c)
        self.shown_step = steps - 1
        self.step = widgets.IntSlider(value=max(steps - 1, 0), min=0, max=max(steps - 1, 0), description="step",
                                      continuous_update=False, disabled=steps == 0)
        self.trajectory_image = widgets.Image(format="png")
        self.step.observe(lambda change: self.show_step(change["new"]), "value")
        self.folder = widgets.Text(str(export_folder), description="folder")
        self.export_button = widgets.Button(description="Export PNG + SVG", icon="save",
                                            layout=widgets.Layout(width="auto"))
        self.export_status = widgets.HTML("")
        self.export_button.on_click(lambda _: self._export_clicked())

        # each tab's figure renders when the tab is first shown (a 16-panel figure takes ~1 s on a small CPU)
        self._pending: dict[int, tuple[widgets.Image, Callable[[], Figure]]] = {
            0: (widgets.Image(format="png"), lambda: channels_figure(result.latent_c, index=index,
                                                                     title="Stage C latent")),
            1: (widgets.Image(format="png"), lambda: histograms_figure(result.latent_c, index=index)),
            3: (widgets.Image(format="png"), lambda: channels_figure(result.latent_b, index=index,
                                                                     title="Stage B latent")),
            4: (widgets.Image(format="png"), lambda: step_change_figure(result, index=index)),
        }
        trajectory: Any = (widgets.VBox([self.step, self.trajectory_image]) if steps else
                           widgets.HTML("No trajectory kept: generate with <code>keep_trajectory=True</code>."))
        self.controls = self._controls_row()  # None without controls
        if self.controls is not None:
            trajectory = widgets.VBox([self.controls, trajectory])
        self.tabs = widgets.Tab(children=[
            self._pending[0][0], widgets.VBox([widgets.HTML(stats_html(self.stats)), self._pending[1][0]]),
            trajectory, self._pending[3][0], self._pending[4][0],
        ], titles=("Stage C", "Statistics", "Trajectory", "Stage B", "Step change"))
        self.tabs.observe(lambda change: self.render_tab(change["new"]), "selected_index")
        self.render_tab(self.tabs.selected_index or 0)
        if steps:
            self.show_step(self.shown_step)
        self.widget = widgets.VBox([self.tabs, widgets.HBox([self.folder, self.export_button]), self.export_status])

    def _controls_row(self) -> widgets.HBox | None:
        """Small images of what each ControlNet saw, labelled with its kind and strength."""
        from .control_section import thumbnail_png

        controls = result_controls(self.result)
        if not controls:
            return None
        items = [widgets.VBox([widgets.HTML(f"<small><b>{html.escape(kind)}</b>, strength {strength:g}: "
                                            f"{html.escape(label)}</small>"),
                               widgets.Image(value=thumbnail_png(image, 128), format="png")])
                 for kind, strength, views in controls for label, image in views]
        return widgets.HBox(items)

    def render_tab(self, tab: int) -> None:
        """Draw tab ``tab``'s figure if it has not been drawn yet (what selecting the tab calls)."""
        if tab in self._pending:
            image, build = self._pending.pop(tab)
            image.value = figure_png(build())

    def show_step(self, step: int) -> None:
        """Show trajectory step ``step`` (what the slider calls)."""
        try:
            fig = trajectory_figure(self.result.trajectory_c, step, self.preview, index=self.index)
        except ValueError:
            if self.preview is None or not 0 <= step < len(self.result.trajectory_c):
                raise
            self.preview = None  # a variant without a previewer: show channels 0–2 instead
            fig = trajectory_figure(self.result.trajectory_c, step, None, index=self.index)
        self.trajectory_image.value = figure_png(fig)
        self.shown_step = step
        if self.step.value != step:
            self.step.value = step

    def figures(self) -> dict[str, Figure]:
        """Every figure as currently shown (the trajectory at the slider's step)."""
        return result_figures(self.result, preview=self.preview, step=self.shown_step if self.result.trajectory_c
                              else None, index=self.index)

    def export(self, folder: str | Path | None = None, formats: Iterable[str] = ("png", "svg")) -> list[Path]:
        """Write every figure to ``folder`` (default: the folder box) as ``<name>.png`` / ``.svg``."""
        return export_figures(self.figures(), folder if folder is not None else self.folder.value, formats)

    def _export_clicked(self) -> None:
        try:
            written = self.export()
        except Exception as exc:  # shown next to the button, not lost in a log
            message = html.escape(f"{type(exc).__name__}: {exc}")
            self.export_status.value = f'<span style="color:#b00020">{message}</span>'
        else:
            self.export_status.value = html.escape(f"wrote {len(written)} files to {Path(self.folder.value).resolve()}")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
