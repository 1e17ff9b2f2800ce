"""A PIL image that keeps cascade_lab's parameters when saved as PNG (imported on first use: PIL, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

# the text chunks of a cascade_lab PNG (results._png_texts): its parameters, and ComfyUI's graph of them
TEXT_KEYS = ("cascade_lab", "Software", "Description", "prompt", "workflow")


def carried_pnginfo(image: Any) -> Any:
    """The PNG text chunks an image carries in its ``info`` (`results.carry_params`), or None when it carries none."""
    if not isinstance(image.info.get(TEXT_KEYS[0]), str):
        return None
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key in TEXT_KEYS:
        if isinstance(image.info.get(key), str):
            info.add_text(key, image.info[key])
    return info


class CascadeImage(Image.Image):
    """`PIL.Image.Image` whose PNG ``save`` writes the parameters in its ``info`` unless ``pnginfo`` is given."""

    def save(self, fp: Any, format: str | None = None, **params: Any) -> None:  # noqa: A002 (PIL's name)
        name = str(fp) if isinstance(fp, (str, Path)) else str(getattr(fp, "name", ""))
        png = (format or "").upper() == "PNG" or (format is None and name.lower().endswith(".png"))
        if png and "pnginfo" not in params:
            info = carried_pnginfo(self)
            if info is not None:
                params["pnginfo"] = info
        super().save(fp, format, **params)

    def __getstate__(self) -> Any:
        return [super().__getstate__(), dict(self.info)]

    def __setstate__(self, state: Any) -> None:
        base, info = state
        super().__setstate__(base)
        self.info.update(info)
