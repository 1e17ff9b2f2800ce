"""ControlNet input filters (cascade_lab.controls.filters) against the official filters' behaviour."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cascade_lab.controls import filters

# OpenCV comes with the test extra; only a hand-made environment without it skips, CI (CI=true) never does
needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None
                               and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
                               reason="needs OpenCV: pip install 'cascade-lab[controlnet]'")


def _square(size: int = 448, lo: int = 112, hi: int = 336) -> torch.Tensor:
    """A white filled square [lo, hi) on black, (1, 3, size, size)."""
    img = torch.zeros(1, 3, size, size)
    img[..., lo:hi, lo:hi] = 1.0
    return img


def _distance_to_square_border(size: int, lo: int, hi: int) -> torch.Tensor:
    """Chebyshev-ish distance of each pixel to the square's outline (the boundary between pixels lo-1|lo, hi-1|hi)."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside_x, inside_y = (xs > lo) & (xs < hi), (ys > lo) & (ys < hi)
    dx = torch.minimum((xs - lo).abs(), (xs - hi).abs())
    dy = torch.minimum((ys - lo).abs(), (ys - hi).abs())
    # on a vertical side: distance in x (if within the side's y extent), likewise horizontal sides
    d_vert = torch.where(inside_y, dx, torch.hypot(dx, dy))
    d_horz = torch.where(inside_x, dy, torch.hypot(dx, dy))
    return torch.minimum(d_vert, d_horz)


# --------------------------------------------------------------------------------------------------------- canny


@needs_cv2
def test_canny_of_a_filled_square_is_its_outline() -> None:
    size, lo, hi = 448, 112, 336
    edges = filters.canny(_square(size, lo, hi))
    assert edges.shape == (1, 1, size, size)
    assert edges.min() >= 0 and edges.max() <= 1
    dist = _distance_to_square_border(size, lo, hi)
    on = edges[0, 0] > 0
    tol = 4.0  # Canny marks the pixel on one side of the step, then two bilinear resizes (x0.5, x2) spread it
    assert on.any()
    assert (dist[on] <= tol).all(), "edge pixels away from the square's outline"
    # every outline position has an edge nearby: along each side, the band around it is lit
    for side in (edges[0, 0, lo - 4:lo + 4, lo + 8:hi - 8], edges[0, 0, hi - 4:hi + 4, lo + 8:hi - 8]):
        assert (side.amax(dim=0) > 0.5).all()
    for side in (edges[0, 0, lo + 8:hi - 8, lo - 4:lo + 4], edges[0, 0, lo + 8:hi - 8, hi - 4:hi + 4]):
        assert (side.amax(dim=1) > 0.5).all()
    # nothing inside or outside
    assert edges[0, 0, lo + 8:hi - 8, lo + 8:hi - 8].abs().sum() == 0
    assert edges[0, 0, : lo - 8].abs().sum() == 0 and edges[0, 0, hi + 8:].abs().sum() == 0


@needs_cv2
def test_canny_at_224_is_binary_and_resizes_to_the_size_asked() -> None:
    edges = filters.canny(_square(224, 56, 168))
    assert set(edges.unique().tolist()) == {0.0, 1.0}  # no resize: cv2.Canny / 255 exactly
    assert filters.canny(_square(224, 56, 168), size=(320, 160)).shape == (1, 1, 160, 320)
    assert filters.canny(_square(224).expand(3, -1, -1, -1)).shape == (3, 1, 224, 224)


def test_canny_without_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"pip install 'cascade-lab\[controlnet\]'"):
        filters.canny(_square(64))


@needs_cv2
def test_canny_rejects_a_non_rgb_batch() -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        filters.canny(torch.zeros(3, 64, 64))


# ---------------------------------------------------------------------------------------------------- inpainting


def _box_mask(h: int = 48, w: int = 64, box: tuple[int, int, int, int] = (10, 8, 30, 20)) -> torch.Tensor:
    x0, y0, x1, y1 = box
    mask = torch.zeros(1, 1, h, w)
    mask[..., y0:y1, x0:x1] = 1
    return mask


