"""ControlNet input filters, as the official Stable Cascade code makes them (``modules/controlnet.py`` filters and
``inference/controlnet.ipynb``): image -> the tensor a shipped ControlNet was trained on.

* `canny`: 1-channel edges (CannyFilter), for ``controlnet/canny.safetensors`` (c_in 1).
* `inpainting`: RGB with the masked area white + the mask (InpaintFilter), for ``inpainting.safetensors`` (c_in 4),
  with mask helpers `load_mask`, `grow_mask`, `feather_mask` and `composite`.
* `super_resolution`: the low-res image's EfficientNet latent upsampled 2x, for ``super_resolution.safetensors``
  (c_in 16), with `super_resolution_settings` for the generation around it.
* `resize_to`: a control image of another size brought to the generation's size.

Why OpenCV for `canny`: the official filter *is* ``cv2.Canny`` (thresholds 100/200, 3x3 Sobel, L1 gradient), and the
canny ControlNet learnt those exact edges. A torch re-implementation differs in gradient rounding, non-maximum
suppression ties and hysteresis order, so it would not give the same edge pixels; OpenCV is an optional extra
(``pip install 'cascade-lab[controlnet]'``) imported only when `canny` runs.

Images are float tensors [B, C, H, W] in [0, 1]; masks are [B, 1, H, W] in [0, 1] with 1 = regenerate. Sizes given
as arguments are ``(width, height)``, as PIL and ``Cascade.generate`` count them. Nothing imports this module when
``cascade_lab`` is imported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import super_resolution_settings  # re-exported: the generation around the filter

Tensor = torch.Tensor

CANNY_RESIZE = 224  # the official CannyFilter runs Canny at 224x224 whatever the image size
CANNY_THRESHOLDS = (100, 200)
_ASPECT_TOLERANCE = 0.01  # relative: 1000x750 -> 1024x768 is the same aspect ratio, 1366x768 -> 1344x768 is not


def _check_images(image: Tensor, name: str = "image", channels: int | None = 3) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or (channels is not None and image.shape[1] != channels):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        want = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
        raise ValueError(f"{name}: expected a tensor {want} in [0, 1], got {shape}")


# ---------------------------------------------------------------------------------------------------------- canny


def canny(image: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Official CannyFilter: bilinear resize to 224x224, cv2.Canny(uint8, 100, 200) / 255, bilinear resize back.

    image [B, 3, H, W] in [0, 1] -> edges [B, 1, h, w] in [0, 1] at ``size`` = (w, h) (default: the image's size).
    The resize back is bilinear, as in the official filter, so edges are 1 only at 224x224 and soft otherwise.
    """
    try:
        import cv2
    except ImportError as err:
        raise ImportError("the canny ControlNet filter needs OpenCV: pip install 'cascade-lab[controlnet]'") from err
    _check_images(image)
    out_hw = tuple(image.shape[-2:]) if size is None else (size[1], size[0])
    x = F.interpolate(image.float().clamp(0, 1), size=(CANNY_RESIZE, CANNY_RESIZE), mode="bilinear")
    # (B, 3, 224, 224) -> per image (224, 224, 3) uint8; astype truncates (x·255 is not rounded), as the official
    pixels = x.mul(255).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    edges = np.stack([cv2.Canny(p, *CANNY_THRESHOLDS) for p in pixels])  # (B, 224, 224) in {0, 255}
    out = torch.from_numpy(edges).float().div(255).unsqueeze(1)  # (B, 1, 224, 224)
    out = F.interpolate(out, size=out_hw, mode="bilinear")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    return out.to(device=image.device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------- inpainting


def _threshold(values: Tensor) -> Tensor:
    """A mask of any numeric type -> float {0, 1}: bool as is, uint8 >= 128 (0-255 unless all 0/1), floats >= 0.5."""
    if values.dtype == torch.bool:
        return values.float()
    if not values.is_floating_point():
        cut = 128 if values.max() > 1 else 1
        return (values >= cut).float()
    return (values >= 0.5).float()


def _as_bchw(mask: Tensor) -> Tensor:
    if mask.ndim == 2:  # (H, W)
        mask = mask[None, None]
    elif mask.ndim == 3:  # (1, H, W) or (H, W, 1)
        mask = mask[None] if mask.shape[0] == 1 else mask.permute(2, 0, 1)[None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected [H, W], [1, H, W], [H, W, 1] or [B, 1, H, W], got {tuple(mask.shape)}")
    return mask


def _mask_from_pil(img: Any) -> Tensor:
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:  # transparent = regenerate
            return torch.from_numpy(alpha < 128).float()[None, None]
    luma = np.asarray(img.convert("L"))  # ITU-R 601 luma; white = regenerate
    return torch.from_numpy(luma >= 128).float()[None, None]


def _is_boxes(spec: Any) -> bool:
    return isinstance(spec, (list, tuple))


def _mask_from_boxes(spec: Sequence[Any], size: tuple[int, int] | None) -> Tensor:
    if size is None:
        raise ValueError("mask boxes [(x0, y0, x1, y1), ...] need size=(width, height), the image they are in")
    width, height = size
    boxes = [spec] if len(spec) == 4 and all(isinstance(v, (int, float)) for v in spec) else list(spec)
    mask = torch.zeros(1, 1, height, width)
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"mask box {box!r}: use (x0, y0, x1, y1) in pixels, x1/y1 excluded")
        x0, y0, x1, y1 = (round(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"mask box {box!r}: needs x0 < x1 and y0 < y1 (pixels, x1/y1 excluded)")
        mask[..., max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1.0
    return mask


def load_mask(spec: Any, size: tuple[int, int] | None = None) -> Tensor:
    """A mask as the user gives it -> float [B, 1, H, W] in {0, 1}, 1 = regenerate, at ``size`` = (width, height).

    ``spec``: a mask image path or PIL image (white = regenerate: luma >= 128; if the image has transparent pixels,
    its alpha instead: alpha < 128 = regenerate), a numpy array or tensor (bool; uint8 0-255 cut at 128, or 0/1;
    floats cut at 0.5), or boxes (x0, y0, x1, y1) / [(x0, y0, x1, y1), ...] in pixels of ``size``, x1/y1 excluded.
    A mask of another size is resized with nearest neighbours (edges move by at most one source pixel).
    """
    from PIL import Image

    if isinstance(spec, (str, os.PathLike)):
        from ..images import open_image

        mask = _mask_from_pil(open_image(spec, "mask"))
    elif isinstance(spec, Image.Image):
        mask = _mask_from_pil(spec)
    elif isinstance(spec, np.ndarray):
        mask = _threshold(_as_bchw(torch.from_numpy(np.ascontiguousarray(spec))))
    elif isinstance(spec, torch.Tensor):
        mask = _threshold(_as_bchw(spec.detach().cpu()))
    elif _is_boxes(spec):
        return _mask_from_boxes(spec, size)
    else:
        raise TypeError(f"mask: got a {type(spec).__name__}; use an image path, a PIL image, an array, a tensor or "
                        "boxes [(x0, y0, x1, y1), ...]")
    if size is not None and (mask.shape[-1], mask.shape[-2]) != tuple(size):
        mask = F.interpolate(mask, size=(size[1], size[0]), mode="nearest")
    return mask


def check_mask(mask: Tensor) -> None:
    """Raise ValueError if a mask has nothing to regenerate (all 0) or nothing to keep (all 1), per batch item."""
    hard = mask.flatten(1) >= 0.5  # (B, H·W)
    for i, row in enumerate(hard):
        if not row.any():
            raise ValueError(f"inpainting mask {i} is empty (all 0): mark the area to regenerate with 1 (white)")
        if row.all():
            raise ValueError(f"inpainting mask {i} covers the whole image (all 1): nothing is kept; use plain "
                             "generation without the inpainting control")


def inpainting(image: Tensor, mask: Tensor) -> Tensor:
    """Official InpaintFilter with a given mask: cat(image with mask pixels set to 1.0, mask) -> [B, 4, H, W].

    ``mask`` [B or 1, 1, h, w] in [0, 1] (1 = regenerate) is cut at 0.5, as the official filter takes a boolean
    mask (a feathered mask acts as its hard version here; the feathering is for `composite`); a mask of another
    size is resized with nearest neighbours.
    """
    _check_images(image)
    mask = _as_bchw(mask)
    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask.float(), size=tuple(image.shape[-2:]), mode="nearest")
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"inpainting: {mask.shape[0]} masks for {image.shape[0]} images; give one mask or one each")
    hard = (mask >= 0.5).to(image.device)  # (B or 1, 1, H, W) bool
    check_mask(hard.float())
    painted = torch.where(hard, torch.ones_like(image), image)  # (B, 3, H, W), white where regenerated
    return torch.cat([painted, hard.to(image.dtype).expand(image.shape[0], -1, -1, -1)], dim=1)  # (B, 4, H, W)


def grow_mask(mask: Tensor, pixels: int) -> Tensor:
    """Dilate a mask by ``pixels`` (a square kernel, 2·pixels + 1 wide); negative pixels erode (ComfyUI GrowMask)."""
    if pixels == 0:
        return mask
    k = 2 * abs(pixels) + 1
    if pixels > 0:
        return F.max_pool2d(mask.float(), k, stride=1, padding=abs(pixels)).to(mask.dtype)
    return (1 - F.max_pool2d(1 - mask.float(), k, stride=1, padding=-pixels)).to(mask.dtype)


def feather_mask(mask: Tensor, pixels: int) -> Tensor:
    """Gaussian-blur a mask over ``pixels`` (kernel 2·pixels + 1, sigma pixels / 2, edges replicated), for composite."""
    if pixels <= 0:
        return mask
    sigma = pixels / 2
    offsets = torch.arange(-pixels, pixels + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (2p + 1,)
    x = F.pad(mask.float(), (pixels, pixels, pixels, pixels), mode="replicate")  # (B, 1, H + 2p, W + 2p)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).to(x.device))  # along W
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).to(x.device))  # along H
    return x.clamp(0, 1).to(mask.dtype if mask.is_floating_point() else torch.float32)


