"""What a generation returns: images, latents, trajectories, parameters, timings — and PNGs that carry them."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .params import PNG_KEY, GenerationParams


def _png_info(params: GenerationParams, index: int | None = None) -> Any:
    from PIL.PngImagePlugin import PngInfo

    data = json.loads(params.to_json())
    data["version"] = __version__
    if index is not None:
        data["batch_index"] = index
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(data, ensure_ascii=False, sort_keys=True))
    info.add_text("Software", f"cascade_lab {__version__}")
    info.add_text("Description", params.prompts[index or 0])
    return info


def to_pil(images: Any, rounding: str = "round") -> list[Any]:
    """[B, 3, H, W] float tensor in [0, 1] → list of RGB PIL images: rounded (most image writers), or
    ``rounding="truncate"`` as ComfyUI's SaveImage (uint8 of clip(255·x)), which compat="comfyui" uses."""
    import torch
    from PIL import Image

    scaled = (images.float() * 255).clamp(0, 255)
    scaled = scaled.round() if rounding == "round" else scaled.trunc()
    array = scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    return [Image.fromarray(a, "RGB") for a in array]


def grid(images: list[Any], columns: int | None = None) -> Any:
    """Images side by side (at most 4 per row)."""
    from PIL import Image

    columns = columns or min(4, len(images))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


@dataclass
class Result:
    """A finished generation. Its rich display is a PNG grid carrying the parameters (saved notebooks keep it)."""

    images: list[Any]  # PIL images
    params: GenerationParams  # with the seed actually used
    latent_c: Any = None  # [B, 16, h, w] CPU tensor
    latent_b: Any = None  # [B, 4, H/4, W/4]
    trajectory_c: list[Any] = field(default_factory=list)  # predicted clean latent per step
    trajectory_b: list[Any] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # what each ControlNet of `params.controls` saw, in order: uint8 [B, C, H, W] CPU (canny 1 channel, inpainting
    # the white-painted RGB + the mask, super_resolution the low-resolution RGB, not its EfficientNet features)
    control_images: list[Any] = field(default_factory=list)

    @property
    def image(self) -> Any:
        return self.images[0]

    def png_bytes(self, index: int | None = None) -> bytes:
        """One image (or the grid of all) as PNG bytes with the parameters in a text chunk."""
        buffer = io.BytesIO()
        picture = grid(self.images) if index is None else self.images[index]
        picture.save(buffer, format="PNG", pnginfo=_png_info(self.params, index))
        return buffer.getvalue()

    def save(self, path: str | Path) -> list[Path]:
        """Write PNGs with their parameters: ``path`` for one image, ``stem_<i>.png`` for a batch."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: cascade_lab writes PNG files (they carry the parameters); use a .png name")
        path.parent.mkdir(parents=True, exist_ok=True)
        targets = [path] if len(self.images) == 1 else [
            path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(self.images))]
        for i, target in enumerate(targets):
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(self.png_bytes(i))
            tmp.replace(target)  # never a half-written PNG under the real name
        return targets

    def _repr_png_(self) -> bytes:
        return self.png_bytes()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        p = self.params
        text = (f"cascade_lab result: {len(self.images)} image(s) {p.width}x{p.height}, seed {p.seed}, "
                f"variant {p.variant}, C {p.sampler_c}/{p.scheduler_c} {p.steps_c} steps cfg {p.cfg_c}, "
                f"B {p.sampler_b}/{p.scheduler_b} {p.steps_b} steps cfg {p.cfg_b}\nprompt: {p.prompts[0]}")
        return {"image/png": self.png_bytes(), "text/plain": text}

    def __repr__(self) -> str:
        return f"<Result {len(self.images)} image(s), seed={self.params.seed}, prompt={self.params.prompt!r}>"
