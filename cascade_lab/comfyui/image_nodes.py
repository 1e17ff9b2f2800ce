"""ComfyUI's image and mask nodes on its tensors: IMAGE [B, H, W, 3] float32 in [0, 1] (not clamped), MASK
[B, H, W] (1 = masked; LoadImage's mask is 1 − alpha)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def load_image(path: Path) -> tuple[Tensor, Tensor]:
    """LoadImage: every frame of the file as a batch (frames of another size than the first skipped; an MPO's
    first only), each with its EXIF orientation applied, a 32-bit integer frame ('I', 16-bit PNGs) scaled by
    1/255 first as ComfyUI does, RGB / 255 → [B, H, W, 3]; the mask is 1 − alpha (a palette's transparency too;
    [1, 64, 64] zeros for a frame without either)."""
    from PIL import Image, ImageOps, ImageSequence

    images: list[Tensor] = []
    masks: list[Tensor] = []
    with Image.open(path) as img:
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if images and rgb.size != (images[0].shape[1], images[0].shape[0]):
                continue
            images.append(torch.from_numpy(np.asarray(rgb).astype(np.float32) / 255.0))
            if "A" in frame.getbands():
                alpha = np.asarray(frame.getchannel("A")).astype(np.float32) / 255.0
                masks.append(1.0 - torch.from_numpy(alpha))
            elif frame.mode == "P" and "transparency" in frame.info:
                alpha = np.asarray(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
                masks.append(1.0 - torch.from_numpy(alpha))
            else:
                masks.append(torch.zeros(64, 64))
            if img.format == "MPO":
                break
    return torch.stack(images), torch.stack(masks)


def load_image_mask(path: Path, channel: str) -> Tensor:
    """LoadImageMask: one channel of the image as RGBA (EXIF orientation applied, an 'I' image scaled by 1/255
    first) / 255 → [1, H, W]; the alpha channel inverted (1 − alpha: transparent = masked), as ComfyUI computes it.
    An image without alpha has alpha 255 everywhere, so its 'alpha' mask is all 0."""
    from PIL import Image, ImageOps

    band = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}.get(channel)
    if band is None:
        raise ValueError(f"channel {channel!r}: use one of alpha, red, green, blue")
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.getbands() != ("R", "G", "B", "A"):
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGBA")
        mask = torch.from_numpy(np.asarray(img.getchannel(band)).astype(np.float32) / 255.0)
    return (1.0 - mask if band == "A" else mask)[None]


def empty_image(width: int, height: int, batch_size: int, color: int) -> Tensor:
    rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255.0
    return rgb.view(1, 1, 1, 3).expand(batch_size, height, width, 3).clone()


def upscale(images: Tensor, width: int, height: int, method: str, crop: str) -> Tensor:
    """[B, C, H, W] → [B, C, height, width]: ComfyUI's common_upscale (centre crop to the aspect, then resize)."""
    if crop == "center":
        from ..pipeline import comfy_center_crop

        images = comfy_center_crop(images, width, height)
    if method == "lanczos":
        from PIL import Image

        out = []
        for image in images:
            array = image.mul(255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # truncated
            pil = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
            resized = np.asarray(pil.resize((width, height), Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
            out.append(torch.from_numpy(resized).reshape(height, width, -1).permute(2, 0, 1))
        return torch.stack(out)
    if method == "bislerp":
        return bislerp(images, width, height)
    return F.interpolate(images, size=(height, width), mode=method)


def _sample_points(old: int, new: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where bilinear resizing (half-pixel centres, edges clamped) samples an axis of ``old`` pixels for ``new``:
    the left neighbour, the right one (the last pixel at the edge) and the weight of the right one."""
    position = F.interpolate(torch.arange(old, dtype=torch.float32).view(1, 1, 1, -1), size=(1, new),
                             mode="bilinear").flatten()
    right = torch.arange(old, dtype=torch.float32) + 1
    right[-1] -= 1
    right_at = F.interpolate(right.view(1, 1, 1, -1), size=(1, new), mode="bilinear").flatten()
    return position.long(), right_at.long(), position - position.floor()


def _slerp_rows(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """Spherical interpolation of the channel vectors a, b [N, C] by w [N, 1], the length interpolated linearly
    (ComfyUI's bislerp): a itself when they point the same way, linear when they are opposite."""
    norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    unit_a = torch.where(norm_a == 0, torch.zeros_like(a), a / norm_a)
    unit_b = torch.where(norm_b == 0, torch.zeros_like(b), b / norm_b)
    cos = (unit_a * unit_b).sum(-1)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    w1 = w.squeeze(1)
    out = ((torch.sin((1.0 - w1) * angle) / sin).unsqueeze(1) * unit_a
           + (torch.sin(w1 * angle) / sin).unsqueeze(1) * unit_b)
    out = out * (norm_a * (1.0 - w) + norm_b * w)
    same, opposite = cos > 1 - 1e-5, cos < 1e-5 - 1
    out[same] = a[same]
    out[opposite] = (a * (1.0 - w) + b * w)[opposite]
    return out


def bislerp(images: Tensor, width: int, height: int) -> Tensor:
    """ComfyUI's "bislerp" resize of [B, C, H, W]: along the width, then the height, each output pixel the
    spherical interpolation of its two bilinear neighbours' channel vectors."""
    dtype = images.dtype
    x = images.float()
    B, C, H, W = x.shape
    left, right, w = _sample_points(W, width)
    a = x[..., left].movedim(1, -1).reshape(-1, C)
    b = x[..., right].movedim(1, -1).reshape(-1, C)
    x = _slerp_rows(a, b, w.view(1, 1, -1).expand(B, H, -1).reshape(-1, 1)).view(B, H, width, C).movedim(-1, 1)
    top, bottom, w = _sample_points(H, height)
    a = x[:, :, top].movedim(1, -1).reshape(-1, C)
    b = x[:, :, bottom].movedim(1, -1).reshape(-1, C)
    x = _slerp_rows(a, b, w.view(1, -1, 1).expand(B, -1, width).reshape(-1, 1)).view(B, height, width, C)
    return x.movedim(-1, 1).to(dtype)


def image_scale(image: Tensor, method: str, width: int, height: int, crop: str) -> Tensor:
    """ImageScale: a width or height of 0 keeps the aspect ratio."""
    H, W = image.shape[1:3]
    if width == 0 and height == 0:
        return image
    width = width or max(1, round(W * height / H))
    height = height or max(1, round(H * width / W))
    return upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


def canny(image: Tensor, low: float, high: float) -> Tensor:
    """Canny edges of each image at its own size, thresholds in [0, 1] of the gradient, edges repeated to 3
    channels: kornia's ``filters.canny`` as ComfyUI's node calls it when kornia is installed (the same pixels),
    else OpenCV's Canny (the ``controlnet`` extra), whose edge pixels may differ, with a notice."""
    try:
        from kornia.filters import canny as kornia_canny
    except ImportError:
        pass  # OpenCV below
    else:
        edges = kornia_canny(image[..., :3].movedim(-1, 1), low, high)[1]  # (magnitude, edges [B, 1, H, W])
        return edges.repeat(1, 3, 1, 1).movedim(1, -1).contiguous()
    try:
        import cv2
    except ImportError as err:
        raise ImportError("the Canny node needs kornia (ComfyUI's edges: pip install kornia) or OpenCV: "
                          "pip install 'cascade-lab[controlnet]'") from err
    import warnings

    warnings.warn("the Canny node runs OpenCV's Canny (kornia is not installed), whose edge pixels differ a little "
                  "from ComfyUI's; pip install kornia for ComfyUI's", stacklevel=2)
    pixels = image.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    found = np.stack([cv2.Canny(p, low * 255, high * 255) for p in pixels]).astype(np.float32) / 255.0
    return torch.from_numpy(found)[..., None].expand(-1, -1, -1, 3).contiguous()


def join_alpha(image: Tensor, alpha: Tensor) -> Tensor:
    """JoinImageWithAlpha: RGBA with alpha = 1 − mask, the mask resized to the image (bilinear); as many images
    as the shorter of the two batches (ComfyUI pairs them up, it does not repeat a single mask)."""
    H, W = image.shape[1:3]
    batch = min(image.size(0), alpha.reshape(-1, *alpha.shape[-2:]).size(0))
    mask = F.interpolate(alpha.reshape(-1, 1, *alpha.shape[-2:]), size=(H, W), mode="bilinear").squeeze(1)
    return torch.cat([image[:batch, ..., :3], (1.0 - mask[:batch])[..., None]], dim=-1)


def grow_mask(mask: Tensor, expand: int, tapered_corners: bool) -> Tensor:
    """GrowMask: |expand| 3×3 dilations (erosions when negative), a cross kernel with tapered corners."""
    kernel = torch.ones(3, 3) if not tapered_corners else torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])
    x = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    for _ in range(abs(expand)):
        patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)  # [N, 9, H·W]
        picked = patches[:, kernel.flatten() > 0]
        x = (picked.amax(1) if expand > 0 else picked.amin(1)).view_as(x)
    return x.view(-1, *mask.shape[-2:])


def composite(destination: Tensor, source: Tensor, x: int, y: int, resize_source: bool,
              mask: Tensor | None) -> Tensor:
    """ImageCompositeMasked: ``source`` pasted at (x, y) over ``destination`` through ``mask`` (default all)."""
    if source.shape[-1] > destination.shape[-1]:  # an RGBA source over an RGB image: its colour only
        source = source[..., :destination.shape[-1]]
    out = destination.clone()
    src = source
    if resize_source:
        src = upscale(source.movedim(-1, 1), destination.shape[2], destination.shape[1], "bilinear",
                      "disabled").movedim(1, -1)
    H, W = out.shape[1:3]
    h, w = min(src.shape[1], H - y), min(src.shape[2], W - x)
    if h <= 0 or w <= 0:
        return out
    if mask is None:
        m = torch.ones(1, h, w, 1)
    else:
        m = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=src.shape[1:3], mode="bilinear")
        m = m[:, 0, :h, :w, None]
    region = out[:, y:y + h, x:x + w]
    out[:, y:y + h, x:x + w] = src[:, :h, :w] * m + region * (1 - m)
    return out


def blur(image: Tensor, radius: int, sigma: float) -> Tensor:
    """ImageBlur: a (2·radius + 1)² Gaussian whose σ is in units of the radius (its taps at −1 … 1), edges
    reflected, each channel alone; radius 0 leaves the image as it is."""
    if radius <= 0:
        return image
    taps = torch.linspace(-1, 1, 2 * radius + 1)
    yy, xx = torch.meshgrid(taps, taps, indexing="ij")
    kernel = torch.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    C = image.shape[-1]
    x = F.pad(image.movedim(-1, 1).float(), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(x, kernel.expand(C, 1, -1, -1), groups=C)
    return out.movedim(1, -1)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image: Tensor, size: int = 224, crop: bool = True) -> Tensor:
    """CLIPVisionEncode's input: IMAGE [B, H, W, 3] → [B, 3, size, size]: the short side to ``size`` (bicubic,
    antialiased, the long side rounded), centre crop (``crop``; else a plain resize), 8-bit rounding, CLIP's
    mean / std."""
    x = image[..., :3].movedim(-1, 1).float()
    H, W = x.shape[-2:]
    if crop:
        scale = size / min(H, W)
        x = F.interpolate(x, size=(round(scale * H), round(scale * W)), mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    else:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    x = torch.clip(x * 255, 0, 255).round() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
