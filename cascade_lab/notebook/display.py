"""What a running job shows: a tqdm bar per stage, a throttled live preview updated in place through one
display handle, then the finished `Result` in that same place as a PNG carrying its parameters."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

from IPython.display import display

from .. import __version__

STAGE_NAMES = {"c": "Stage C", "b": "Stage B"}


def result_bundle(result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data, metadata) to publish: the result's PNG grid and text, plus the parameters and version as
    output metadata, so a saved notebook keeps everything without widget state."""
    data = dict(result._repr_mimebundle_())
    params = json.loads(result.params.to_json())
    data["text/plain"] = f"{data.get('text/plain', repr(result))}\ncascade_lab {__version__}"
    metadata = {"cascade_lab": {"version": __version__, "params": params, "timings": dict(result.timings)}}
    return data, metadata


def caption(result: Any) -> str:
    """One line under the image: what made it (the PNG itself carries the full parameters)."""
    p = result.params
    seconds = sum(result.timings.values())
    return (f"seed {p.seed} · {p.variant} · {p.width}x{p.height} · C {p.sampler_c}/{p.scheduler_c} {p.steps_c} steps "
            f"cfg {p.cfg_c:g} · B {p.sampler_b}/{p.scheduler_b} {p.steps_b} steps cfg {p.cfg_b:g} · "
            f"{seconds:.1f} s · cascade_lab {__version__}")


