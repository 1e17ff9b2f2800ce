"""One-off: the expected outputs of ComfyUI's own image and mask nodes (LoadImage, LoadImageMask, GrowMask,
ThresholdMask, InvertMask, ImageCompositeMasked, JoinImageWithAlpha, ImageScale, EmptyImage) on small inputs,
written to image_nodes.safetensors next to this file. Run with ComfyUI's reference tree importable (the oracle
venv, see README.md); the tests read the stored file only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def write_inputs() -> None:
    """The input images (stored next to this file; the tests load them from there)."""
    from PIL import Image

    rng = np.random.default_rng(17)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[0, :4, 3] = (0, 127, 128, 255)
    Image.fromarray(rgba, "RGBA").save(HERE / "rgba.png")
    Image.fromarray(rgba[..., :3], "RGB").save(HERE / "rgb.png")
    Image.fromarray(rgba[..., 0], "L").save(HERE / "gray.png")
    palette = Image.fromarray(rgba[..., 1] // 64, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(HERE / "palette.png", transparency=2)
    Image.fromarray(rgba[..., 2].astype(np.uint16) * 257).save(HERE / "gray16.png")
    rotated = Image.fromarray(rgba, "RGBA")
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(HERE / "exif.png", exif=exif)
    frames = [Image.fromarray(rgba, "RGBA"), Image.fromarray(255 - rgba, "RGBA")]
    frames[0].save(HERE / "anim.png", save_all=True, append_images=frames[1:])  # an animated PNG, 2 frames


FILES = ("rgba.png", "rgb.png", "gray.png", "palette.png", "gray16.png", "exif.png", "anim.png")


def main() -> None:
    import torch
    from comfy_oracle import boot_comfyui
    from safetensors.torch import save_file

    boot_comfyui()
    import folder_paths
    import nodes
    from comfy_extras import nodes_compositing, nodes_mask

    write_inputs()
    folder_paths.set_input_directory(str(HERE))
    out: dict[str, torch.Tensor] = {}
    for name in FILES:
        image, mask = nodes.LoadImage().load_image(name)
        out[f"LoadImage.{name}.image"], out[f"LoadImage.{name}.mask"] = image, mask
        for channel in ("alpha", "red", "green", "blue"):
            out[f"LoadImageMask.{name}.{channel}"] = nodes.LoadImageMask().load_image(name, channel)[0]
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 12, 10, generator=g)
    mask[:, 4:8, 3:6] = 1.0
    out["mask"] = mask
    for expand, tapered in ((2, True), (-1, True), (1, False), (-2, False)):
        grown = nodes_mask.GrowMask.execute(mask.clone(), expand, tapered)[0]
        out[f"GrowMask.{expand}.{int(tapered)}"] = grown
    out["ThresholdMask.0.3"] = nodes_mask.ThresholdMask.execute(mask.clone(), 0.3)[0]
    out["InvertMask"] = nodes_mask.InvertMask.execute(mask.clone())[0]
    destination = torch.rand(2, 10, 12, 3, generator=g)
    source = torch.rand(1, 6, 5, 3, generator=g)
    small = torch.rand(1, 3, 4, generator=g)
    out["destination"], out["source"], out["small_mask"] = destination, source, small
    for key, args in (("masked", (3, 2, False, small)), ("plain", (9, 7, False, None)),
                      ("resized", (0, 0, True, small))):
        x, y, resize, m = args
        out[f"ImageCompositeMasked.{key}"] = nodes_mask.ImageCompositeMasked.execute(
            destination.clone(), source.clone(), x, y, resize, m)[0]
    with_alpha = torch.cat([source, torch.rand(1, 6, 5, 1, generator=g)], dim=-1)
    out["source_rgba"] = with_alpha
    out["ImageCompositeMasked.rgba_source"] = nodes_mask.ImageCompositeMasked.execute(
        destination.clone(), with_alpha.clone(), 2, 1, False, small)[0]
    out["JoinImageWithAlpha"] = nodes_compositing.JoinImageWithAlpha.execute(destination.clone(), small.clone())[0]
    picture = torch.rand(1, 9, 14, 3, generator=g)
    out["picture"] = picture
    for method in ("nearest-exact", "bilinear", "area", "bicubic", "lanczos", "bislerp"):
        for w, h, crop in ((20, 12, "disabled"), (8, 8, "center"), (0, 5, "disabled")):
            out[f"ImageScale.{method}.{w}x{h}.{crop}"] = nodes.ImageScale().upscale(picture.clone(), method, w, h,
                                                                                   crop)[0]
    from comfy_extras import nodes_post_processing

    as_image = nodes_mask.MaskToImage.execute(mask.clone())[0]
    out["MaskToImage"] = as_image
    for radius, sigma in ((3, 0.5), (2, 1.0)):
        blurred = nodes_post_processing.Blur.execute(as_image.clone(), radius, sigma)[0]
        out[f"ImageBlur.{radius}.{sigma}"] = blurred
    out["ImageToMask.green"] = nodes_mask.ImageToMask.execute(picture.clone(), "green")[0]
    out["EmptyImage"] = nodes.EmptyImage().generate(6, 4, 2, 0x3A7FC0)[0]
    save_file({k: v.contiguous().float() for k, v in out.items()}, str(HERE / "image_nodes.safetensors"))
    print(len(out), "tensors")


if __name__ == "__main__":
    main()
