"""One output folder holds one run: a folder with a previous run is refused unless the user resumes or overwrites.

kohya names the exported model ``<name>-000001.safetensors`` after epoch 1, ``<name>-step00000500.safetensors``
at a step save and ``<name>.safetensors`` at the end; without ``--output_name`` its names are
``epoch-000001.safetensors``, ``at-step00000500.safetensors`` and ``last.safetensors`` (a kohya command line:
`TrainConfig.kohya_file_names`). `save_last_n_epochs` / `save_last_n_steps` delete only per-epoch / per-step files
this run (or the run it resumes) wrote, which the checkpoints list, so files of another run in the same folder are
never touched.
"""

from __future__ import annotations

import re
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
    models = model_files(config)
    found += [str(p) for p in models[:3]] + ([f"{len(models) - 3} more model files"] if len(models) > 3 else [])
    return found


def model_files(config: TrainConfig) -> list[Path]:
    """The files in `config.output_dir` that this run's saves would overwrite: its final file, per-epoch and step
    files under the same names (``<name>.safetensors``, ``<name>-000001...``; kohya's ``last``, ``epoch-000001``,
    ``at-step00000500`` without an output name)."""
    out = Path(config.output_dir)
    if not out.is_dir():
        return []
    epoch = re.compile(re.escape(config.file_stem("epoch")) + r"-\d{6,}\.safetensors")
    step = re.compile(re.escape(config.file_stem("step")) + r"-step\d{8,}\.safetensors")
    final = final_file(config).name
    return sorted((p for p in out.iterdir()
                   if p.is_file() and (p.name == final or epoch.fullmatch(p.name) or step.fullmatch(p.name))),
                  key=lambda p: (p.name != final, p.name))  # the final file first


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


def final_file(config: TrainConfig) -> Path:
    """The model at the end of the run (or a stop): ``<output_dir>/<name>.safetensors`` (kohya: ``last``)."""
    return Path(config.output_dir) / f"{config.file_stem('last')}.safetensors"


def epoch_file(config: TrainConfig, epoch: int) -> Path:
    """kohya's per-epoch model name: ``<output_dir>/<name>-000001.safetensors`` (kohya: ``epoch-000001``)."""
    return Path(config.output_dir) / f"{config.file_stem('epoch')}-{epoch:06d}.safetensors"


def prune_epoch_files(config: TrainConfig, written: list[str]) -> list[str]:
    """Delete this run's per-epoch files beyond the last `save_last_n_epochs`; returns the ones kept."""
    keep = config.save_last_n_epochs
    if not keep or len(written) <= keep:
        return written
    for name in written[:-keep]:
        (Path(config.output_dir) / name).unlink(missing_ok=True)
    return written[-keep:]


def step_file(config: TrainConfig, step: int) -> Path:
    """kohya's step-save model name: ``<output_dir>/<name>-step00000500.safetensors`` (kohya: ``at-step...``)."""
    return Path(config.output_dir) / f"{config.file_stem('step')}-step{step:08d}.safetensors"


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


__all__ = ["claim_output_dir", "epoch_file", "final_file", "model_files", "previous_run", "prune_epoch_files",
           "prune_step_files", "step_file"]
