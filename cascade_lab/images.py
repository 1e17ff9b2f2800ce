"""Opening image files with one clear error for a file that is not an image (PIL only; no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def open_image(path: str | os.PathLike[str], what: str = "image") -> Any:
    """The image file at ``path``, fully read (the file is closed): a missing file or one PIL cannot read is a
    ValueError / FileNotFoundError naming ``what`` and the path, never a bare `UnidentifiedImageError`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; give the path of an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except UnidentifiedImageError:
        raise ValueError(f"{what} {str(path)!r} is not an image file PIL can read; give a PNG, JPEG or WebP "
                         "image") from None
    except OSError as exc:  # truncated or corrupt image data
        raise ValueError(f"{what} {str(path)!r} could not be read as an image ({exc}); the file may be "
                         "truncated or damaged") from None


def image_size(value: Any, what: str = "image") -> tuple[int, int]:
    """(width, height) of a file, PIL image, HWC array or [.., H, W] tensor, without loading any model."""
    if isinstance(value, (str, os.PathLike)):
        return tuple(open_image(value, what).size)  # type: ignore[return-value]
    if hasattr(value, "size") and not callable(value.size):  # PIL
        return tuple(value.size)  # type: ignore[return-value]
    shape = tuple(value.shape)
    if hasattr(value, "detach"):  # a tensor: [..., H, W]
        return int(shape[-1]), int(shape[-2])
    return int(shape[1]), int(shape[0])  # an array: [H, W(, C)]


__all__ = ["image_size", "open_image"]
