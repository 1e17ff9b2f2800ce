"""The demo's synthetic world: one flat shape of a named colour at a named position on a plain background.

Everything is generated from seeds, so the same call gives the same pixels on every machine (no downloads).
A scene is a `Scene` (shape, colour, position, background); its caption says exactly that, e.g.
"a red circle at the top left on a blue background". A fixed, seeded tenth of all combinations is held
out: training never draws them, the hit-rate evaluation uses only them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

SIZE = 128  # the demo's native image size (px)

# name -> sRGB 0..255; every colour can be a background, the first six are also shape colours
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 170, 70), "blue": (40, 80, 215), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "cyan": (40, 200, 210), "white": (245, 245, 245), "black": (20, 20, 20),
}  # fmt: skip
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
BACKGROUNDS = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "cross")
# a 3x3 grid: (row, column) of each name, and the words a caption uses for it
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip

HALF_EXTENT = (30.0, 36.0)  # a shape's half-width at 128 px is drawn from this range (px): about half the image
HOLDOUT_SEED = 2024
HOLDOUT_FRACTION = 0.1
MAIN_PROMPT = "a red circle at the top left on a blue background"  # the README's main job: always trained


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.colour} {self.shape} {where} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every valid combination (the shape's colour differs from the background): 4·6·9·7 = 1512."""
    return [Scene(s, c, p, b) for s, c, p, b in product(SHAPES, SHAPE_COLOURS, POSITIONS, BACKGROUNDS) if c != b]


def split() -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes): a seeded tenth is held out; the README's prompt is always trained."""
    scenes = all_scenes()
    order = list(range(len(scenes)))
    random.Random(HOLDOUT_SEED).shuffle(order)
    n_held = round(len(scenes) * HOLDOUT_FRACTION)
    held = {i for i in order[:n_held] if scenes[i].caption != MAIN_PROMPT}
    return [s for i, s in enumerate(scenes) if i not in held], [s for i, s in enumerate(scenes) if i in held]


def eval_scenes(n: int = 64) -> list[Scene]:
    """The fixed held-out prompt set of the hit-rate measure: `n` held-out scenes in a seeded order."""
    held = split()[1]
    assert n <= len(held), f"only {len(held)} held-out scenes"
    random.Random(HOLDOUT_SEED + 1).shuffle(held)
    return held[:n]


_WORDS = re.compile(r"[a-z]+")


def parse_caption(text: str) -> Scene | None:
    """The scene a prompt asks for, or None when it does not name a shape, a colour and a background."""
    words = _WORDS.findall(text.lower())
    shape = next((w for w in words if w in SHAPES), None)
    if shape is None or "background" not in words:
        return None
    before, after = words[:words.index(shape)], words[words.index(shape) + 1:]
    colour = next((w for w in reversed(before) if w in COLOURS), None)
    bg_words = after[:after.index("background")] if "background" in after else []
    background = next((w for w in reversed(bg_words) if w in COLOURS), None)
    vertical = next((w for w in after if w in ("top", "bottom")), None)
    horizontal = next((w for w in after if w in ("left", "right")), None)
    position = " ".join(w for w in (vertical, horizontal) if w) or "center"
    if colour is None or background is None:
        return None
    return Scene(shape, colour, position, background)


# ----------------------------------------------------------------------------------------------- drawing


def unit_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of `shape` filling the box [-1, 1]² (u right, v down); the checker fits these too."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":  # a plus sign with arms 0.7 wide
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
        return inside & ((np.abs(u) <= 0.35) | (np.abs(v) <= 0.35))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def cell_centre(position: str, size: int = SIZE) -> tuple[float, float]:
    """(x, y) pixel centre of a named grid cell."""
    row, col = POSITIONS[position]
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def render(scene: Scene, rng: random.Random | None = None, size: int = SIZE, supersample: int = 2) -> np.ndarray:
    """The scene as uint8 [size, size, 3]: its shape (half-extent `HALF_EXTENT` at 128 px, ±4 px jitter), smoothed."""
    rng = rng or random.Random(0)
    scale = size / SIZE
    half = rng.uniform(*HALF_EXTENT) * scale
    cx, cy = cell_centre(scene.position, size)
    cx, cy = cx + rng.uniform(-4, 4) * scale, cy + rng.uniform(-4, 4) * scale
    lo, hi = half + 2 * scale, size - half - 2 * scale  # the whole shape stays inside the image
    cx, cy = min(max(cx, lo), hi), min(max(cy, lo), hi)
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample  # sample points in pixel units
    u, v = np.meshgrid((coords - cx) / half, (coords - cy) / half)  # [n, n] each
    mask = unit_mask(scene.shape, u, v).astype(np.float32)
    cover = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]  # [size, size, 1]
    fg, bg = np.array(COLOURS[scene.colour], np.float32), np.array(COLOURS[scene.background], np.float32)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def sample(n: int, seed: int = 0, scenes: list[Scene] | None = None) -> Iterator[tuple[Scene, np.ndarray]]:
    """`n` (scene, image) pairs drawn from `scenes` (default: the training scenes), identical for the same seed."""
    pool = scenes if scenes is not None else split()[0]
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        scene = pool[rng.randrange(len(pool))]
        yield scene, render(scene, rng)


def write_dataset(folder: str | Path, n: int, seed: int = 0) -> Path:
    """`n` training images as PNG + caption .txt (the kohya folder layout `cascade_lab.training` reads)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, image) in enumerate(sample(n, seed)):
        stem = folder / f"{i:05d}"
        Image.fromarray(image).save(stem.with_suffix(".png"), compress_level=1)
        stem.with_suffix(".txt").write_text(scene.caption)
    return folder


__all__ = ["BACKGROUNDS", "COLOURS", "MAIN_PROMPT", "POSITIONS", "SHAPES", "SHAPE_COLOURS", "SIZE", "Scene",
           "all_scenes", "cell_centre", "eval_scenes", "parse_caption", "render", "sample", "split", "unit_mask",
           "write_dataset"]
