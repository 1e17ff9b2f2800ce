"""An analytic checker for demo images: reads shape, colour, position and background from the pixels.

Background = the median colour of the image border; the shape = every pixel far from it. Its median
colour names the colour (nearest named colour), the centre of its bounding box names the grid cell, and
the shape is the template (`world.unit_mask`) fitted into that box with the best overlap (IoU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .world import COLOURS, POSITIONS, SHAPES, Scene, parse_caption, unit_mask

FOREGROUND_DISTANCE = 60.0  # RGB distance (0..255) from the background that makes a pixel part of the shape
MIN_AREA = 0.01  # of the image: smaller foregrounds are "no shape"


@dataclass(frozen=True)
class Reading:
    """What the checker sees; a field is None when it cannot tell (e.g. no shape at all)."""

    shape: str | None
    colour: str | None
    position: str | None
    background: str
    area: float  # foreground fraction of the image
    iou: float  # overlap of the best shape template with the foreground


@dataclass(frozen=True)
class Check:
    expected: Scene
    reading: Reading

    @property
    def colour(self) -> bool:
        return self.reading.colour == self.expected.colour

    @property
    def shape(self) -> bool:
        return self.reading.shape == self.expected.shape

    @property
    def position(self) -> bool:
        return self.reading.position == self.expected.position

    @property
    def background(self) -> bool:
        return self.reading.background == self.expected.background

    @property
    def accepted(self) -> bool:
        """Everything the prompt says is in the image."""
        return self.colour and self.shape and self.position and self.background


def _pixels(image: Any) -> np.ndarray:
    """PIL image, uint8 HWC array, float HWC array in [0, 1] or [3, H, W] tensor in [0, 1] → float [H, W, 3] 0..255."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):
        return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0  # type: ignore[no-any-return]
    array = np.asarray(image)
    return array.astype(np.float32) if array.dtype == np.uint8 else array.astype(np.float32) * 255.0


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def read(image: Any) -> Reading:
    """Read one image (any size; see `_pixels` for the accepted types)."""
    px = _pixels(image)
    h, w = px.shape[:2]
    edge = max(1, round(min(h, w) / 64))
    border = np.concatenate([px[:edge].reshape(-1, 3), px[-edge:].reshape(-1, 3), px[:, :edge].reshape(-1, 3),
                             px[:, -edge:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = nearest_colour(bg)
    mask = np.sqrt(((px - bg) ** 2).sum(axis=-1)) > FOREGROUND_DISTANCE  # [H, W]
    area = float(mask.mean())
    if area < MIN_AREA:
        return Reading(None, None, None, background, area, 0.0)
    ys, xs = np.nonzero(mask)
    colour = nearest_colour(np.median(px[mask], axis=0))
    # a robust bounding box: ignore the outermost 1 % of stray pixels on each side
    x0, x1 = np.percentile(xs, [1, 99]) + np.array([0.0, 1.0])
    y0, y1 = np.percentile(ys, [1, 99]) + np.array([0.0, 1.0])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    row, col = min(2, int(cy * 3 / h)), min(2, int(cx * 3 / w))
    position = next(name for name, cell in POSITIONS.items() if cell == (row, col))
    grid_v, grid_u = np.mgrid[0:h, 0:w] + 0.5
    u, v = (grid_u - cx) / max((x1 - x0) / 2, 0.5), (grid_v - cy) / max((y1 - y0) / 2, 0.5)
    ious = {}
    for shape in SHAPES:
        template = unit_mask(shape, u, v)
        ious[shape] = float((template & mask).sum() / max(1, (template | mask).sum()))
    shape = max(ious, key=lambda s: ious[s])
    return Reading(shape, colour, position, background, area, ious[shape])


def check(image: Any, prompt: str | Scene) -> Check:
    """Compare what `image` shows with what `prompt` asks for (a caption of the demo world, or a Scene)."""
    expected = prompt if isinstance(prompt, Scene) else parse_caption(prompt)
    if expected is None:
        raise ValueError(f"prompt {prompt!r} does not describe a demo scene; write e.g. "
                         "'a red circle at the top left on a blue background'")
    return Check(expected, read(image))


def hit_rates(checks: list[Check]) -> dict[str, float]:
    """Fractions of checks with the colour, shape and colour, position, background, and everything right."""
    n = max(1, len(checks))
    return {
        "colour": sum(c.colour for c in checks) / n,
        "shape_and_colour": sum(c.colour and c.shape for c in checks) / n,
        "position": sum(c.position for c in checks) / n,
        "background": sum(c.background for c in checks) / n,
        "all": sum(c.accepted for c in checks) / n,
    }


__all__ = ["Check", "Reading", "check", "hit_rates", "nearest_colour", "read"]
