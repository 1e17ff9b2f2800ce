"""The ``cascade-lab`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-lab", description="Stable Cascade from the command line.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list plugins, their hooks, registered names and load errors")
    sub.add_parser("samplers", help="list samplers")
    sub.add_parser("schedulers", help="list schedulers")
    sub.add_parser("variants", help="list weight variants")
    gen = sub.add_parser("generate", help="text to image (img2img with --image)")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, help="PNG file to write (batches get _0, _1, ...); an existing "
                     "file is kept and the next free OUTPUT_00001.png written, unless --overwrite")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    gen.add_argument("--negative", default="", help="negative prompt (replaces the unconditional caption)")
    gen.add_argument("--variant", default="auto", help="weight variant (see `cascade-lab variants`)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--size", default=None, help="WIDTHxHEIGHT, e.g. 1024x1536")
    gen.add_argument("--width", type=int, default=None, help="default 1024 (ComfyUI img2img: the image's)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--steps", "--steps-c", dest="steps_c", type=int, default=None, help="Stage C steps (20)")
    gen.add_argument("--steps-b", type=int, default=None, help="Stage B steps (10)")
    gen.add_argument("--cfg", "--cfg-c", dest="cfg_c", type=float, default=None, help="Stage C CFG (4)")
    gen.add_argument("--cfg-b", type=float, default=None, help="Stage B CFG (1.1)")
    gen.add_argument("--shift", "--shift-c", dest="shift_c", type=float, default=None, help="Stage C shift (2)")
    gen.add_argument("--shift-b", type=float, default=None, help="Stage B shift (1)")
    gen.add_argument("--sampler", "--sampler-c", dest="sampler_c", default=None,
                     help="Stage C sampler (official: ddpm; --compat comfyui: euler_ancestral); see `samplers`")
    gen.add_argument("--sampler-b", default=None, help="Stage B sampler (default: as Stage C's default)")
    gen.add_argument("--scheduler", "--scheduler-c", dest="scheduler_c", default=None,
                     help="Stage C scheduler (official: cosine; --compat comfyui: simple); see `schedulers`")
    gen.add_argument("--scheduler-b", default=None)
    gen.add_argument("--cfg-rho", type=float, default=None, help="CFG rescale mix (official 0.7, ComfyUI 0)")
    gen.add_argument("--compat", choices=["official", "comfyui"], default="official",
                     help="comfyui: ComfyUI's seeding, latent sizes, CFG and samplers, for ComfyUI's image with "
                          "ComfyUI's seed and settings (docs/comfyui.md)")
    gen.add_argument("--denoise", type=float, default=None, help="ComfyUI's partial schedule, in (0, 1]")
    gen.add_argument("--seed-b", type=int, default=None, help="Stage B's own seed under --compat comfyui")
    gen.add_argument("--compression", type=float, default=None,
                     help="image pixels per Stage C latent pixel (official 42.67, ComfyUI 42)")
    gen.add_argument("--image", default=None, help="img2img input image")
    gen.add_argument("--strength", type=float, default=None, help="img2img strength (default 0.8 with --image)")
    gen.add_argument("--control", action="append", default=[], metavar="KIND:IMAGE[:STRENGTH]",
                     help="a Stage C ControlNet (canny, inpainting with --mask, super_resolution), repeatable")
    gen.add_argument("--controlnet", action="append", default=[], metavar="FILE",
                     help="the ControlNet file of each --control (then --upscale), in the same order; none: found "
                          "like the stages")
    gen.add_argument("--mask-grow", type=int, default=0, metavar="PX", help="grow the inpainting mask by PX pixels")
    gen.add_argument("--mask-feather", type=int, default=0, metavar="PX",
                     help="blur the mask's edge over PX pixels for the composite over the original")
    gen.add_argument("--upscale", default=None, metavar="2x",
                     help="upscale --image 2x with the super-resolution ControlNet at the official settings")
    gen.add_argument("--mask", default=None, help="inpainting mask: an image (white = regenerate) or boxes "
                     "x0,y0,x1,y1[;...]")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the Stage C and B networks (pays off on GPUs; see benchmarks/RESULTS.md)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    tr = sub.add_parser("train", help="fine-tune Stage C or Stage B (LoRA or full) from a TOML config or kohya's "
                        "flags (`cascade-lab train --help`); works under torchrun",
                        epilog="also: `cascade-lab train export CHECKPOINT -o FILE` (a sharded FSDP checkpoint → "
                        "the single file) and `cascade-lab train plan` (memory per GPU; --help for each)")
    tr.add_argument("config", help="training TOML: cascade_lab.training.TrainConfig fields (+ dataset tables)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set max_train_steps=100 (repeatable)")
    tr.add_argument("--quiet", action="store_true", help="no progress lines")
    tr.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default=None,
                    help="several processes: ddp, or fsdp (FSDP2, sharded; full fine-tunes); same as --set strategy=")
    comfy = sub.add_parser("comfyui", help="run a ComfyUI workflow (UI or API .json, or a ComfyUI PNG)")
    from .comfyui.cli import add_arguments

    add_arguments(comfy)
    return parser


def parse_size(text: str) -> tuple[int, int]:
    """'1024x1536' → (1024, 1536) as (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 1024x1024") from None
    return w, h


def controls_from_args(args: argparse.Namespace) -> list[Any]:
    """--control / --controlnet / --mask / --upscale → `Control` records (checked; files must exist)."""

    from .controls import Control, parse_boxes, parse_spec, parse_upscale

    n_controls = len(args.control) + (args.upscale is not None)
    if args.controlnet and len(args.controlnet) != n_controls:
        raise ValueError(f"{n_controls} control(s) (--control, --upscale) but {len(args.controlnet)} --controlnet: "
                         "give the ControlNet file of each, in the same order, or none to have them found")
    for file in args.controlnet:
        if not Path(file).is_file():
            raise FileNotFoundError(f"--controlnet {file!r}: file not found")
    files: list[str | None] = list(args.controlnet) or [None] * n_controls
    if (args.mask is not None or args.mask_grow or args.mask_feather) and not any(
            c.startswith("inpainting:") for c in args.control):
        raise ValueError("--mask / --mask-grow / --mask-feather are for an inpainting control: add --control "
                         "inpainting:IMAGE")
    controls = []
    for spec, file in zip(args.control, files, strict=False):
        kind, image, strength = parse_spec(spec)
        if not Path(image).is_file():
            raise FileNotFoundError(f"--control image {image!r}: file not found")
        mask = None
        if kind == "inpainting" and args.mask is not None:
            mask = parse_boxes(args.mask)
            mask = mask if mask is not None else args.mask
        inpaint = kind == "inpainting"
        controls.append(Control(kind, image, strength, mask=mask, model=file, grow=args.mask_grow if inpaint else 0,
                                feather=args.mask_feather if inpaint else 0).validate())
    if args.upscale is not None:
        parse_upscale(args.upscale)
        if not args.image:
            raise ValueError("--upscale 2x needs --image IMAGE: the picture to upscale")
        if args.strength is not None or args.denoise is not None:
            raise ValueError("--upscale starts from noise with the image as its control: drop --strength/--denoise")
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image!r}: file not found")
        controls.append(Control("super_resolution", args.image, 1.0, model=files[-1]).validate())
    return controls