def test_inpainting_input_is_white_under_the_mask_and_the_mask_as_channel_4() -> None:
    image = torch.rand(2, 3, 48, 64) * 0.9  # never exactly 1, so white can only come from the mask
    mask = _box_mask()
    out = filters.inpainting(image, mask)
    assert out.shape == (2, 4, 48, 64)
    inside = mask[0, 0].bool()
    assert (out[:, :3][:, :, inside] == 1.0).all()
    assert torch.equal(out[:, :3][:, :, ~inside], image[:, :, ~inside])
    assert torch.equal(out[:, 3:], mask.expand(2, -1, -1, -1))


def test_inpainting_cuts_a_soft_mask_at_one_half_and_resizes_it_nearest() -> None:
    image = torch.rand(1, 3, 48, 64) * 0.9
    soft = filters.feather_mask(_box_mask(), 3)
    out = filters.inpainting(image, soft)
    assert torch.equal(out[:, 3:], (soft >= 0.5).float())
    half = _box_mask(24, 32, (5, 4, 15, 10))  # the same box at half size
    assert torch.equal(filters.inpainting(image, half)[:, 3:], _box_mask())


@pytest.mark.parametrize(("fill", "words"), [(0.0, r"empty \(all 0\)"), (1.0, "use plain generation")])
def test_inpainting_rejects_empty_and_full_masks(fill: float, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        filters.inpainting(torch.rand(1, 3, 16, 16), torch.full((1, 1, 16, 16), fill))


def test_masks_from_image_alpha_array_tensor_and_boxes_agree(tmp_path) -> None:
    h, w, box = 48, 64, (10, 8, 30, 20)
    expected = _box_mask(h, w, box)
    region = expected[0, 0].bool().numpy()

    luma = np.where(region, 255, 0).astype(np.uint8)
    Image.fromarray(luma, "L").save(tmp_path / "mask.png")
    rgb = Image.fromarray(np.stack([luma] * 3, -1), "RGB")
    rgba = np.full((h, w, 4), 200, np.uint8)
    rgba[..., 3] = np.where(region, 0, 255)  # transparent = regenerate
    specs = {
        "path": tmp_path / "mask.png",
        "path str": str(tmp_path / "mask.png"),
        "RGB image": rgb,
        "alpha": Image.fromarray(rgba, "RGBA"),
        "uint8 array": luma,
        "0/1 array": region.astype(np.uint8),
        "bool array": region,
        "float tensor": torch.from_numpy(region).float(),
        "boxes": [box],
        "one box": box,
    }
    for name, spec in specs.items():
        assert torch.equal(filters.load_mask(spec, (w, h)), expected), name
    # two boxes are their union; a box past the edge is clipped
    two = filters.load_mask([(0, 0, 4, 4), (60, 44, 80, 80)], (w, h))
    assert two.sum() == 16 + 16 and two[0, 0, -1, -1] == 1


def test_load_mask_resizes_another_size_with_nearest() -> None:
    small = _box_mask(24, 32, (5, 4, 15, 10))[0, 0]
    assert torch.equal(filters.load_mask(small, (64, 48)), _box_mask())


def test_load_mask_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="size=.width, height."):
        filters.load_mask([(0, 0, 4, 4)])
    with pytest.raises(ValueError, match="x0 < x1"):
        filters.load_mask([(4, 0, 2, 4)], (8, 8))
    with pytest.raises(TypeError, match="boxes"):
        filters.load_mask(3.0, (8, 8))


def test_grow_mask_dilates_and_negative_erodes() -> None:
    mask = _box_mask()  # 20 x 12 box
    grown = filters.grow_mask(mask, 2)
    assert torch.equal(grown, _box_mask(box=(8, 6, 32, 22)))
    assert torch.equal(filters.grow_mask(mask, -2), _box_mask(box=(12, 10, 28, 18)))
    assert filters.grow_mask(mask, 0) is mask


