"""The generation panel's ControlNet section: one `Control` from widgets, and a preview of what the ControlNet sees.

The preview runs the cheap filters only (canny edges, the white-painted inpainting input and its mask, the
low-resolution super-resolution input), never a model, so it can follow every change of the inputs. Uploaded
images and grown masks are written to ``upload_folder`` when a job starts: the job's `Control` then names files,
so the PNG's parameters and the copied ``%%cascade`` cell point at them.
"""

from __future__ import annotations

import hashlib
import html
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..controls import KINDS, Control, parse_boxes

KIND_LABELS = {"canny": "canny (edges)", "inpainting": "inpainting (mask)",
               "super_resolution": "super_resolution (2x upscale)"}
THUMBNAIL = 192  # px, the longer side of a preview image


def uploaded(upload: widgets.FileUpload) -> tuple[str, bytes] | None:
    """(file name, bytes) of a single-file `FileUpload`, or None when nothing is uploaded."""
    if not upload.value:
        return None
    item = upload.value[0]
    return str(item["name"]), bytes(item["content"])


def to_pil(image: Any) -> Any:
    """A [1, C, H, W] tensor in [0, 1] or uint8 (C = 1 or 3) → a PIL image (L or RGB) of its first item."""
    import torch
    from PIL import Image

    x = image[0]
    if x.dtype != torch.uint8:
        x = x.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    array = x.permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


def control_views(images: Any, kind: str) -> list[tuple[str, Any]]:
    """What a ControlNet of ``kind`` sees, as labelled PIL images: the edges, the painted input and its mask
    (inpainting's 4 channels), or the low-resolution input; ``images`` [B, C, H, W] as `Result.control_images`."""
    if kind == "inpainting":
        return [("input", to_pil(images[:, :3])), ("mask", to_pil(images[:, 3:4]))]
    return [({"canny": "edges", "super_resolution": "low-res input"}.get(kind, kind), to_pil(images))]


def thumbnail_png(image: Any, size: int = THUMBNAIL) -> bytes:
    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return buffer.getvalue()


