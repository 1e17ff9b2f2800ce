"""Several processes, one run: DDP set up from the environment ``torchrun`` and ``accelerate launch`` provide.

Each process takes its slice of every global batch (rank r: items r·b … r·b + b − 1), so N processes
with batch b compute what one process computes with batch N·b: DDP averages the gradients, the logged
losses are averaged, and the adaptive loss buckets see the whole global batch on every rank.
Backend: NCCL on CUDA, gloo on CPU. The strategy is DDP (every process holds the whole model) or FSDP2
(fsdp.py: parameters, gradients and optimizer states sharded); one process trains alone either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Tensor = torch.Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this run created the process group and destroys it at the end
    strategy: str = "single"  # "single" (one process), "ddp" or "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group named by RANK / WORLD_SIZE / LOCAL_RANK (torchrun, accelerate), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev, owns)


def accelerate_fsdp(environ: dict[str, str] | None = None) -> bool:
    """Whether ``accelerate launch --use_fsdp`` started this process (it exports ACCELERATE_USE_FSDP=true)."""
    env = os.environ if environ is None else environ
    return env.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("true", "1", "yes")


def resolve_strategy(strategy: str, mode: str, world_size: int, environ: dict[str, str] | None = None) -> str:
    """"single", "ddp" or "fsdp" for a run of `world_size` processes whose config says `strategy`."""
    import warnings

    from .config import LORA_FSDP, ConfigError

    if accelerate_fsdp(environ):
        if strategy == "ddp":
            raise ConfigError("strategy='ddp' but accelerate launch --use_fsdp asked for FSDP: drop --use_fsdp "
                              "or set strategy='fsdp' (or 'auto')")
        strategy = "fsdp"
    if strategy == "fsdp" and mode == "lora":
        raise ConfigError(LORA_FSDP)
    if world_size == 1:
        if strategy == "fsdp":
            warnings.warn("strategy='fsdp' with one process: nothing to shard over, so it trains as one process "
                          "(checkpoints and the exported file in the one-process layout)", stacklevel=2)
        return "single"
    return "fsdp" if strategy == "fsdp" else "ddp"


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def mean(info: DistInfo, value: Tensor) -> Tensor:
    """The average of `value` over all processes (a copy; float32)."""
    value = value.detach().float().clone()
    if info.active:
        dist.all_reduce(value)
        value /= info.world_size
    return value


def gather(info: DistInfo, value: Tensor) -> Tensor:
    """Concatenate equally shaped [n, ...] tensors of all processes in rank order → [world·n, ...]."""
    if not info.active:
        return value
    parts = [torch.empty_like(value) for _ in range(info.world_size)]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts)


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the trained module when several processes run (`find_unused_parameters`:
    some parameters may get no gradient in a step, e.g. LoRA pairs skipped by module dropout)."""
    if not info.active:
        return model
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # Depthwise conv weights [c, 1, k, k] get grads whose stride on the size-1 dim differs from the bucket
    # view's: the same memory layout, so the reducer's warning about it is noise here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model  # type: ignore


__all__ = ["DistInfo", "accelerate_fsdp", "barrier", "broadcast_object", "gather", "gather_objects", "mean",
           "resolve_strategy", "setup", "teardown", "unwrap", "wrap"]
