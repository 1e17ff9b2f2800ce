"""``cascade-lab train CONFIG``: one run from a TOML file, also under ``torchrun`` / ``accelerate launch``."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def print_progress(event: Any) -> None:
    """One line per logged step, validation, checkpoint and sample batch (the CLI and %cascade train)."""
    if event.kind == "start":
        d = event.data
        print(f"{d['images']} images, {d['batches_per_epoch']} batches per epoch: {d['steps_per_epoch']} steps per "
              f"epoch, {d['epochs']} epoch(s), {event.total_steps} steps", flush=True)
    elif event.kind == "step":
        every = event.run.config.log_every_n_steps
        if every and (event.step % every == 0 or event.step == event.total_steps):
            d = event.data
            norms = (f"  keys scaled {d['keys_scaled']}  key norm avg {d['average_key_norm']:.3g} max "
                     f"{d['max_key_norm']:.3g}" if "keys_scaled" in d else "")  # --scale_weight_norms (kohya)
            print(f"step {event.step}/{event.total_steps}  loss {d['loss']:.4f}  raw {d['raw_loss']:.4f}  "
                  f"lr {d['lr']:.3g}{norms}", flush=True)
    elif event.kind == "val":
        print(f"step {event.step}: validation loss {event.data['val_loss']:.4f}", flush=True)
    elif event.kind == "checkpoint":
        print(f"step {event.step}: saved {event.data['folder']} and {event.data['file']}", flush=True)
    elif event.kind == "sample":
        print(f"step {event.step}: {len(event.data['images'])} sample image(s)", flush=True)


def run_train(config_path: str, overrides: list[str], quiet: bool = False) -> int:
    """Train as CONFIG says (``--set key=value`` overrides fields); exit 0 when finished or stopped."""
    from .config import TrainConfig, parse_value

    config = TrainConfig.from_toml(config_path)
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write key=value, e.g. --set max_train_steps=100")
        changes[key.strip()] = parse_value(value.strip())
    return _train(TrainConfig.coerce(config, **changes), quiet)


def run_kohya(argv: list[str]) -> int:
    """Train from kohya's command line (``stable_cascade_train_stage_c.py`` / ``..._c_network.py`` flags)."""
    from .config import TrainConfig
    from .kohya_args import parse_kohya

    fields, notices, quiet = parse_kohya(argv)
    if _is_main():
        for notice in notices:
            print(f"kohya flag: {notice}", file=sys.stderr, flush=True)
    return _train(TrainConfig.from_dict(fields, source="command line"), quiet)


def main(argv: list[str] | None = None) -> int:
    """``python -m cascade_lab.training`` (torchrun, ``accelerate launch -m``): a TOML or kohya's flags."""
    from .config import ConfigError
    from .kohya_args import is_kohya_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["export"], ["plan"]) and not os.path.isfile(argv[0]):
        return run_tool(argv[0], argv[1:])
    try:
        if is_kohya_command(argv) or not argv:
            return run_kohya(argv)
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set" and i + 1 < len(argv)]
        overrides += [f"strategy={argv[i + 1]}" for i, a in enumerate(argv) if a == "--strategy" and i + 1 < len(argv)]
        return run_train(argv[0], overrides, quiet="--quiet" in argv)
    except (ConfigError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"cascade-lab train: error: {exc}", file=sys.stderr, flush=True)
        return 2


def run_tool(name: str, argv: list[str]) -> int:
    """``cascade-lab train export CHECKPOINT -o FILE`` and ``cascade-lab train plan [...]``."""
    import argparse

    from .config import ConfigError

    parser = argparse.ArgumentParser(prog=f"cascade-lab train {name}")
    if name == "export":
        parser.description = ("write the single-file Stage C (official keys) of a sharded FSDP checkpoint, without "
                              "a process group or GPU")
        parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/step-*) or an output folder "
                            "(its latest checkpoint)")
        parser.add_argument("-o", "--output", default=None, help="the .safetensors file (default: inside the "
                            "checkpoint folder, named as the run names its export)")
        parser.add_argument("--save-precision", choices=["fp32", "bf16"], default=None,
                            help="default: the run's save_precision")
    else:
        from .memory_plan import add_plan_arguments

        parser.description = ("does a Stage C (--stage c) or Stage B (--stage b) fine-tune fit: memory per GPU by "
                              "variant, GPU count and strategy")
        add_plan_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if name == "export":
            from .export import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.output, args.save_precision), flush=True)
            return 0
        from .memory_plan import run_plan

        return run_plan(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"cascade-lab train {name}: error: {exc}\n")


def _train(config: Any, quiet: bool) -> int:
    from .run import train

    interrupted: list[bool] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("stopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        callback = None if quiet or not _is_main() else print_progress
        run = train(config, callback=callback, stop=lambda: bool(interrupted))
    finally:
        signal.signal(signal.SIGINT, previous)
    if _is_main():
        print(f"{run.status}: step {run.step}/{run.total_steps}; model {run.output_file}; "
              f"checkpoint {run.last_checkpoint}", flush=True)
    return 0 if run.status in ("finished", "stopped") else 1


__all__ = ["main", "print_progress", "run_kohya", "run_tool", "run_train"]