def filtered(control: Control, size: tuple[int, int]) -> Any:
    """The filtered input a `Control` gives its ControlNet at ``size`` = (width, height), as
    `Cascade._control_input` makes it, except super_resolution: its low-resolution image, not EfficientNet
    features. [1, C, H, W] floats in [0, 1]; raises ValueError / ImportError as generate would."""
    from ..api import _image_tensor
    from ..controls import filters

    image = _image_tensor(control.image)[:1]  # [1, 3, H, W]
    if control.kind == "canny":
        return filters.canny(filters.resize_to(image, size))
    if control.kind == "inpainting":
        mask = filters.load_mask(control.mask, size)
        filters.check_mask(mask)
        return filters.inpainting(filters.resize_to(image, size), mask)
    return filters.resize_to(image, (size[0] // 2, size[1] // 2))


class ControlSection:
    """Image (upload or file), kind, strength, step range, inpainting mask (upload, file or boxes) with grow, an
    optional ControlNet file, and the filtered preview. ``size`` returns the generation's (width, height)."""

    def __init__(self, size: Callable[[], tuple[int, int]], *, upload_folder: str | Path = "cascade_inputs") -> None:
        self.size, self.upload_folder = size, Path(upload_folder)
        short, wide = widgets.Layout(width="320px"), widgets.Layout(width="100%")
        self.kind = widgets.Dropdown(options=[(KIND_LABELS[k], k) for k in KINDS], value="canny", description="kind")
        self.image_upload = widgets.FileUpload(accept="image/*", multiple=False, description="image")
        # text boxes report on Enter or leaving the box, not per keystroke (each change re-runs the filter)
        self.image_path = widgets.Text(placeholder="or an image file", description="image", layout=short,
                                       continuous_update=False)
        self.clear = widgets.Button(description="clear", icon="times", tooltip="no ControlNet: forget the image")
        self.clear.on_click(lambda _: self.reset())
        self.strength = widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05, description="strength",
                                            continuous_update=False)
        self.steps = widgets.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.05, description="step range",
                                              continuous_update=False, tooltip="the fraction of the Stage C steps "
                                              "it applies in (start, end), as ComfyUI's percent range")
        self.mask_upload = widgets.FileUpload(accept="image/*", multiple=False, description="mask")
        self.mask_text = widgets.Text(placeholder="or a mask file (white = regenerate), or boxes x0,y0,x1,y1;...",
                                      description="mask", layout=wide, continuous_update=False)
        self.grow = widgets.IntSlider(value=0, min=-64, max=64, description="grow", continuous_update=False,
                                      tooltip="dilate the mask by this many pixels (negative: erode)")
        self.controlnet = widgets.Text(placeholder="ControlNet .safetensors (empty: found like the stages)",
                                       description="ControlNet", layout=wide, continuous_update=False)
        self.message = widgets.HTML("")
        self.preview = widgets.HBox([])
        self.mask_box = widgets.VBox([widgets.HBox([self.mask_upload, self.mask_text]), self.grow])
        body = widgets.VBox([
            widgets.HBox([self.kind, self.image_upload, self.image_path, self.clear]),
            widgets.HBox([self.strength, self.steps]), self.mask_box, self.controlnet, self.message, self.preview,
        ])
        self.widget = widgets.Accordion(children=[body], titles=("ControlNet: off",), selected_index=None)
        for w in (self.kind, self.image_upload, self.image_path, self.mask_upload, self.mask_text, self.grow):
            w.observe(lambda _: self.update_preview(), "value")
        self.strength.observe(lambda _: self._retitle(), "value")
        self.update_preview()

    # -- reading the form ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether an image is given: without one the section adds no ControlNet."""
        return bool(self.image_upload.value) or bool(self.image_path.value.strip())

    def reset(self) -> None:
        self.image_upload.value, self.image_path.value = (), ""

    def _image(self) -> Any:
        """The control image: an uploaded one as a PIL image, else the file's path (checked)."""
        from PIL import Image

        upload = uploaded(self.image_upload)
        if upload is not None:
            name, data = upload
            try:
                return Image.open(io.BytesIO(data)).convert("RGB")
            except Exception as exc:
                raise ValueError(f"ControlNet image {name!r}: not an image PIL can read ({exc})") from None
        return _file("ControlNet image", self.image_path.value)

    def _mask(self) -> Any:
        """The inpainting mask before grow: boxes, an uploaded image, or a file's path; None when not given."""
        from PIL import Image

        upload = uploaded(self.mask_upload)
        if upload is not None:
            name, data = upload
            try:
                return Image.open(io.BytesIO(data))
            except Exception as exc:
                raise ValueError(f"mask {name!r}: not an image PIL can read ({exc})") from None
        text = self.mask_text.value.strip()
        if not text:
            return None
        boxes = parse_boxes(text)
        return boxes if boxes is not None else _file("mask", text)

    def control(self, size: tuple[int, int] | None = None) -> Control | None:
        """The form as a checked `Control` at the generation ``size`` (default: the panel's), or None without an
        image; the mask is grown here (a [1, 1, H, W] tensor then). Raises ValueError naming the wrong input."""
        if not self.active:
            return None
        size = size or self.size()
        kind = self.kind.value
        mask = self._mask() if kind == "inpainting" else None
        if mask is not None and self.grow.value:
            from ..controls import filters

            mask = filters.grow_mask(filters.load_mask(mask, size), self.grow.value)
        model = self.controlnet.value.strip() or None
        if model is not None:
            model = _file("ControlNet file", model)
        start, end = self.steps.value
        return Control(kind, self._image(), float(self.strength.value), float(start), float(end), mask,
                       model).validate()

    def job_control(self, size: tuple[int, int] | None = None) -> Control | None:
        """`control` with an uploaded image and a grown or uploaded mask written to ``upload_folder`` as PNG (named
        by content), so the result's parameters name files; checked by running the cheap filters once."""
        control = self.control(size)
        if control is None:
            return None
        filtered(control, size or self.size())  # canny without OpenCV, an empty mask, ...: refused before a job
        image, mask = control.image, control.mask
        if not isinstance(image, str):
            image = self._save(image, "control")
        if mask is not None and not isinstance(mask, (str, list)):
            mask = self._save(to_pil(mask) if hasattr(mask, "shape") else mask.convert("RGBA"), "mask")
        return Control(control.kind, image, control.strength, control.start, control.end, mask, control.model)

    def _save(self, image: Any, stem: str) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self.upload_folder / f"{stem}_{hashlib.sha256(data).hexdigest()[:12]}.png"
        if not path.is_file():
            self.upload_folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return str(path)

    # -- preview ---------------------------------------------------------------------------------------
    def update_preview(self) -> None:
        """Show what the ControlNet would see now (or why it cannot), and the mask inputs only for inpainting."""
        self.mask_box.layout.display = None if self.kind.value == "inpainting" else "none"
        self._retitle()
        self.message.value, self.preview.children = "", ()
        try:
            control = self.control()
            if control is None:
                return
            with warnings.catch_warnings(record=True) as notices:  # a stretched image: said here, not in a log
                warnings.simplefilter("always")
                views = control_views(filtered(control, self.size()), control.kind)
        except Exception as exc:  # shown under the inputs; Generate reports it again in the panel's error box
            self.message.value = f'<span style="color:#b00020">{html.escape(f"{type(exc).__name__}: {exc}")}</span>'
            return
        lines = [str(n.message) for n in notices]
        if control.kind == "super_resolution":
            from ..images import image_size

            (w, h), size = image_size(control.image), self.size()
            if size != (2 * w, 2 * h):
                lines.append(f"super_resolution upscales 2x: the official recipe makes {2 * w}x{2 * h} from this "
                             f"{w}x{h} image, Stage C DDPM, 20 steps, CFG 1 (Cascade.upscale, %%cascade --upscale 2x)")
        self.message.value = "<br>".join(f"<small>{html.escape(line)}</small>" for line in lines)
        self.preview.children = tuple(
            widgets.VBox([widgets.HTML(f"<small>{html.escape(label)}</small>"),
                          widgets.Image(value=thumbnail_png(image), format="png")])
            for label, image in views)

    def _retitle(self) -> None:
        title = (f"ControlNet: {self.kind.value}, strength {self.strength.value:g}" if self.active
                 else "ControlNet: off")
        self.widget.set_title(0, title)


def _file(what: str, value: str) -> str:
    path = Path(value.strip()).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {value.strip()!r}: file not found")
    return str(path)
