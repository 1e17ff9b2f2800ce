"""`cascade-lab train export CHECKPOINT -o FILE`: a sharded (FSDP) checkpoint → the official single file.

Reads every process's shard in this one process (no process group, no GPU), casts to the run's
save_precision and writes the file the run itself exports at that step: Stage C under the official keys
with the run's metadata. A folder without its COMPLETE marker (a save that was cut off) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import COMPLETE, SAVE_DTYPES, Checkpoints, cast_floats, write_safetensors
from .config import SAVE_PRECISIONS, ConfigError


def checkpoint_folder(path: str | Path) -> Path:
    """A complete checkpoint folder: `path` itself, or the latest one of an output folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r}: no such checkpoint folder")
    if not (folder / COMPLETE).is_file() and (folder / "checkpoints").is_dir():
        latest = Checkpoints(folder).latest()
        if latest is None:
            raise ConfigError(f"{folder}: its checkpoints/ holds no complete checkpoint")
        folder = latest
    if not (folder / COMPLETE).is_file():
        raise ConfigError(f"{folder}: not a complete checkpoint (no {COMPLETE} marker: it was still being written "
                          "when the run stopped, or it is not a checkpoint folder); use a complete step-* folder "
                          "under <output_dir>/checkpoints")
    return folder


def export_checkpoint(path: str | Path, output: str | Path | None = None, save_precision: str | None = None) -> Path:
    """Write the single-file Stage C (or B) of sharded checkpoint `path` to `output` (default: inside the folder)."""
    from .fsdp import SHARDS, read_full_model

    folder = checkpoint_folder(path)
    state = torch.load(str(folder / "state.pt"), map_location="cpu", weights_only=True)
    config = json.loads(state["config"])
    default = "last" if config.get("kohya_file_names") else f"stage_{config.get('stage', 'c')}_finetune"
    name = state.get("export_name") or f"{config.get('output_name') or default}.safetensors"
    if state.get("strategy") != "fsdp":
        raise ConfigError(f"{folder}: not a sharded checkpoint (saved by {state.get('world_size', 1)} process(es) "
                          f"without FSDP); its model file is {folder / name} already")
    precision = save_precision or config.get("save_precision", "fp32")
    if precision not in SAVE_PRECISIONS:
        raise ConfigError(f"save_precision={precision!r}: use one of {', '.join(SAVE_PRECISIONS)}")
    metadata = json.loads((folder / "info.json").read_text(encoding="utf-8"))["metadata"]
    tensors = cast_floats(read_full_model(folder / SHARDS), SAVE_DTYPES[precision])
    return write_safetensors(tensors, Path(output) if output else folder / name, metadata)


__all__ = ["checkpoint_folder", "export_checkpoint"]
