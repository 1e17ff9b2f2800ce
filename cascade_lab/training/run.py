"""`train(...)` → `TrainingRun`: set-up, resume, the step loop with validation, checkpoints, samples and export.

The same function runs in a notebook (optionally in a background thread, stopped with ``run.stop()``),
from ``cascade-lab train CONFIG`` and in every process of ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..pipeline import steady_heap
from . import distributed as dist
from .checkpoint import (
    SAVE_DTYPES,
    STATE_FORMAT,
    Checkpoints,
    cast_floats,
    load_state,
    official_state_dict,
    resume_folder,
    write_json,
    write_safetensors,
    write_torch,
)
from .config import ConfigError, TrainConfig
from .data import TrainingData
from .loop import NonFiniteLoss, Trainer
from .memory_plan import check_fit
from .metadata import describe, export_metadata, scale_factor, scale_statement
from .outputs import claim_output_dir, epoch_file, final_file, prune_epoch_files, prune_step_files, step_file


@dataclass
class TrainingEvent:
    """What the callback receives: ``kind`` is step, val, sample, checkpoint or end."""

    kind: str
    step: int
    total_steps: int
    data: dict[str, Any]
    run: TrainingRun


@dataclass
class TrainingRun:
    """A run's progress and results; the notebook panel and the command line read these fields."""

    config: TrainConfig
    status: str = "pending"  # running, finished, stopped, nan, error
    step: int = 0
    total_steps: int = 0
    losses: list[dict[str, Any]] = field(default_factory=list)  # per step: loss (weighted), raw_loss, lr, ...
    val_losses: list[dict[str, Any]] = field(default_factory=list)  # step, val_loss, per_t
    samples: list[Any] = field(default_factory=list)  # sampling.SampleImage
    last_checkpoint: Path | None = None
    output_file: Path | None = None  # the exported LoRA / Stage C (or Stage B) file
    metadata: dict[str, str] = field(default_factory=dict)
    steps_per_epoch: int = 0  # optimizer steps per pass over the data (repeats included)
    epoch: int = 0  # epochs completed
    epoch_files: list[str] = field(default_factory=list)  # this run's <name>-000001.safetensors files, oldest first
    step_files: list[str] = field(default_factory=list)  # this run's <name>-step00000500.safetensors files
    # (without an output name a kohya command line's are epoch-000001 / at-step00000500, the final file last)
    network: Any = None  # the LoRA network (detached from the trained model when the run ends)
    model: Any = None  # the trained network (Stage C, or Stage B with stage="b")
    stage_c: Any = None  # the trained Stage C (Stage C runs)
    stage_b: Any = None  # the trained Stage B (Stage B runs)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Ask the run to stop after the current step; it saves a checkpoint that `resume` continues."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self.status in ("pending", "running")

    def wait(self, timeout: float | None = None) -> TrainingRun:
        """Block until a background run ends."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    @property
    def last_checkpoint_step(self) -> int | None:
        return int(self.last_checkpoint.name.split("-")[-1]) if self.last_checkpoint else None


def train(config: TrainConfig | dict[str, Any] | str | Path | None = None, *,
          callback: Callable[[TrainingEvent], Any] | None = None, stop: Callable[[], bool] | None = None,
          stages: Any = None, stage_c: Any = None, text_encoder: Any = None, effnet: Any = None,
          stage_b: Any = None, background: bool = False, **kwargs: Any) -> TrainingRun:
    """Train Stage C, or Stage B with ``stage="b"`` (LoRA or full), as `config` says (a TrainConfig, dict, TOML
    path; kwargs override fields).

    `stop()` is polled between steps; `callback(TrainingEvent)` runs on the main process. Models may be
    passed as a `pipeline.Stages` or one by one; a passed trained stage is trained in place by a full fine-tune
    and gets its own weights back after a LoRA run (the LoRA is in the output file and ``run.network``); in a
    Stage B run a passed ``stage_c`` is the frozen Stage C of the samples.
    With ``background=True`` the run starts in a thread and is returned at once (``run.wait()``,
    ``run.stop()``). A run that ends on repeated NaNs returns with status "nan"; other errors raise
    (in background mode they are kept in ``run.error``).
    """
    cfg = TrainConfig.coerce(config, **kwargs).validate()
    run = TrainingRun(cfg)
    objects = {"stages": stages, "stage_c": stage_c, "text_encoder": text_encoder, "effnet": effnet,
               "stage_b": stage_b}
    if background:
        run._thread = threading.Thread(target=_guarded, args=(run, callback, stop, objects), daemon=True,
                                       name=f"cascade_lab train {cfg.name}")
        run._thread.start()
        return run
    _execute(run, callback, stop, objects)
    return run


def _guarded(run: TrainingRun, callback: Any, stop: Any, objects: dict[str, Any]) -> None:
    try:
        _execute(run, callback, stop, objects)
    except BaseException:  # kept in run.error for the caller
        pass


def _execute(run: TrainingRun, callback: Any, stop: Any, objects: dict[str, Any]) -> None:
    from .models import build_models
    from .toml_config import dataset_config_for

    cfg = run.config
    try:
        info = dist.setup(cfg.device)
    except BaseException as exc:  # a background run must not stay "pending" with the error lost
        run.status, run.error = "error", exc
        raise
    trainer: Trainer | None = None
    heap = contextlib.ExitStack()

    def emit(kind: str, data: dict[str, Any]) -> None:
        if callback is not None and info.is_main:
            callback(TrainingEvent(kind, run.step, run.total_steps, data, run))

    try:
        info = replace(info, strategy=dist.resolve_strategy(cfg.strategy, cfg.mode, info.world_size))
        claim_output_dir(cfg)
        models = build_models(cfg, device=info.device, **objects)  # checks every given path first
        data = TrainingData(dataset_config_for(cfg), scale=scale_factor(cfg, models), seed=cfg.seed,
                            world_size=info.world_size)
        # CUDA: refuse what cannot fit (the planner knows the Stage C and Stage B sizes)
        check_fit(cfg, models.model, info.device, info.world_size, info.strategy)
        trainer = Trainer(cfg, models, data, info)
        if info.device.type == "cpu" and threading.current_thread() is threading.main_thread():
            # each step frees and allocates the same blocks: kept mapped, they are not faulted in again (8 % of
            # the mid-size full fine-tune's step). Only in the main thread: another thread's glibc arena is a
            # chain of 64 MiB heaps that fragments without trimming (+330 MiB peak there), so a background run
            # keeps trimming before each backward
            trainer.trim_before_backward = not heap.enter_context(steady_heap())
        run.network, run.model, run.total_steps = trainer.network, trainer.model, trainer.total_steps
        if cfg.stage == "b":
            run.stage_b = trainer.model
        else:
            run.stage_c = trainer.model
        batches = data.batches_per_epoch()
        run.steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
        run.metadata = describe(cfg, data, info, trainer, models.downscale)
        emit("start", {"images": len(data.records), "batches_per_epoch": batches,
                       "steps_per_epoch": run.steps_per_epoch, "epochs": math.ceil(trainer.total_steps /
                                                                                    run.steps_per_epoch)})
        trainer.prepare_caches(list(range(len(data.records))))
        torch.manual_seed(cfg.seed + info.rank)  # the stream Stage C's dropout draws from (set after any builds)
        folder = resume_folder(cfg)
        if folder is not None:
            _resume(run, trainer, folder)
        prompts = _prompts(cfg)
        run.status = "running"
        run.epoch = trainer.counter // batches
        if trainer.step == 0 and dist.broadcast_object(info, run.stop_requested or (stop is not None and stop())):
            run.status = "stopped"  # stopped during set-up: nothing trained, so no (empty) step-0 checkpoint
        elif trainer.step == 0:
            _validate(run, trainer, emit)
            if prompts and cfg.sample_at_first:
                _sample(run, trainer, models, prompts, emit)
        while trainer.step < trainer.total_steps and run.status == "running":
            wanted = run.stop_requested or (stop is not None and stop())
            if dist.broadcast_object(info, wanted):
                _checkpoint(run, trainer, emit)
                run.status = "stopped"
                break
            log = trainer.train_step()
            run.step = trainer.step
            if info.is_main:
                run.losses.append(log)
            emit("step", log)
            step, last = trainer.step, trainer.step >= trainer.total_steps
            epoch_end = trainer.counter // batches > run.epoch
            run.epoch = trainer.counter // batches
            if cfg.val_every_n_steps and step % cfg.val_every_n_steps == 0 and not last:
                _validate(run, trainer, emit)
            save_epoch = bool(epoch_end and cfg.save_every_n_epochs and run.epoch % cfg.save_every_n_epochs == 0)
            save_step = bool(cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0)
            if not last and (save_epoch or save_step):
                _checkpoint(run, trainer, emit, epoch=run.epoch if save_epoch else None, step_save=save_step)
            if prompts and cfg.sample_every_n_epochs:  # epochs win over steps (kohya)
                if epoch_end and run.epoch % cfg.sample_every_n_epochs == 0:
                    _sample(run, trainer, models, prompts, emit, epoch=run.epoch)
            elif prompts and cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                _sample(run, trainer, models, prompts, emit)
        if run.status == "running":
            _validate(run, trainer, emit)
            _checkpoint(run, trainer, emit)
            run.status = "finished"
        if info.is_main and run.step > 0:  # a run stopped before its first step leaves the folder free
            write_json(_summary(run), Path(cfg.output_dir) / "run.json")
        emit("end", {"status": run.status})
    except NonFiniteLoss as exc:
        run.status, run.error = "nan", exc
        run.step = trainer.step if trainer is not None else run.step
        if info.is_main:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
            write_json(_summary(run), Path(cfg.output_dir) / "run.json")
        emit("end", {"status": run.status, "error": str(exc)})
    except BaseException as exc:
        run.status, run.error = "error", exc
        emit("end", {"status": run.status, "error": repr(exc)})
        raise
    finally:
        if trainer is not None and trainer.network is not None:
            trainer.network.detach()  # the caller's model gets its own weights back
        heap.close()  # the run's freed memory goes back to the OS
        dist.teardown(info)


def _prompts(cfg: TrainConfig) -> list[Any]:
    if not cfg.sample_prompts:
        return []
    from .sampling import load_prompts

    return load_prompts(cfg.sample_prompts)


def _validate(run: TrainingRun, trainer: Trainer, emit: Any) -> None:
    if trainer.info.is_main or trainer.sharded:  # a sharded Stage C's forward is a collective
        result = trainer.validate()
        if trainer.info.is_main:
            run.val_losses.append(result)
            emit("val", result)


def _sample(run: TrainingRun, trainer: Trainer, models: Any, prompts: list[Any], emit: Any,
            epoch: int | None = None) -> None:
    main = trainer.info.is_main
    if not main and not trainer.sharded:  # a sharded Stage C samples on every process, the main one saves
        return
    from .fsdp import gathered
    from .sampling import render_samples

    cfg = trainer.config
    with gathered(trainer.model) if trainer.sharded else contextlib.nullcontext():
        images = render_samples(prompts, trainer.model, models, stage=cfg.stage, step=trainer.step, seed=cfg.seed,
                                device=trainer.device, autocast_bf16=cfg.mixed_precision == "bf16",
                                full=cfg.sample_full_images, out_dir=Path(cfg.output_dir) / "sample" if main else None,
                                name="" if cfg.kohya_default_names else cfg.name, epoch=epoch)
    if main:
        run.samples.extend(images)
        emit("sample", {"images": images})


def export_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The model file's tensors: kohya LoRA pairs, or the trained stage under the official keys (the official
    single-file layout of Stage C or Stage B), in save_precision.

    FSDP: gathered to the main process's CPU (a collective; the other processes get an empty dict)."""
    dtype = SAVE_DTYPES[trainer.config.save_precision]
    if trainer.network is not None:
        return dict(trainer.network.kohya_state_dict(dtype))
    if trainer.sharded:
        from .fsdp import full_state_dict

        return cast_floats(full_state_dict(trainer.model), dtype)
    return official_state_dict(trainer.model, dtype)