def generate(args: argparse.Namespace) -> int:
    from .api import Cascade
    from .results import SaveError, check_output_path

    check_output_path(args.output)  # before any work: an unwritable path would lose the image

    width, height = parse_size(args.size) if args.size else (args.width, args.height)
    strength = args.strength if args.strength is not None else (0.8 if args.image and not args.denoise else 1.0)
    options = {key: getattr(args, key) for key in ("sampler_c", "sampler_b", "scheduler_c", "scheduler_b", "cfg_rho",
                                                   "denoise", "seed_b", "compression")
               if getattr(args, key) is not None}
    options["controls"] = controls_from_args(args)
    stage_options = {key: getattr(args, key) for key in ("steps_c", "steps_b", "cfg_c", "cfg_b", "shift_c", "shift_b")
                     if getattr(args, key) is not None}  # unset: GenerationParams' official defaults
    image = args.image
    if args.upscale is not None:  # the image is the control; the official SR settings under the flags given
        from .controls import upscale_options
        from .images import image_size

        size = image_size(args.image, "--image")
        given = {**stage_options, **{k: v for k, v in (("width", width), ("height", height)) if v is not None}}
        settings = upscale_options(size, {**options, **given})
        width, height = settings.pop("width"), settings.pop("height")
        options.update(settings)
        stage_options = {}
        image, strength = None, 1.0
    for kind in ("sampler", "scheduler"):  # one name for Stage C and no Stage B name: both stages
        if f"{kind}_c" in options and f"{kind}_b" not in options:
            options[f"{kind}_b"] = options[f"{kind}_c"]
    bars: dict[str, object] = {}

    def progress(event: Any) -> None:
        from tqdm.auto import tqdm

        stage, steps = event.stage, event.steps
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()  # type: ignore[attr-defined]
            bar = bars[stage] = tqdm(total=steps, desc=f"Stage {stage.upper()}", file=sys.stderr)
        bar.update(1)  # type: ignore[attr-defined]

    cascade = Cascade(args.variant, device=args.device, dtype=args.dtype, compile=args.compile)
    result = cascade.generate(
        args.prompt, args.negative, width=width, height=height, batch_size=args.batch_size, seed=args.seed,
        image=image, strength=strength, compat=args.compat, callback=None if args.quiet else progress,
        **stage_options, **options,
    )
    for bar in bars.values():
        bar.close()  # type: ignore[attr-defined]
    try:
        paths = result.save(args.output, overwrite=args.overwrite)
    except SaveError as exc:  # keep the work: write it where it can go, say where
        import tempfile

        rescue = Path(tempfile.gettempdir()) / f"cascade_lab_{result.params.seed}.png"
        saved = result.save(rescue)
        print(f"cascade-lab generate: error: {exc}; wrote it to {', '.join(map(str, saved))} instead",
              file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path} (seed {result.params.seed}, variant {result.params.variant})")
    return 0


