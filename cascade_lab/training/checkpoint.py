"""Atomic files and resumable checkpoints.

Every file is written under a temporary name and renamed into place; a checkpoint is a folder
``checkpoints/step-00000100`` assembled as ``.step-00000100.tmp-<pid>`` and renamed when complete, and
``checkpoints/latest.json`` moves only after that. A crash at any point leaves the previous checkpoint
(and the pointer to it) as it was. Older complete checkpoints beyond ``keep`` are deleted last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch

from .config import RESUME_KEYS, ConfigError, TrainConfig

Tensor = torch.Tensor
STATE_FORMAT = "cascade_lab-train-state-1"
COMPLETE = "COMPLETE"
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # save_precision → the exported file's dtype


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, str(path))


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a temporary name beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file written atomically (tensors made contiguous CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(Path(path), lambda tmp: _save_safetensors(tensors, tmp, metadata))


def write_torch(obj: Any, path: Path) -> Path:
    """torch.save written atomically (read back with ``weights_only=True``)."""
    return atomic_write(Path(path), lambda tmp: _save_torch(obj, tmp))


def write_json(data: Any, path: Path) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str), encoding="utf-8")
    return atomic_write(Path(path), write)


def cast_floats(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """CPU copies of `state`, floating-point tensors cast to `dtype`."""
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}


def official_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """A stage's weights (Stage C or B) under the official checkpoint keys, floating-point tensors cast to `dtype`."""
    state = model.state_dict()
    odd = [k for k in state if "parametrizations" in k or k.startswith("lora_network.")]
    if odd:
        raise RuntimeError(f"the model still carries a LoRA network ({odd[:2]}); detach the network first")
    return cast_floats(state, dtype)


class Checkpoints:
    """The resumable checkpoints of one output folder."""

    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def folder(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def staging(self, step: int) -> Path:
        """A fresh temporary folder for checkpoint `step` (not yet a checkpoint: it has no COMPLETE)."""
        tmp = self.root / f".{self.folder(step).name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def save(self, step: int, write: Callable[[Path], None], staged: Path | None = None) -> Path:
        """Assemble a checkpoint with write(folder) in a temporary folder (or `staged`, which other processes
        already wrote into), then publish it atomically."""
        final = self.folder(step)
        tmp = staged if staged is not None else self.staging(step)
        try:
            write(tmp)
            (tmp / COMPLETE).write_text(str(step))
            if final.exists():  # re-saving a step: move the old one aside first, drop it after
                old = self.root / f".{final.name}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_json({"step": step, "folder": final.name}, self.root / "latest.json")
        self.prune()
        return final

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / COMPLETE).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the pointer file first, else a scan)."""
        pointer = self.root / "latest.json"
        if pointer.is_file():
            try:
                folder = self.root / json.loads(pointer.read_text())["folder"]
                if (folder / COMPLETE).is_file():
                    return folder
            except (ValueError, KeyError):
                pass
        done = self.complete()
        return done[-1] if done else None

    def prune(self) -> None:
        done = self.complete()
        latest = self.latest()
        for folder in done[:-self.keep] if self.keep > 0 else []:
            if folder != latest:
                shutil.rmtree(folder, ignore_errors=True)


def resume_folder(config: TrainConfig) -> Path | None:
    """The checkpoint `config.resume` names: "auto" → the latest in output_dir (None when there is none)."""
    if not config.resume:
        return None
    if config.resume == "auto":
        return Checkpoints(config.output_dir).latest()
    folder = Path(config.resume)
    if folder.is_dir() and not (folder / COMPLETE).is_file() and (folder / "checkpoints").is_dir():
        found = Checkpoints(folder).latest()  # an output folder: take its latest checkpoint
        if found is not None:
            return found
    if not (folder / COMPLETE).is_file():
        raise ConfigError(f"resume={config.resume!r}: not a complete cascade_lab checkpoint folder (it needs "
                          f"{COMPLETE}, state.pt); use 'auto' or a folder under <output_dir>/checkpoints")
    return folder


def load_state(folder: Path, config: TrainConfig) -> dict[str, Any]:
    """Read state.pt of a checkpoint and check that the run it came from can be continued by `config`."""
    state: dict[str, Any] = torch.load(str(folder / "state.pt"), map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{folder}: unknown checkpoint format {state.get('format')!r}")
    saved_all = json.loads(state["config"])
    current = config.to_dict()
    # a setting added after the checkpoint was written had its default then (e.g. stage = "c")
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    saved = {k: saved_all.get(k, defaults.get(k)) for k in (*RESUME_KEYS, "output_name", "kohya_file_names")}
    differ = [f"{k}: {saved[k]!r} → {current.get(k)!r}" for k in RESUME_KEYS if saved[k] != current.get(k)]
    if differ:
        raise ConfigError(f"{folder} was made with other settings, so it cannot be resumed: {'; '.join(differ)}. "
                          "Use the original settings or start a new output_dir.")
    if not saved["output_name"] and not config.output_name and bool(saved["kohya_file_names"]) != \
            config.kohya_file_names:  # both runs left the names to the default, but not the same default
        if saved["kohya_file_names"]:
            raise ConfigError(f"{folder} names its files as kohya does without --output_name (epoch-000001, "
                              f"at-step00000500, last.safetensors); this run would name them {config.name}: resume "
                              "it with the kohya command line, or set kohya_file_names = true")
        old = TrainConfig(stage=saved["stage"], mode=saved["mode"]).name
        raise ConfigError(f"{folder} names its files {old}-000001, {old}-step00000500, {old}.safetensors; this run "
                          "(kohya's names, no --output_name) would name them epoch-000001, at-step00000500, "
                          f"last.safetensors: resume it with --output_name {old} (TOML: output_name = \"{old}\")")
    return state


__all__ = ["COMPLETE", "SAVE_DTYPES", "Checkpoints", "atomic_write", "cast_floats", "load_state", "official_state_dict",
           "resume_folder", "write_json", "write_safetensors", "write_torch"]