def composite(generated: Tensor, original: Tensor, mask: Tensor) -> Tensor:
    """original·(1 − mask) + generated·mask: the original back outside the mask (official and ComfyUI examples)."""
    if generated.shape[-2:] != original.shape[-2:]:
        raise ValueError(f"composite: generated is {generated.shape[-1]}x{generated.shape[-2]} but the original is "
                         f"{original.shape[-1]}x{original.shape[-2]}; resize one of them first (resize_to)")
    mask = _as_bchw(mask).to(device=generated.device, dtype=generated.dtype)
    if mask.shape[-2:] != generated.shape[-2:]:
        mask = F.interpolate(mask, size=tuple(generated.shape[-2:]), mode="nearest")
    original = original.to(device=generated.device, dtype=generated.dtype)
    return original * (1 - mask) + generated * mask


# ----------------------------------------------------------------------------------------------- super-resolution


def super_resolution(image: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
    """Official SR notebook: nearest 2x upsampling of the low-res image's effnet latent -> [B, 16, 2h, 2w].

    ``encode``: image [B, 3, H, W] in [0, 1] -> latent [B, 16, h, w], ImageNet-normalising itself, e.g.
    ``EfficientNetEncoder.encode_image``. (The training filter SREffnetFilter halves the image first; inference
    feeds the low-res image as it is.)
    """
    _check_images(image)
    latent = encode(image)  # (B, 16, H/32, W/32)
    _check_images(latent, "encode(image)", channels=None)
    return F.interpolate(latent, scale_factor=2, mode="nearest")  # (B, 16, 2h, 2w)


# --------------------------------------------------------------------------------------------------------- resize


def resize_to(image: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize a control image [B, C, H, W] to ``size`` = (width, height); warn once if the aspect ratio changes.

    ``mode``: ``bilinear`` (antialiased when shrinking, for images) or ``nearest`` (for masks).
    """
    _check_images(image, channels=None)
    height, width = image.shape[-2:]
    if (width, height) == tuple(size):
        return image
    if abs((width / height) / (size[0] / size[1]) - 1) > _ASPECT_TOLERANCE:
        warnings.warn(f"control image {width}x{height} is stretched to the generation's {size[0]}x{size[1]} (another "
                      "aspect ratio); crop it to that aspect ratio to avoid distortion", stacklevel=2)
    if mode == "nearest":
        return F.interpolate(image, size=(size[1], size[0]), mode="nearest")
    if mode != "bilinear":
        raise ValueError(f"resize_to mode={mode!r}: use 'bilinear' (images) or 'nearest' (masks)")
    out = F.interpolate(image.float(), size=(size[1], size[0]), mode="bilinear", antialias=True)
    return out.clamp(0, 1).to(image.dtype)


__all__ = ["canny", "check_mask", "composite", "feather_mask", "grow_mask", "inpainting", "load_mask", "resize_to",
           "super_resolution", "super_resolution_settings"]