def preview_jpeg(rgb: Any, *, min_side: int = 192, quality: int = 85) -> bytes:
    """[B, 3, h, w] RGB in [0, 1] → one small JPEG (a grid for a batch), upscaled to at least ``min_side``."""
    from PIL import Image

    from ..results import grid, to_pil

    picture = grid(to_pil(rgb))
    scale = max(1, -(-min_side // max(1, min(picture.size))))
    if scale > 1:  # tiny latents preview at a few pixels: enlarge without blurring
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def guard_finite(widget: Any, on_error: Callable[[str], Any]) -> None:
    """Keep a float widget finite: NaN or ±inf typed into it (which ipywidgets would send on as JSON it cannot
    encode) puts the last good value back and reports ``"<label>: nan is not a number; kept <value>"``."""
    import math

    last = {"value": widget.value}

    def check(change: dict[str, Any]) -> None:
        new = change["new"]
        if isinstance(new, float) and not math.isfinite(new):
            label = widget.description or "value"
            widget.value = last["value"]
            on_error(f"{label}: {new} is not a number; kept {last['value']:g}")
        else:
            last["value"] = new

    widget.observe(check, "value")


class StageBars:
    """One progress row per stage, shown once in its own output above the preview/result and updated in place.

    With ipywidgets: a label, an `IntProgress` and a rate per row (the widget state a saved notebook keeps ends
    at the last step); without: one text line per stage in a display updated in place (no carriage-return
    streams, which a notebook cannot rewrite once another output follows them). Rows stay when their stage is
    done, at 100 %; a stopped job leaves its row where it stopped, marked.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, min_interval: float = 0.2) -> None:
        self.clock, self.min_interval = clock, min_interval
        self.rows: dict[str, dict[str, Any]] = {}  # stage -> {"done", "total", "start", "widgets"}
        self.handle: Any = None
        self.box: Any = None
        self._drawn_at = -1e9
        try:
            import ipywidgets

            self.widgets: Any = ipywidgets
        except ImportError:  # pragma: no cover - ipywidgets is a dependency; plain IPython still works
            self.widgets = None

    def step(self, stage: str, total: int) -> None:
        row = self.rows.get(stage)
        if row is None:
            row = self.rows[stage] = {"done": 0, "total": total, "start": self.clock(), "widgets": None}
            self._add_row(stage, row)
        row["done"] = min(row["total"], row["done"] + 1)
        now = self.clock()
        if row["done"] >= row["total"] or now - self._drawn_at >= self.min_interval:
            self._draw()

    def _label(self, stage: str, row: dict[str, Any]) -> tuple[str, str]:
        name = STAGE_NAMES.get(stage, stage)
        seconds = self.clock() - row["start"]
        rate = f" · {seconds / max(1, row['done']):.2f} s/step" if row["done"] else ""
        return name, f"{row['done']}/{row['total']}{rate}"

    def _add_row(self, stage: str, row: dict[str, Any]) -> None:
        if self.widgets is not None:
            w = self.widgets
            name, stats = self._label(stage, row)
            bar = w.IntProgress(value=0, min=0, max=row["total"], layout=w.Layout(flex="1 1 auto", max_width="420px"))
            row["widgets"] = (bar, w.HTML(stats))
            line = w.HBox([w.HTML(f"{name}:", layout=w.Layout(width="68px")), bar, row["widgets"][1]])
            if self.box is None:
                self.box = w.VBox([line])
                self.handle = display(self.box, display_id=True)
            else:
                self.box.children = (*self.box.children, line)
        elif self.handle is None:
            from IPython.display import Pretty

            self.handle = display(Pretty(self._text()), display_id=True)

    def _text(self) -> str:
        lines = []
        for stage, row in self.rows.items():
            name, stats = self._label(stage, row)
            filled = round(20 * row["done"] / max(1, row["total"]))
            pct = round(100 * row["done"] / max(1, row["total"]))
            lines.append(f"{name}: {pct:3d}% |{'█' * filled}{' ' * (20 - filled)}| {stats}{row.get('note', '')}")
        return "\n".join(lines)

    def _draw(self) -> None:
        self._drawn_at = self.clock()
        if self.widgets is not None:
            for stage, row in self.rows.items():
                if row["widgets"] is not None:
                    bar, stats = row["widgets"]
                    bar.value = row["done"]
                    stats.value = self._label(stage, row)[1] + row.get("note", "")
        elif self.handle is not None:
            from IPython.display import Pretty

            self.handle.update(Pretty(self._text()))

    def close(self, stopped: str | None = None) -> None:
        """Draw the final state; ``stopped`` ("cancelled", "failed", ...) marks the row that did not finish."""
        for row in self.rows.values():
            if row["done"] < row["total"] and stopped:
                row["note"] = f" · {stopped}"
                if row["widgets"] is not None:
                    row["widgets"][0].bar_style = "danger" if stopped == "failed" else "warning"
            elif row["widgets"] is not None and row["done"] >= row["total"]:
                row["widgets"][0].bar_style = "success"
        if self.rows:
            self._draw()


class LiveProgress:
    """The ``callback`` of one job: progress bars per stage and a live Stage C preview, throttled.

    ``preview`` maps a predicted clean Stage C latent to RGB (`Cascade.preview`); None turns previews off.
    The bars come first, then one output the previews update in place and the result finally replaces.
    """

    def __init__(self, *, preview: Callable[[Any], Any] | None = None, interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.preview, self.interval, self.clock = preview, interval, clock
        self.handle: Any = None  # the display handle the previews and then the result go to
        self.previews = 0
        self.last: tuple[str, int, int] | None = None  # (stage, step, steps) of the last finished step
        self.bars = StageBars(clock)
        self._shown_at: float | None = None
        self._closed = False

    def __call__(self, event: Any) -> None:
        self.last = (event.stage, event.step, event.steps)
        self.bars.step(event.stage, event.steps)
        if event.stage == "c" and self.preview is not None:
            now = self.clock()
            if self._shown_at is None or now - self._shown_at >= self.interval:
                self._shown_at = now
                self._show_preview(event.x0)

    def _show_preview(self, x0: Any) -> None:
        from IPython.display import Image

        try:
            image = Image(data=preview_jpeg(self.preview(x0)), format="jpeg")  # type: ignore[misc]
        except ValueError:  # a variant without a previewer: go on without previews
            self.preview = None
            return
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
        self.previews += 1

    def where(self) -> str:
        """Where the job stopped, for a one-line notice."""
        if self.last is None:
            return "before the first step"
        stage, step, steps = self.last
        return f"after {STAGE_NAMES.get(stage, stage)} step {step + 1}/{steps}"

    def close(self, stopped: str | None = None) -> None:
        if not self._closed:
            self._closed = True
            self.bars.close(stopped)

    def show_result(self, result: Any) -> None:
        """Replace the preview with the result (or show it below the bars, when no preview was shown)."""
        self.close()
        data, metadata = result_bundle(result)
        if self.handle is None:
            self.handle = display(data, raw=True, metadata=metadata, display_id=True)
        else:
            self.handle.update(data, raw=True, metadata=metadata)
        print(caption(result))