def _checkpoint(run: TrainingRun, trainer: Trainer, emit: Any, epoch: int | None = None,
                step_save: bool = False) -> None:
    """Every process hands in its RNG state; the main one writes the checkpoint and the exported file.

    The model goes to kohya's ``<name>-<epoch:06d>.safetensors`` at an epoch save, ``<name>-step<step:08d>.
    safetensors`` at a step save (both when one step is both), else (the end, a stop) ``<name>.safetensors``
    (kohya without an output name: ``epoch-``, ``at-step``, ``last``; outputs.py)."""
    cfg, info = trainer.config, trainer.info
    if trainer.nan_streak:  # the weights are those of the last good step; its checkpoint already holds them
        if info.is_main:
            warnings.warn(f"step {trainer.step}: no checkpoint during a run of non-finite steps", RuntimeWarning,
                          stacklevel=2)
        return
    rngs = dist.gather_objects(info, trainer.rng_state())
    tensors = export_tensors(trainer) if info.is_main or trainer.sharded else {}
    store = Checkpoints(cfg.output_dir, cfg.keep_checkpoints)
    staged = _write_shards(run, trainer, store, emit) if trainer.sharded else None
    if trainer.sharded and staged is None:
        return
    if info.is_main:
        name = final_file(cfg).name
        # the exported file holds the trained weights exactly (fp32, or bf16 weights in either precision): it is the
        # checkpoint's trainable file too
        full_fp32 = trainer.network is None and (cfg.save_precision == "fp32" or cfg.full_bf16) and not trainer.sharded
        trainable_file = name if full_fp32 else "trainable.safetensors"
        meta = export_metadata(run.metadata, trainer) | {"ss_epoch": str(run.epoch)}
        epoch_files = list(run.epoch_files)
        if epoch is not None:
            epoch_files.append(epoch_file(cfg, epoch).name)
        step_files = list(run.step_files)
        if step_save:
            step_files.append(step_file(cfg, trainer.step).name)

        def write(folder: Path) -> None:
            if not trainer.sharded:  # a sharded checkpoint holds shards/; `cascade-lab train export` makes the file
                write_safetensors(tensors, folder / name, meta)
            if not full_fp32 and not trainer.sharded:
                write_safetensors(trainer.trainable_state(), folder / trainable_file)
            adaptive = trainer.weighting.state_dict() if hasattr(trainer.weighting, "state_dict") else None
            state = {
                "format": STATE_FORMAT, "step": trainer.step, "counter": trainer.counter,
                "nan_streak": trainer.nan_streak,
                "optimizer": None if trainer.sharded else trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(), "adaptive": adaptive, "rng": rngs,
                "world_size": info.world_size, "strategy": info.strategy, "config": cfg.to_json(),
                "trainable_file": None if trainer.sharded else trainable_file, "export_name": name,
                "losses": run.losses, "val_losses": run.val_losses, "epoch_files": epoch_files,
                "step_files": step_files,
            }  # fmt: skip
            write_torch(state, folder / "state.pt")
            info_json = {"step": trainer.step, "metadata": meta, "val_losses": run.val_losses[-5:],
                         "adaptive_loss": trainer.weighting.to_dict() if adaptive is not None else None}
            write_json(info_json, folder / "info.json")

        try:
            run.last_checkpoint = store.save(trainer.step, write, staged=staged)
            if step_save:
                run.output_file = write_safetensors(tensors, step_file(cfg, trainer.step), meta)
                run.step_files = prune_step_files(cfg, step_files, trainer.step)
            if epoch is not None:
                run.output_file = write_safetensors(tensors, epoch_file(cfg, epoch), meta)
                run.epoch_files = prune_epoch_files(cfg, epoch_files)
            if epoch is None and not step_save:
                run.output_file = write_safetensors(tensors, Path(cfg.output_dir) / name, meta)
        except OSError as exc:  # disk full, permissions: the previous files stay whole; training goes on
            kept = f"; the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint else ""
            warnings.warn(f"step {trainer.step}: the checkpoint could not be written ({exc.strerror or exc}: "
                          f"{exc.filename or cfg.output_dir}){kept}; training goes on with the weights in memory "
                          "and tries again at the next checkpoint", RuntimeWarning, stacklevel=2)
            emit("checkpoint_failed", {"step": trainer.step, "error": str(exc)})
        else:
            emit("checkpoint", {"folder": run.last_checkpoint, "file": run.output_file})
    dist.barrier(info)


