"""One output folder holds one run: a folder with a previous run is refused unless the user resumes or overwrites.

kohya names the exported model ``<name>-000001.safetensors`` after epoch 1, ``<name>-step00000500.safetensors``
at a step save and ``<name>.safetensors`` at the end; `save_last_n_epochs` / `save_last_n_steps` delete only
per-epoch / per-step files this run (or the run it resumes) wrote, which the checkpoints list, so files of
another run in the same folder are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import ConfigError, TrainConfig


def previous_run(config: TrainConfig) -> list[str]:
    """What in `config.output_dir` belongs to an earlier run (empty: the folder is free)."""
    from .checkpoint import COMPLETE

    out = Path(config.output_dir)
    found = []
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and any((p / COMPLETE).is_file() for p in checkpoints.glob("step-*")):
        found.append(str(checkpoints))
    if (out / "run.json").is_file():
        found.append(str(out / "run.json"))
    if (out / f"{config.name}.safetensors").is_file():
        found.append(str(out / f"{config.name}.safetensors"))
    return found


def claim_output_dir(config: TrainConfig) -> None:
    """Refuse an output folder holding a previous run unless resume or overwrite is set; overwrite clears it."""
    if config.resume:
        return
    found = previous_run(config)
    if not found:
        return
    if not config.overwrite:
        raise ConfigError(
            f"output_dir {config.output_dir!r} holds a previous run ({', '.join(found)}); its model and "
            "checkpoints would be mixed with this run's. Use another output_dir, resume it (resume = \"auto\", "
            "kohya: --resume), or start afresh with overwrite = true (--overwrite), which deletes its checkpoints")
    out = Path(config.output_dir)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "run.json").unlink(missing_ok=True)


def epoch_file(config: TrainConfig, epoch: int) -> Path:
    """kohya's per-epoch model name: ``<output_dir>/<name>-000001.safetensors``."""
    return Path(config.output_dir) / f"{config.name}-{epoch:06d}.safetensors"


def prune_epoch_files(config: TrainConfig, written: list[str]) -> list[str]:
    """Delete this run's per-epoch files beyond the last `save_last_n_epochs`; returns the ones kept."""
    keep = config.save_last_n_epochs
    if not keep or len(written) <= keep:
        return written
    for name in written[:-keep]:
        (Path(config.output_dir) / name).unlink(missing_ok=True)
    return written[-keep:]


def step_file(config: TrainConfig, step: int) -> Path:
    """kohya's step-save model name: ``<output_dir>/<name>-step00000500.safetensors``."""
    return Path(config.output_dir) / f"{config.name}-step{step:08d}.safetensors"


def prune_step_files(config: TrainConfig, written: list[str], step: int) -> list[str]:
    """kohya's `save_last_n_steps`: at a step save, this run's step files of `save_last_n_steps` + 1 or more steps
    ago (their step rounded down to a save) are deleted; returns the ones kept."""
    n, every = config.save_last_n_steps, config.save_every_n_steps
    if not n or not every:
        return written
    oldest = step - n - 1
    oldest -= oldest % every  # kohya's get_remove_step_no: files up to this step go
    kept = []
    for name in written:
        saved = int(name.rsplit("-step", 1)[1].split(".", 1)[0])
        if saved <= oldest:
            (Path(config.output_dir) / name).unlink(missing_ok=True)
        else:
            kept.append(name)
    return kept


__all__ = ["claim_output_dir", "epoch_file", "previous_run", "prune_epoch_files", "prune_step_files", "step_file"]
