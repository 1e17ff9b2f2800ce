"""Helpers and fixtures for the training tests: a synthetic dataset of coloured shapes, one thread, a shared cache.

Test modules import the fixtures they use by name (a conftest.py here would shadow tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: tuple[int, int, int], shape: str, size: int = 128, offset: int = 0):
    """A coloured shape on a light grey background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    lo, hi = size // 5 + offset, size - size // 5 + offset
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=colour)
    else:
        draw.polygon([(size // 2 + offset, lo), (hi, hi), (lo, hi)], fill=colour)
    return img


def make_shapes_dataset(folder: Path, size: int = 128, caption_extension: str = ".txt") -> Path:
    """12 images (4 colours x 3 shapes) with captions such as "a red circle"."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        for shape in SHAPES:
            stem = folder / f"{name}_{shape}"
            draw_shape(colour, shape, size).save(stem.with_suffix(".png"))
            stem.with_suffix(caption_extension).write_text(f"a {name} {shape}")
    return folder


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One latent/text cache for the whole session: the random EfficientNet runs once per image."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def one_thread():
    """Training steps on tiny models are fastest single-threaded on the shared 2-core machines."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
