"""Train a demo ControlNet: ``python -m cascade_lab.demo.train_controlnet --out DIR [--quick] [--kind canny]``.

Stage C, the text tower and the encoder stay frozen at the shipped demo weights (`models.build_demo`); only the
`DemoControlNet` learns, with Stage C's own training step (`training.loop.Trainer`: GDF noising at the demo
plan's ``noise_shift``, the ε target of the v-predicting `DemoStageC`, adaptive loss weights, cached latents and
text, 10 % caption dropout), its features added to the frozen Stage C's ResBlocks as at inference. The control
input is the real filter (`controls.filters.canny`) of the rendered training image.

"Control beats text" (canny): for half of the samples the caption names another position than the one drawn
(`MisleadingCaptions`), so the ControlNet learns to move the shape to its outline whatever the prompt says.
Inpainting (``--kind inpainting``): one seeded rectangle per image is painted white and given as the mask
(`filters.inpainting`), the caption stays true; it is measured on held-out shapes half hidden
(`evaluate.evaluate_inpainting`). Not shipped: trained as the canny one (1500 steps, 12 min), it measured the same
as no ControlNet at all (64 cases: everything right 97 % both, overlap with the original shape 0.907 both), since
in this world the caption already fixes all that the mask hides but a few pixels of jitter and size.
The weights go to ``DIR/controlnet_<kind>.safetensors`` (fp16, what ``cascade_lab/demo/weights`` ships) and the
numbers to ``DIR/controlnet_report.json`` (steps, seconds, final loss, hit rates with and without the control).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .train import Plan, part_config, progress
from .world import POSITIONS, parse_caption


@dataclass(frozen=True)
class ControlPlan:
    """Steps, batch, images and the share of misleading captions of one ControlNet training."""

    images: int = 3000
    batch: int = 32
    steps: int = 1500
    lr: float = 1e-3
    misleading: float = 0.5  # of the captions name another position than the image's
    eval_cases: int = 64

    @classmethod
    def quick(cls) -> ControlPlan:
        """A few dozen steps on a few hundred images (~30 s): the CI check that the recipe learns."""
        return cls(images=256, batch=8, steps=40, lr=2e-3, eval_cases=8)


def mislead(caption: str, draw: float, pick: int, rate: float) -> str:
    """`caption` with its position replaced by another (the `pick`-th of the other eight) when `draw` < `rate`;
    an empty caption (dropout) or one that is no demo scene stays as it is."""
    scene = parse_caption(caption) if caption else None
    if scene is None or draw >= rate:
        return caption
    others = [p for p in POSITIONS if p != scene.position]
    return replace(scene, position=others[pick % len(others)]).caption


def training_data(config: Any, misleading: float) -> Any:
    """`TrainingData` of `config` whose captions `mislead` at rate `misleading` (seeded per sample, as dropout)."""
    from ..training.data import TrainingData
    from ..training.toml_config import dataset_config_for

    class MisleadingCaptions(TrainingData):
        def caption(self, index: int, epoch: int, rng: random.Random, step: int | None = None,
                    total_steps: int | None = None) -> str:
            text = super().caption(index, epoch, rng, step, total_steps)
            draw, pick = rng.random(), rng.randrange(len(POSITIONS) - 1)  # always drawn: a fixed stream
            return mislead(text, draw, pick, misleading)

    return MisleadingCaptions(dataset_config_for(config), scale=config.scale_factor, seed=config.seed)


def training_mask(size: int, rng: random.Random) -> Any:
    """An inpainting mask [1, 1, size, size] (1 = regenerate): one rectangle, each side 1/6 to 3/4 of the image."""
    import torch

    w, h = (rng.randint(size // 6, 3 * size // 4) for _ in range(2))
    x, y = rng.randrange(size - w + 1), rng.randrange(size - h + 1)
    mask = torch.zeros(1, 1, size, size)
    mask[..., y:y + h, x:x + w] = 1.0
    return mask


def control_input(kind: str, image: Any, rng: random.Random) -> Any:
    """The ControlNet input of images [B, 3, H, W] in [0, 1], made by the filter inference uses (inpainting: with
    a `training_mask` drawn from `rng`)."""
    from ..controls import filters

    if kind == "canny":
        return filters.canny(image)  # (B, 1, H, W) in [0, 1]
    if kind == "inpainting":
        return filters.inpainting(image, training_mask(image.shape[-1], rng))  # (B, 4, H, W)
    raise ValueError(f"demo ControlNet training knows kinds canny and inpainting, not {kind!r}")


def make_trainer(config: Any, net: Any, data: Any, stages: Any, kind: str) -> Any:
    """A `ControlNetTrainer` (the class is built here: importing this module imports no torch)."""
    import torch

    from ..training import distributed as dist
    from ..training.data import derive_seed
    from ..training.loop import Trainer
    from ..training.models import TrainingModels
    from .parts import PartTrainer

    class ControlNetTrainer(PartTrainer):
        """Stage C's `Trainer` step with the ControlNet as the trained model and Stage C frozen behind it."""

        def __init__(self) -> None:
            # PartTrainer's models have no encoders; the latent and text caches need the frozen ones
            models = TrainingModels(net, {"effnet": lambda: stages.effnet, "text_encoder": lambda: stages.text_encoder},
                                    source="demo")
            Trainer.__init__(self, config, models, data, dist.setup(config.device))
            self.frozen = stages.stage_c.to(self.device).eval().requires_grad_(False)
            self.controls: dict[int, torch.Tensor] = {}  # record index -> control input, uint8

        def control(self, index: int) -> torch.Tensor:
            if index not in self.controls:  # the filter once per image: (1, c_in, H, W) in [0, 1] -> uint8
                rng = random.Random(derive_seed(config.seed, "control", index))
                x = control_input(kind, self.data.image(index)[None], rng)[0]
                self.controls[index] = x.mul(255).round().to(torch.uint8)
            return self.controls[index].float() / 255

        def inputs(self, counter: int) -> dict[str, torch.Tensor]:
            batch = super().inputs(counter)  # Trainer's: latents, text, t, ε (captions misled)
            indices, _, _ = self.local_batch(counter)
            return {**batch, "control": torch.stack([self.control(i) for i in indices])}  # (B, c_in, H, W)

        def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], t: torch.Tensor | None = None,
                    epsilon: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
            dev = self.device
            d = self.diffused(batch, t, epsilon)
            cnet = model(batch["control"].to(dev))  # 8 entries of (B, 64, 8, 8)
            clip_img = torch.zeros(d.noised.size(0), 1, self.frozen.clip_img_mapper.in_features, device=dev)
            pred = self.frozen(d.noised, d.noise_cond, batch["clip_text"].to(dev), batch["clip_text_pooled"].to(dev),
                               clip_img, cnet=cnet)
            return self.loss_terms(pred, d)

    return ControlNetTrainer()


