"""FSDP2 for full fine-tunes: `fully_shard` Stage C, sharded checkpoints (DCP) and the single-file export.

Every block group (a ResBlock with the TimestepBlock / AttnBlock after it) is sharded, then the root (the
mappers, embedding, scalers and clf). Each process keeps 1/N of the fp32 master weights, of their gradients
and of the optimizer states; with bf16 mixed precision the blocks are all-gathered in bf16 and the
gradients reduce-scattered in fp32. Gradients are reduce-scattered after every micro-batch (no unsharded
gradient is kept between micro-batches: that is the memory FSDP is used for).

A sharded checkpoint folder holds ``shards/`` (torch.distributed.checkpoint: one file per process plus
``.metadata``, model and optimizer keyed by parameter name), ``state.pt`` (step, counters, RNG of every process,
scheduler, adaptive buckets) and ``info.json``; the folder is published only when complete (checkpoint.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError

Tensor = torch.Tensor
SHARDS = "shards"


def block_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The units of every level, grouped from one ResBlock to the next (Stage C: C, T, A)."""
    from ..models.common import ResBlock

    groups: list[list[nn.Module]] = []
    levels: list[nn.ModuleList] = [*model.down_blocks, *model.up_blocks]  # type: ignore[misc]
    for level in levels:
        for i, unit in enumerate(level):
            if i == 0 or isinstance(unit, ResBlock):
                groups.append([])
            groups[-1].append(unit)
    return groups


def shard(model: nn.Module, device: torch.device, world_size: int, mixed_precision: str) -> None:
    """fully_shard each block group, then the root; fp32 masters, bf16 compute when mixed_precision='bf16'."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for group in block_groups(model):
        fully_shard(group, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The whole model unsharded on every process (sampling calls Stage C's parts directly, past FSDP's hooks).

    Costs one whole copy of the weights in the compute dtype while it lasts; every process must enter it."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # FSDP2's default: the root keeps its own


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (all-gathered when sharded; a collective: every process must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined,no-any-return]


def like(value: Tensor, sharded: Tensor) -> Tensor:
    """This process's shard of the whole tensor `value` (the same on every process), placed like `sharded`."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, sharded.device_mesh, sharded.placements,  # type: ignore[attr-defined]
                             src_data_rank=None)  # each process cuts its own piece: no communication


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model on the main process's CPU (empty dict elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state  # type: ignore[return-value]


def save_shards(folder: Path, model: nn.Module, optimizer: Any) -> None:
    """Every process writes its shard of the model and optimizer to folder (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_shards(folder: Path, model: nn.Module, optimizer: Any) -> None:
    """Read the model and optimizer shards into `model` (sharded or not: DCP reshards for any process count;
    a collective when a process group is up)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=str(folder))  # tensors filled in place, other values replaced in `state`
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextmanager
def _one_process_is_meant() -> Iterator[None]:
    with warnings.catch_warnings():  # DCP: "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_full_model(folder: Path) -> dict[str, Tensor]:
    """The whole model of a sharded checkpoint's ``shards/`` folder, read in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no torch.distributed.checkpoint metadata (.metadata); the shards are "
                          "incomplete") from None
    model: dict[str, Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            model[key[len("model."):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not model:
        raise ConfigError(f"{folder}: the shards hold no model tensors")
    with _one_process_is_meant():
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


__all__ = ["SHARDS", "block_groups", "full", "full_state_dict", "gathered", "is_sharded", "like", "load_shards",
           "read_full_model", "save_shards", "shard"]