def _version() -> str:
    from . import __version__

    return f"cascade-lab {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.formatwarning = lambda message, category, *_a, **_k: f"{category.__name__}: {message}\n"
    if raw[:1] == ["train"] and raw[1:2] in (["export"], ["plan"]) and not Path(raw[1]).is_file():
        from .training.cli_entry import run_tool

        return run_tool(raw[1], raw[2:])
    if raw[:1] == ["train"]:
        from .training.kohya_args import is_kohya_command

        if is_kohya_command(raw[1:]):  # kohya's flags as they are (--help shows them, grouped as kohya does)
            from .training.cli_entry import run_kohya

            try:
                return run_kohya(raw[1:])
            except (ValueError, FileNotFoundError, TypeError) as exc:
                parser.exit(2, f"cascade-lab train: error: {exc}\n")
    args = parser.parse_args(argv)
    from . import listing
    from .registry import UnknownNameError

    if args.command == "generate":
        try:
            return generate(args)
        except (ValueError, UnknownNameError, FileNotFoundError, TypeError) as exc:
            parser.exit(2, f"cascade-lab generate: error: {exc}\n")
        except RuntimeError as exc:
            from .pipeline import NonFiniteLatent

            if not isinstance(exc, NonFiniteLatent):
                raise
            parser.exit(1, f"cascade-lab generate: error: {exc}\n")
    if args.command == "train":
        from .training.cli_entry import run_train

        try:
            strategy = [f"strategy={args.strategy}"] if args.strategy else []
            return run_train(args.config, args.overrides + strategy, quiet=args.quiet)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            parser.exit(2, f"cascade-lab train: error: {exc}\n")
    if args.command == "comfyui":
        from .comfyui import WorkflowError
        from .comfyui.cli import run_command

        try:
            return run_command(args)
        except (WorkflowError, ValueError, UnknownNameError, FileNotFoundError) as exc:
            parser.exit(2, f"cascade-lab comfyui {args.action}: error: {exc}\n")
    if args.command == "plugins":
        print(listing.plugins_text())
    else:
        print(listing.kind_text(args.command[:-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
