"""What a generation returns: images, latents, trajectories, parameters, timings — and PNGs that carry them."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .params import PNG_KEY, GenerationParams


def _png_texts(params: GenerationParams, index: int | None = None, *, comfyui: bool = True) -> dict[str, str]:
    """The text chunks of a cascade_lab PNG: the parameters (JSON), the software, the prompt, and (``comfyui``)
    ComfyUI's ``prompt`` / ``workflow`` chunks of the equivalent ComfyUI graph, so the file opens in ComfyUI."""
    data = json.loads(params.to_json())
    data["version"] = __version__
    if index is not None:
        data["batch_index"] = index
    texts = {PNG_KEY: json.dumps(data, ensure_ascii=False, sort_keys=True), "Software": f"cascade_lab {__version__}",
             "Description": params.prompts[index or 0]}
    if comfyui:
        from .comfyui.export import png_chunks

        texts.update(png_chunks(params, index))
    return texts


def _png_info(params: GenerationParams, index: int | None = None, *, comfyui: bool = True) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in _png_texts(params, index, comfyui=comfyui).items():
        info.add_text(key, text)
    return info


class SaveError(OSError):
    """Writing an image failed; the message names the path, and the result is still in memory."""


def check_output_path(path: str | Path) -> Path:
    """Refuse an output path before any work: not a .png name, a folder that cannot be created or written (a
    file in the way, /proc, read-only), each with what to do instead. Creates the folder when needed."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        hint = f" (e.g. {path.with_suffix('.png').name})" if path.suffix else ""
        raise ValueError(f"{str(path)!r}: cascade_lab writes PNG files (they carry the parameters); use a .png "
                         f"name{hint}, and convert afterwards if you need {path.suffix or 'another format'}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name inside it, e.g. {str(path / 'image.png')!r}")
    folder = path.parent
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot save to {str(path)!r}: {str(parent)!r} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot save to {str(path)!r}: the folder {str(folder)!r} cannot be created "
                         f"({exc.strerror or exc}); choose a folder you can write") from None
    import os
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".cascade_lab_write_test", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"cannot save to {str(path)!r}: the folder {str(folder)!r} is not writable "
                         f"({exc.strerror or exc}); choose a folder you can write") from None
    return path


def output_paths(path: str | Path, count: int, *, overwrite: bool = False) -> list[Path]:
    """The files a save of ``count`` images writes (``stem_<i>.png`` for a batch), checked with
    `check_output_path`; when one exists and not ``overwrite``, the first free ``stem_00001.png``,
    ``stem_00002.png``, ... (batches ``stem_00001_<i>.png``) is used instead."""
    path = check_output_path(path)

    def names(stem: str) -> list[Path]:
        return [path.with_name(f"{stem}{path.suffix}")] if count == 1 else [
            path.with_name(f"{stem}_{i}{path.suffix}") for i in range(count)]

    targets = names(path.stem)
    n = 0
    while not overwrite and any(t.exists() for t in targets):
        n += 1
        targets = names(f"{path.stem}_{n:05d}")
    return targets


def carry_params(image: Any, params: GenerationParams, index: int | None = None) -> Any:
    """Put the parameters on a PIL image: in ``image.info`` (kept by ``copy()``) and, for the image itself, as the
    default text chunks of its PNG ``save()``, so ``result.images[0].save("x.png")`` keeps them too."""
    image.info.update(_png_texts(params, index))
    from PIL import Image

    from ._pil_image import CascadeImage

    if type(image) is Image.Image:
        image.__class__ = CascadeImage  # same object layout: only `save` differs
    return image


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

    def __post_init__(self) -> None:
        for i, image in enumerate(self.images):
            carry_params(image, self.params, i)  # the chunks `png_bytes(i)` and `save` write

    @property
    def image(self) -> Any:
        return self.images[0]

    def png_bytes(self, index: int | None = None) -> bytes:
        """One image (or the grid of all) as PNG bytes with the parameters in a text chunk."""
        from ._pil_image import carried_pnginfo

        buffer = io.BytesIO()
        picture = grid(self.images) if index is None else self.images[index]
        # a result image carries its chunks since the Result was made: written as they are, not built again
        info = carried_pnginfo(picture) if index is not None else None
        picture.save(buffer, format="PNG", pnginfo=info if info is not None else _png_info(self.params, index))
        return buffer.getvalue()

    def save(self, path: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write PNGs with their parameters: ``path`` for one image, ``stem_<i>.png`` for a batch.

        An existing file is never replaced unless ``overwrite``: the next free name ``stem_00001.png``,
        ``stem_00002.png``, ... is taken instead, as ComfyUI and kohya number their outputs. Each file is written
        to a temporary name first, so a failed write (disk full, permissions) leaves any previous file intact;
        the error names the path and the result stays in memory to be saved elsewhere."""
        targets = output_paths(path, len(self.images), overwrite=overwrite)
        for i, target in enumerate(targets):
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                tmp.write_bytes(self.png_bytes(i))
                tmp.replace(target)  # never a half-written PNG under the real name
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise SaveError(f"could not write {target}: {exc.strerror or exc}; the result is still in memory: "
                                "save it elsewhere with result.save('other/folder/name.png')") from exc
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