def _write_shards(run: TrainingRun, trainer: Trainer, store: Checkpoints, emit: Any) -> Path | None:
    """Every process writes its shard into the main process's staging folder; None when that failed."""
    from torch.distributed.checkpoint.api import CheckpointException

    from .fsdp import SHARDS, save_shards

    info = trainer.info
    staged: Path | str | None = None
    if info.is_main:
        try:
            staged = store.staging(trainer.step)
        except OSError as exc:
            staged = f"{exc.strerror or exc}: {exc.filename or store.root}"  # told to every process
    staged = dist.broadcast_object(info, staged)
    try:
        if not isinstance(staged, Path):
            raise OSError(staged)
        save_shards(staged / SHARDS, trainer.model, trainer.optimizer)
    except (OSError, CheckpointException) as exc:  # every process gets DCP's error; training goes on
        if info.is_main:
            if isinstance(staged, Path):
                shutil.rmtree(staged, ignore_errors=True)
            kept = f"; the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint else ""
            warnings.warn(f"step {trainer.step}: the sharded checkpoint could not be written ({exc}){kept}; "
                          "training goes on and tries again at the next checkpoint", RuntimeWarning, stacklevel=3)
            emit("checkpoint_failed", {"step": trainer.step, "error": str(exc)})
        dist.barrier(info)
        return None
    return staged


