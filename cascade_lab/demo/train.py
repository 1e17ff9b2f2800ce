"""Retrain the demo cascade from scratch: ``python -m cascade_lab.demo.train --out DIR [--quick]``.

Order, as Stable Cascade's own recipe (frozen encoders first, then the two diffusion stages):
1. render the synthetic world to a kohya image folder (PNG + caption .txt);
2. Stage A as an autoencoder;
3. the semantic encoder with the Previewer as decoder, and the text tower (see `parts`);
4. Stage C with `cascade_lab.training.train` itself (full fine-tune, cached latents and text, GDF ε-loss);
5. Stage B with the GDF ε-loss on Stage A latents, conditioned on the encoder latents.
Then the weights are written to DIR (fp16 safetensors, what ``cascade_lab/demo/weights`` ships) with
``report.json``: steps, seconds per phase and the hit rates over the held-out prompts.
Every draw is seeded, so a rerun on the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FROZEN = ("stage_a", "effnet", "previewer", "text_encoder")  # trained first; Stage C and Stage B need them


@dataclass(frozen=True)
class Plan:
    """How long each part trains (optimizer steps) on how many rendered images, and how.

    ``noise_shift`` 4 trains Stage C and Stage B at logSNR − 2·ln 4 (`TrainConfig.noise_shift`). With the
    official shift 1 both learnt to copy the layout from the noisy input, which shows it from t ≈ 0.9 on, and
    at the noisiest steps, where only the prompt can say where and what, drew a blob in the middle. Measured
    on 24–32 held-out prompts: Stage C's x0 prediction at t = 0.95 put the shape at the prompt's position 38 %
    of the time with shift 1, 100 % with shift 4 (and the coordinate channels); Stage B, given the true encoder
    latent, drew the right shape and colour 56 % of the time after 2000 steps with shift 1, 88 % with shift 4.
    """

    images: int = 6000
    batch: int = 32
    stage_a: int = 1200
    encoder: int = 800
    stage_c: int = 4000
    stage_b: int = 7000
    eval_prompts: int = 64
    lr_stage_a: float = 2e-3
    lr_encoder: float = 2e-3
    lr_stage_c: float = 1e-3
    lr_stage_b: float = 2e-3
    noise_shift: float = 4.0  # Stage C's and Stage B's `TrainConfig.noise_shift`

    @classmethod
    def quick(cls) -> Plan:
        """A few hundred steps per part (~1.5 min): the CI check that the recipe learns end to end.

        At this budget the cascade already paints the prompt's background through all three stages (measured:
        88 % on the held-out prompts, chance 1/8); the shape, its colour and its place need the full plan's
        thousands of steps (2–14 % here, 91–100 % there).
        """
        return cls(images=800, batch=16, stage_a=150, encoder=250, stage_c=300, stage_b=300, eval_prompts=50)


def part_config(work: Path, name: str, steps: int, batch: int, lr: float, seed: int, **extra: Any) -> Any:
    """A `TrainConfig` for one part: 128 px images at the kohya scale (the encoder sees them as is), cosine LR."""
    from ..training import TrainConfig

    fields = {
        "mode": "full", "train_data_dir": str(work / "data"), "resolution": 128, "training_scale": "kohya",
        "enable_bucket": False, "train_batch_size": batch, "learning_rate": lr, "max_train_steps": steps,
        "lr_scheduler": "cosine_with_warmup", "lr_warmup_steps": max(1, steps // 20), "seed": seed,
        "output_dir": str(work / name), "cache_dir": str(work / "cache"), "val_every_n_steps": 0,
        "log_every_n_steps": 0, "caption_dropout_rate": 0.0, "cache_latents": False,
        "cache_text_encoder_outputs": False,
    }  # fmt: skip
    return TrainConfig(**{**fields, **extra}).validate()


def data_of(config: Any) -> Any:
    from ..training.data import TrainingData
    from ..training.toml_config import dataset_config_for

    return TrainingData(dataset_config_for(config), scale=config.scale_factor, seed=config.seed)


def progress(name: str, total: int, log: Any) -> Any:
    """A step callback logging five times per part."""
    def show(entry: dict[str, Any]) -> None:
        if entry["step"] % max(1, total // 5) == 0:
            log(f"  {name} step {entry['step']}/{total}: loss {entry['raw_loss']:.4f}")
    return show


def train_stage_a(stages: Any, work: Path, plan: Plan, seed: int, log: Any = print) -> list[dict[str, Any]]:
    from .parts import StageATrainer

    cfg = part_config(work, "stage_a", plan.stage_a, plan.batch, plan.lr_stage_a, seed)
    return StageATrainer(cfg, stages.stage_a, data_of(cfg)).run(progress("stage_a", plan.stage_a, log))


def train_encoder(stages: Any, work: Path, plan: Plan, seed: int, log: Any = print) -> list[dict[str, Any]]:
    from .parts import EncoderTrainer, SemanticPretraining
    from .world import SIZE

    cfg = part_config(work, "encoder", plan.encoder, plan.batch, plan.lr_encoder, seed)
    pretraining = SemanticPretraining(stages.effnet, stages.previewer, stages.text_encoder.model,
                                      latent_hw=SIZE // stages.effnet.downscale)
    history = EncoderTrainer(cfg, pretraining, data_of(cfg), stages.text_encoder).run(
        progress("encoder", plan.encoder, log))
    for module in (stages.effnet, stages.previewer, stages.text_encoder.model):
        module.eval().requires_grad_(False)
    return history


def train_stage_c(stages: Any, work: Path, plan: Plan, seed: int, log: Any = print) -> list[dict[str, Any]]:
    """`cascade_lab.training.train` as a user runs it: full fine-tune, cached latents and text, adaptive weights."""
    from ..training import train

    cfg = part_config(work, "stage_c", plan.stage_c, plan.batch, plan.lr_stage_c, seed, caption_dropout_rate=0.1,
                      cache_latents=True, cache_text_encoder_outputs=True, adaptive_loss_weight=True, val_items=16,
                      noise_shift=plan.noise_shift)
    show = progress("stage_c", plan.stage_c, log)
    run = train(cfg, stages=stages, callback=lambda e: show(e.data) if e.kind == "step" else None)
    stages.stage_c.eval().requires_grad_(False)
    return run.losses


def train_stage_b(stages: Any, work: Path, plan: Plan, seed: int, log: Any = print) -> list[dict[str, Any]]:
    from .parts import StageBTrainer

    cfg = part_config(work, "stage_b", plan.stage_b, plan.batch, plan.lr_stage_b, seed, caption_dropout_rate=0.1,
                      noise_shift=plan.noise_shift)
    trainer = StageBTrainer(cfg, stages.stage_b, data_of(cfg), effnet=stages.effnet, stage_a=stages.stage_a,
                            text_encoder=stages.text_encoder, cache_dir=work / "cache")
    trainer.prepare_caches(list(range(len(trainer.data.records))))
    return trainer.run(progress("stage_b", plan.stage_b, log))


def _stage_c_process(work: Path, plan: Plan, seed: int, threads: int | None) -> None:
    """Child process: load the frozen parts, train Stage C, leave its weights in ``work/stage_c.pt``."""
    import torch

    from .models import fresh_stages, load_weights

    if threads:
        torch.set_num_threads(threads)
    stages = load_weights(fresh_stages(seed=seed), work / "frozen", parts=FROZEN)
    start = time.perf_counter()
    losses = train_stage_c(stages, work, plan, seed, log=lambda line: print(f"[stage_c process] {line}", flush=True))
    torch.save({"state": stages.stage_c.state_dict(), "losses": losses, "seconds": time.perf_counter() - start},
               work / "stage_c.pt")


def _start_stage_c(stages: Any, work: Path, plan: Plan, seed: int, threads: int | None) -> Any:
    import multiprocessing

    import torch

    from .models import save_weights

    save_weights(stages, work / "frozen", dtype=torch.float32, parts=FROZEN)
    process = multiprocessing.get_context("spawn").Process(target=_stage_c_process, args=(work, plan, seed, threads),
                                                           name="cascade_lab demo stage_c")
    process.start()
    return process


def _join_stage_c(process: Any, stages: Any, work: Path) -> tuple[list[dict[str, Any]], float]:
    """Wait for the Stage C process; load what it trained. (its loss history, its training seconds)"""
    import torch

    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the Stage C process failed (exit code {process.exitcode}); its output is above; "
                           "rerun with --jobs 1 to train everything in this process")
    result = torch.load(work / "stage_c.pt")
    stages.stage_c.load_state_dict(result["state"])
    stages.stage_c.eval().requires_grad_(False)
    return result["losses"], float(result["seconds"])


def train_demo(out: str | Path, plan: Plan = Plan(), *, work: str | Path | None = None, seed: int = 0,
               threads: int | None = 1, jobs: int = 2, log: Any = print) -> dict[str, Any]:
    """Train every part, write the weights to `out`, return the report (also written as ``out/report.json``).

    One thread per process by default: these models are small, and on a busy 2-core machine two OpenMP
    threads spend most of their time waiting for each other (measured: Stage B steps 15× slower with 2
    threads under load). With ``jobs=2`` Stage C trains in a second process while Stage B trains here, from
    the frozen parts saved in float32; every draw of each part is seeded, so each part's training does not
    depend on which process runs it.
    """
    import torch

    from . import world
    from .evaluate import evaluate
    from .models import fresh_stages, load_weights, save_weights

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    torch.manual_seed(seed)
    seconds: dict[str, float] = {}
    losses: dict[str, float] = {}
    start = clock = time.perf_counter()

    def done(name: str, history: list[dict[str, Any]] | None = None, took: float | None = None) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock if took is None else took, 1)
        clock = time.perf_counter()
        if history:
            tail = [h["raw_loss"] for h in history[-20:]]
            losses[name] = round(sum(tail) / len(tail), 5)
        log(f"{name}: {seconds[name]:.0f} s" + (f", final loss {losses[name]:.4f}" if name in losses else ""))

    world.write_dataset(work / "data", plan.images, seed=seed)
    done("render")
    stages = fresh_stages(seed=seed)
    done("stage_a", train_stage_a(stages, work, plan, seed, log))
    done("encoder", train_encoder(stages, work, plan, seed, log))
    if jobs > 1:  # Stage C and Stage B need only the frozen parts: train them side by side, one core each
        child = _start_stage_c(stages, work, plan, seed, threads)
        done("stage_b", train_stage_b(stages, work, plan, seed, log))
        history, took = _join_stage_c(child, stages, work)
        done("stage_c", history, took)  # ran beside Stage B: not part of the sum of the other phases
    else:
        done("stage_c", train_stage_c(stages, work, plan, seed, log))
        done("stage_b", train_stage_b(stages, work, plan, seed, log))
    files = save_weights(stages, out)
    train_seconds = round(time.perf_counter() - start, 1)
    rates, _ = evaluate(load_weights(fresh_stages(), out), plan.eval_prompts)  # the stored (fp16) weights
    done("evaluate")
    report = {"plan": asdict(plan), "seed": seed, "jobs": jobs, "seconds": seconds, "train_seconds": train_seconds,
              "final_losses": losses, "hit_rates": rates, "eval_prompts": plan.eval_prompts,
              "threads": torch.get_num_threads(), "files": {p.name: p.stat().st_size for p in files}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"trained in {train_seconds / 60:.1f} min; held-out hit rates: "
        + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cascade_lab.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the weights and report.json")
    parser.add_argument("--quick", action="store_true", help="a few hundred steps per part (CI)")
    parser.add_argument("--work", default=None, help="scratch folder (images, caches); default OUT/work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                        help="2: Stage C trains in a second process beside Stage B (1: one after the other)")
    args = parser.parse_args(argv)
    train_demo(args.out, Plan.quick() if args.quick else Plan(), work=args.work, seed=args.seed,
               threads=args.threads, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
