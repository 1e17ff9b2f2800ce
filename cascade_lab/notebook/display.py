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


class LiveProgress:
    """The ``callback`` of one job: progress bars per stage and a live Stage C preview, throttled.

    ``preview`` maps a predicted clean Stage C latent to RGB (`Cascade.preview`); None turns previews off.
    """

    def __init__(self, *, preview: Callable[[Any], Any] | None = None, interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.preview, self.interval, self.clock = preview, interval, clock
        self.handle: Any = None  # the display handle the previews and then the result go to
        self.previews = 0
        self.last: tuple[str, int, int] | None = None  # (stage, step, steps) of the last finished step
        self._bars: dict[str, Any] = {}
        self._shown_at: float | None = None

    def __call__(self, event: Any) -> None:
        self.last = (event.stage, event.step, event.steps)
        bar = self._bars.get(event.stage)
        if bar is None:
            from tqdm.auto import tqdm

            for other in self._bars.values():
                other.close()
            bar = self._bars[event.stage] = tqdm(total=event.steps, desc=STAGE_NAMES.get(event.stage, event.stage),
                                                 unit="step", leave=False)
        bar.update(1)
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

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def show_result(self, result: Any) -> None:
        """Replace the preview with the result (or show it, when no preview was shown)."""
        self.close()
        data, metadata = result_bundle(result)
        if self.handle is None:
            self.handle = display(data, raw=True, metadata=metadata, display_id=True)
        else:
            self.handle.update(data, raw=True, metadata=metadata)
        print(caption(result))