def _resume(run: TrainingRun, trainer: Trainer, folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_state(folder, trainer.config)
    info = trainer.info
    if state.get("strategy") == "fsdp":  # DCP reshards for any process count and strategy
        from .fsdp import SHARDS, load_shards

        load_shards(folder / SHARDS, trainer.model, trainer.optimizer)
    elif trainer.sharded:
        raise ConfigError(f"{folder} was saved by {state['world_size']} process(es) without FSDP; this run has "
                          f"{info.world_size} processes with strategy='fsdp', which resumes only sharded "
                          "checkpoints. Resume it with strategy='ddp' (or on one process), or start a new run from "
                          "its model file (stage_c_path)")
    else:
        trainer.load_trainable_state(load_file(str(folder / state["trainable_file"])))
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state["adaptive"] is not None:
        trainer.weighting.load_state_dict(state["adaptive"])
    trainer.step, trainer.counter, trainer.nan_streak = state["step"], state["counter"], state["nan_streak"]
    rngs = state["rng"]
    if len(rngs) == trainer.info.world_size:
        trainer.set_rng_state(rngs[trainer.info.rank])
    elif trainer.info.is_main:
        warnings.warn(f"{folder} was saved by {len(rngs)} process(es), this run has {trainer.info.world_size}: "
                      "dropout randomness starts fresh (data order and noise continue exactly)", stacklevel=3)
    run.losses, run.val_losses = list(state["losses"]), list(state["val_losses"])
    run.epoch_files = list(state.get("epoch_files", []))
    run.step_files = list(state.get("step_files", []))
    run.step, run.last_checkpoint = trainer.step, folder


def _summary(run: TrainingRun) -> dict[str, Any]:
    return {"status": run.status, "step": run.step, "total_steps": run.total_steps, "losses": run.losses,
            "val_losses": run.val_losses, "last_checkpoint": run.last_checkpoint, "output_file": run.output_file,
            "metadata": run.metadata, "error": repr(run.error) if run.error else None,
            "samples": [[str(p) for p in s.paths] for s in run.samples]}


__all__ = ["TrainingEvent", "TrainingRun", "export_tensors", "scale_statement", "train"]
