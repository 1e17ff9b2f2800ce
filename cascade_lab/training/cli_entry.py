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
    if event.kind == "step":
        every = event.run.config.log_every_n_steps
        if every and (event.step % every == 0 or event.step == event.total_steps):
            d = event.data
            print(f"step {event.step}/{event.total_steps}  loss {d['loss']:.4f}  raw {d['raw_loss']:.4f}  "
                  f"lr {d['lr']:.3g}", flush=True)
    elif event.kind == "val":
        print(f"step {event.step}: validation loss {event.data['val_loss']:.4f}", flush=True)
    elif event.kind == "checkpoint":
        print(f"step {event.step}: saved {event.data['folder']} and {event.data['file']}", flush=True)
    elif event.kind == "sample":
        print(f"step {event.step}: {len(event.data['images'])} sample image(s)", flush=True)


def run_train(config_path: str, overrides: list[str], quiet: bool = False) -> int:
    """Train as CONFIG says (``--set key=value`` overrides fields); exit 0 when finished or stopped."""
    from .config import TrainConfig, parse_value
    from .run import train

    config = TrainConfig.from_toml(config_path)
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write key=value, e.g. --set max_train_steps=100")
        changes[key.strip()] = parse_value(value.strip())
    config = TrainConfig.coerce(config, **changes)
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


__all__ = ["run_train"]