def train_controlnet(out: str | Path, plan: ControlPlan = ControlPlan(), *, kind: str = "canny",
                     work: str | Path | None = None, seed: int = 0, threads: int | None = 1,
                     log: Any = print) -> dict[str, Any]:
    """Train the `kind` ControlNet on the shipped demo cascade, write it and its report to `out`, return the report.

    One thread by default, as `train.train_demo` (small models on a busy 2-core machine)."""
    import torch

    from . import world
    from .evaluate import evaluate_control, evaluate_inpainting
    from .models import DemoControlNetConfig, build_demo, load_controlnet, save_controlnet

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    torch.manual_seed(seed)
    start = time.perf_counter()
    world.write_dataset(work / "data", plan.images, seed=seed)
    stages = build_demo()
    config = part_config(work, f"controlnet_{kind}", plan.steps, plan.batch, plan.lr, seed, caption_dropout_rate=0.1,
                         cache_latents=True, cache_text_encoder_outputs=True, adaptive_loss_weight=True,
                         noise_shift=Plan().noise_shift)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DemoControlNetConfig.of(kind).build()
    misleading = plan.misleading if kind == "canny" else 0.0  # an inpainting prompt describes what to paint
    trainer = make_trainer(config, net, training_data(config, misleading), stages, kind)
    trainer.prepare_caches(list(range(len(trainer.data.records))))
    prepared = time.perf_counter()
    history = trainer.run(progress(f"controlnet_{kind}", plan.steps, log))
    train_seconds = time.perf_counter() - prepared
    path = save_controlnet(net, kind, out)
    tail = [h["raw_loss"] for h in history[-20:]]
    log(f"controlnet_{kind}: {plan.steps} steps in {train_seconds:.0f} s, final loss {sum(tail) / len(tail):.4f}")
    stored = load_controlnet(kind, path)  # the fp16 file, as shipped
    measure = evaluate_control if kind == "canny" else evaluate_inpainting
    rates = {name: measure(plan.eval_cases, controlnet=stored, control=use, seed=seed)[0]
             for name, use in (("with_control", True), ("without_control", False))}
    report = {"kind": kind, "plan": asdict(plan), "seed": seed, "noise_shift": Plan().noise_shift,
              "prepare_seconds": round(prepared - start, 1), "train_seconds": round(train_seconds, 1),
              "first_losses": [round(h["raw_loss"], 5) for h in history[:5]],
              "final_loss": round(sum(tail) / len(tail), 5), "eval_cases": plan.eval_cases, "hit_rates": rates,
              "threads": torch.get_num_threads(), "file_bytes": path.stat().st_size}
    report_path = out / "controlnet_report.json"
    reports = json.loads(report_path.read_text()) if report_path.is_file() else {}
    reports[kind] = report
    report_path.write_text(json.dumps(reports, indent=2) + "\n")
    key = "position_and_shape" if kind == "canny" else "all"
    log(f"held-out hit rates over {plan.eval_cases} cases ({key}): "
        + "; ".join(f"{name} {r[key]:.0%}" for name, r in rates.items()))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cascade_lab.demo.train_controlnet",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for controlnet_<kind>.safetensors and the report")
    parser.add_argument("--kind", default="canny", choices=["canny", "inpainting"])
    parser.add_argument("--quick", action="store_true", help="a few dozen steps (CI)")
    parser.add_argument("--work", default=None, help="scratch folder (images, caches); default OUT/work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    train_controlnet(args.out, ControlPlan.quick() if args.quick else ControlPlan(), kind=args.kind, work=args.work,
                     seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