def test_feather_mask_blurs_only_near_the_edge() -> None:
    mask = _box_mask(h=64, w=64, box=(16, 16, 48, 48))
    soft = filters.feather_mask(mask, 4)
    assert soft.shape == mask.shape and soft.min() >= 0 and soft.max() <= 1
    edge = (soft > 0) & (soft < 1)
    assert edge.any()
    assert torch.equal(edge, edge & torch.logical_xor(filters.grow_mask(mask, 4), filters.grow_mask(mask, -4)).bool())
    assert torch.allclose(soft.sum(), mask.sum(), rtol=1e-4)  # blur moves mass, keeps it
    assert torch.equal(soft[..., 24:40, 24:40], mask[..., 24:40, 24:40])  # far inside: unchanged


def test_composite_keeps_the_original_outside_the_mask_exactly() -> None:
    generated, original = torch.rand(2, 3, 48, 64), torch.rand(2, 3, 48, 64)
    mask = filters.feather_mask(_box_mask(), 3)
    out = filters.composite(generated, original, mask)
    outside, inside = mask[0, 0] == 0, mask[0, 0] == 1
    assert torch.equal(out[:, :, outside], original[:, :, outside])
    assert torch.equal(out[:, :, inside], generated[:, :, inside])
    with pytest.raises(ValueError, match="resize"):
        filters.composite(generated, original[..., :32], mask)


# ----------------------------------------------------------------------------------------------- super-resolution


def _pool_encoder(images: torch.Tensor) -> torch.Tensor:
    """A tiny stand-in for the effnet: average colour per 32x32 cell, repeated to 16 channels."""
    return F.avg_pool2d(images, 32).repeat(1, 6, 1, 1)[:, :16]  # (B, 16, H/32, W/32)


def test_super_resolution_doubles_the_latent_size_and_keeps_colours() -> None:
    image = torch.zeros(1, 3, 64, 96)
    image[:, 0, :32, :32] = 1.0  # a red cell at the top left
    image[:, 2, 32:, 64:] = 0.5  # a half-blue cell at the bottom right
    out = filters.super_resolution(image, _pool_encoder)
    assert out.shape == (1, 16, 4, 6)  # 2x of the (2, 3) latent
    latent = _pool_encoder(image)
    assert torch.equal(out, latent.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert torch.equal(out[0, :3, :2, :2], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 2, 2))
    assert torch.equal(out[0, :3, 2:, 4:], torch.tensor([0, 0, 0.5]).view(3, 1, 1).expand(3, 2, 2))


def test_super_resolution_settings_are_the_official_notebooks() -> None:
    settings = filters.super_resolution_settings((1024, 768))
    assert (settings["width"], settings["height"]) == (2048, 1536)
    assert settings["cfg_c"] == 1.0 and settings["steps_c"] == 20 and settings["shift_c"] == 2.0
    assert (settings["steps_b"], settings["cfg_b"], settings["shift_b"]) == (10, 1.1, 1.0)
    from cascade_lab.params import GenerationParams

    GenerationParams("an upscale", **settings).validate()  # the keys are generate()'s


# --------------------------------------------------------------------------------------------------------- resize


def test_resize_to_warns_once_with_both_sizes_on_another_aspect_ratio() -> None:
    image = torch.rand(1, 3, 48, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = filters.resize_to(image, (96, 96))
    assert out.shape == (1, 3, 96, 96) and out.min() >= 0 and out.max() <= 1
    assert len(caught) == 1 and "64x48" in str(caught[0].message) and "96x96" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert filters.resize_to(image, (128, 96)).shape == (1, 3, 96, 128)  # same aspect ratio: silent
        assert filters.resize_to(image, (64, 48)) is image
        mask = filters.resize_to(_box_mask(), (32, 24), mode="nearest")
        assert set(mask.unique().tolist()) == {0.0, 1.0}
