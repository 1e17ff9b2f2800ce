"""Does a Stage C fine-tune fit: the memory per GPU by variant, GPU count, strategy, optimizer and precision.

Weights, gradients and optimizer states are exact byte counts of the model's own tensors (built as fake
tensors: no memory, no file); FSDP's shards are counted as 1/N of them (its padding of each parameter to
whole rows per GPU is left out). Activations are a stated estimate: the bytes autograd saves for backward in
one forward pass of the real architecture, counted with saved-tensor hooks on fake tensors, times
ACTIVATION_CALIBRATION, the measured CPU peak over that count (docs/training.md: a 50 M-parameter Stage C
at 24x24 latents, batches 1 and 2, with and without checkpointing, peaks at 1.00-1.10x the count). The
attention probability maps are left out: CUDA's fused attention kernels keep only per-row statistics.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any

GiB = 1024**3
ACTIVATION_CALIBRATION = 1.1  # measured peak / counted saved bytes, rounded up (1.01 without, 1.10 with checkpointing)
CUDA_OVERHEAD = GiB  # CUDA context, kernels and allocator slack (a margin, not a measurement)
TEXT_ENCODER = 694_000_000  # CLIP-G text tower parameters (bf16) when its outputs are not cached
VARIANTS = ("full", "lite")  # the 3.6 B and the 1.03 B Stage C
GPU_COUNTS = (1, 2, 4, 8)
GPU_MEMORY = (24, 40, 80)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one GPU needs for one training set-up (``fits``: on ``gpu_memory_gb`` GiB)."""

    variant: str
    mode: str
    strategy: str
    gpus: int
    gpu_memory_gb: float
    optimizer: str
    mixed_precision: str
    gradient_checkpointing: bool
    batch_size: int
    latent: tuple[int, int]
    params: int  # Stage C parameters
    trainable: int  # trained parameters (all of Stage C, or the LoRA's)
    weights: int
    gradients: int  # including DDP's gradient buckets
    optimizer_states: int
    transient: int  # FSDP's all-gathered blocks, autocast weight copies, Adafactor's whole-gradient buffers
    activations: int
    overhead: int

    @property
    def static(self) -> int:
        """Everything but the activations: what no batch size or checkpointing can lower."""
        return self.weights + self.gradients + self.optimizer_states + self.transient + self.overhead

    @property
    def total(self) -> int:
        return self.static + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GiB

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.1f}" for name in
                          ("weights", "gradients", "optimizer_states", "transient", "activations", "overhead"))
        return (f"{self.variant} {self.mode}, {self.strategy} on {self.gpus} GPU(s): {self.total / GiB:.1f} GiB "
                f"per GPU ({parts} GiB)")


def stage_c_config(variant: Any) -> Any:
    """StageCConfig of a variant name (full / bf16 / lite / lite_bf16 / tiny) or the config itself."""
    from ..models.stage_c import StageCConfig

    if isinstance(variant, StageCConfig):
        return variant
    name = {"bf16": "full", "lite_bf16": "lite"}.get(str(variant), str(variant))
    if name not in ("full", "lite", "tiny"):
        raise ValueError(f"variant={variant!r}: use 'full' (3.6 B), 'lite' (1.03 B) or 'tiny'")
    return getattr(StageCConfig, name)()


def _fake_model(config: Any, dtype: Any) -> Any:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = config.build()
    finally:
        torch.set_default_dtype(previous)
    return model


_CACHE: dict[tuple[Any, ...], Any] = {}  # counting builds a fake model: once per config and setting


def _memo(key: tuple[Any, ...], compute: Any) -> Any:
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _shapes(config: Any, lora_rank: int, lora_target: str) -> dict[str, Any]:
    return _memo(("shapes", repr(config), lora_rank, lora_target),
                 lambda: _count_shapes(config, lora_rank, lora_target))


def _saved_bytes(config: Any, bf16: bool, latent: tuple[int, int], checkpointing: bool) -> int:
    return int(_memo(("saved", repr(config), bf16, latent, checkpointing),
                     lambda: _count_saved(config, bf16, latent, checkpointing)))


def _count_shapes(config: Any, lora_rank: int, lora_target: str) -> dict[str, Any]:
    """Parameter shapes of Stage C (and of a LoRA on it), FSDP group sizes; fake tensors, no memory.

    FakeTensorMode (torch's shape-only tensors, what torch.compile traces with; it has no public name) rather
    than the meta device, on which Stage C's forward cannot run (its autocast check needs a real device type)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .fsdp import block_groups
    from .lora_train import lora_targets

    with FakeTensorMode():
        model = _fake_model(config, torch.float32)
        shapes = [tuple(p.shape) for p in model.parameters()]
        groups = [sum(p.numel() for m in g for p in m.parameters()) for g in block_groups(model)]
        lora = []
        for t in lora_targets(model, lora_target):
            lora += [(lora_rank, t.n_in), (t.n_out, lora_rank)]
    total = sum(math.prod(s) for s in shapes)
    return {"shapes": shapes, "lora": lora, "max_group": max(groups), "root": total - sum(groups)}


def saved_activation_bytes(variant: Any, *, mixed_precision: str = "bf16", latent: tuple[int, int] = (24, 24),
                           gradient_checkpointing: bool = True) -> int:
    """The counted bytes one sample's forward saves for backward (before ACTIVATION_CALIBRATION)."""
    return _saved_bytes(stage_c_config(variant), mixed_precision == "bf16", (latent[0], latent[1]),
                        gradient_checkpointing)


def _count_saved(config: Any, bf16: bool, latent: tuple[int, int], checkpointing: bool) -> int:
    """Bytes saved for backward by one sample's forward (attention maps left out, see the module doc).

    With checkpointing: what is saved outside the blocks, every block's inputs, and the largest block's
    own activations (recomputed one block at a time in backward)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved: dict[int, tuple[Any, int]] = {}  # id → (block or None, bytes); the tensors are kept alive below
    inputs: dict[int, int] = {}
    alive: list[Any] = []
    current: list[Any] = [None]
    tokens = 77 + 2 * config.c_clip_seq + latent[0] * latent[1]

    def pack(t: Any) -> Any:
        base = t._base if t._base is not None else t
        attention_map = base.dim() == 4 and base.shape[-1] == tokens
        if not isinstance(base, torch.nn.Parameter) and not attention_map and id(base) not in saved:
            alive.append(base)
            saved[id(base)] = (current[0], base.numel() * base.element_size())
        return t

    with FakeTensorMode():
        model = _fake_model(config, torch.bfloat16 if bf16 else torch.float32)
        model.train()
        for index, unit in enumerate(u for level in [*model.down_blocks, *model.up_blocks] for u in level):
            def enter(module: Any, args: Any, index: int = index) -> None:
                current[0] = index
                for a in args:
                    if isinstance(a, torch.Tensor) and id(a) not in inputs:
                        alive.append(a)
                        inputs[id(a)] = a.numel() * a.element_size()

            def leave(module: Any, args: Any, out: Any) -> None:
                current[0] = None

            unit.register_forward_pre_hook(enter)
            unit.register_forward_hook(leave)
        x = torch.randn(1, config.c_in, latent[1], latent[0])
        conditioning = (torch.randn(1, 77, config.c_clip_text), torch.randn(1, 1, config.c_clip_text_pooled),
                        torch.zeros(1, 1, config.c_clip_img))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, torch.rand(1), *conditioning)
    per_block: dict[Any, int] = {}
    for block, size in saved.values():
        per_block[block] = per_block.get(block, 0) + size
    if not checkpointing:
        return sum(per_block.values())
    largest = max((v for k, v in per_block.items() if k is not None), default=0)
    return per_block.get(None, 0) + sum(inputs.values()) + largest


def _adafactor_bytes(shapes: list[tuple[int, ...]], beta1: bool) -> tuple[int, int]:
    """(factored second moments, first moment) bytes of Adafactor over tensors of these shapes."""
    factored = 0
    for s in shapes:
        if len(s) >= 2:
            factored += math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]  # row means + column means
        else:
            factored += math.prod(s)
    return 4 * factored, 4 * sum(math.prod(s) for s in shapes) if beta1 else 0


def plan_memory(variant: Any = "full", *, mode: str = "full", gpus: int = 1, gpu_memory_gb: float = 24,
                strategy: str = "ddp", optimizer: str = "adamw", optimizer_args: Any = (),
                mixed_precision: str = "bf16", gradient_checkpointing: bool = True, batch_size: int = 1,
                resolution: int | tuple[int, int] = 1024, training_scale: str = "official", network_dim: int = 4,
                network_target: str = "attention", text_encoder_cached: bool = True) -> MemoryPlan:
    """The per-GPU memory of a Stage C fine-tune (variant "full", "lite", "tiny" or a StageCConfig).

    `batch_size` is per GPU; `resolution` the bucket side in image pixels (1024 at the official scale is a
    24x24 latent); strategy "ddp" (every GPU holds everything) or "fsdp" (sharded over `gpus`)."""
    from .optim import parse_optimizer_args

    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy={strategy!r}: use 'ddp' or 'fsdp'")
    if mode not in ("full", "lora"):
        raise ValueError(f"mode={mode!r}: use 'full' or 'lora'")
    if optimizer.lower() not in ("adamw", "adafactor"):
        raise ValueError(f"optimizer={optimizer!r}: use 'adamw' or 'adafactor'")
    if gpus < 1 or batch_size < 1:
        raise ValueError(f"gpus={gpus}, batch_size={batch_size}: use 1 or more")
    if strategy == "fsdp" and mode == "lora":
        from .config import LORA_FSDP

        raise ValueError(LORA_FSDP)
    config = stage_c_config(variant)
    info = _shapes(config, network_dim, network_target)
    shapes: list[tuple[int, ...]] = info["shapes"]
    params = sum(math.prod(s) for s in shapes)
    bf16 = mixed_precision == "bf16"
    shard = gpus if strategy == "fsdp" else 1
    trained = shapes if mode == "full" else info["lora"]
    trainable = sum(math.prod(s) for s in trained)
    if mode == "full":
        weights = math.ceil(4 * params / shard)  # fp32 masters
    else:
        weights = (2 if bf16 else 4) * params + 4 * trainable  # the frozen base in the training dtype
    gradients = math.ceil(4 * trainable / shard)
    if strategy == "ddp" and gpus > 1:
        gradients += 4 * trainable  # DDP's gradient buckets
    if optimizer.lower() == "adamw":
        states = math.ceil(8 * trainable / shard) + 4 * len(trained)  # exp_avg, exp_avg_sq; a float step each
    else:
        factored, first = _adafactor_bytes(trained, parse_optimizer_args(optimizer_args).get("beta1") is not None)
        states = factored + math.ceil(first / shard)  # factored moments stay whole on every FSDP process
    transient = 0
    if strategy == "fsdp":
        bytes_per = 2 if bf16 else 4
        transient += (info["root"] + 2 * info["max_group"]) * bytes_per  # root + the block and the prefetched one
        transient += info["max_group"] * (4 + bytes_per)  # a block's unsharded gradients before reduce-scatter
        if optimizer.lower() == "adafactor":
            transient += 3 * 4 * max(math.prod(s) for s in shapes)  # whole gradient, parameter, update of one tensor
    elif bf16 and mode == "full":
        transient += 2 * params  # autocast's bf16 copies of the fp32 weights, kept through backward
    if not text_encoder_cached:
        transient += 2 * TEXT_ENCODER
    side = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    scale = 0.75 if training_scale == "official" else 1.0
    latent = (max(1, round(side[0] * scale / 32)), max(1, round(side[1] * scale / 32)))
    per_sample = _saved_bytes(config, bf16, latent, gradient_checkpointing)
    activations = math.ceil(per_sample * ACTIVATION_CALIBRATION * batch_size)
    return MemoryPlan(variant if isinstance(variant, str) else "custom", mode, strategy, gpus, gpu_memory_gb,
                      optimizer.lower(), mixed_precision, gradient_checkpointing, batch_size, latent, params,
                      trainable, weights, gradients, states, transient, activations, CUDA_OVERHEAD)


def plan_table(variants: tuple[str, ...] = VARIANTS, gpu_counts: tuple[int, ...] = GPU_COUNTS,
               gpu_memory: tuple[float, ...] = GPU_MEMORY, strategies: tuple[str, ...] = ("ddp", "fsdp"),
               **settings: Any) -> str:
    """A plain-text table: one row per variant × strategy × GPU count, GiB per GPU and fits on each size."""
    head = ["variant", "mode", "strategy", "GPUs", "weights", "grads", "optim", "transient", "activ.", "total"]
    head += [f"{m:g} GB" for m in gpu_memory]
    rows = [head]
    for variant in variants:
        for strategy in strategies:
            if strategy == "fsdp" and settings.get("mode", "full") == "lora":
                continue
            for n in gpu_counts:
                if strategy == "fsdp" and n == 1:
                    continue  # one process trains alone: the DDP row
                plan = plan_memory(variant, gpus=n, strategy=strategy, gpu_memory_gb=gpu_memory[0], **settings)
                gib = [f"{v / GiB:.1f}" for v in (plan.weights, plan.gradients, plan.optimizer_states,
                                                  plan.transient, plan.activations, plan.total)]
                fits = ["yes" if plan.total <= m * GiB else "no" for m in gpu_memory]
                rows.append([variant, plan.mode, strategy if n > 1 else "1 GPU", str(n), *gib, *fits])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    p = plan_memory(variants[0], **settings)
    note = (f"GiB per GPU; {p.optimizer}, mixed_precision={p.mixed_precision}, gradient checkpointing "
            f"{'on' if p.gradient_checkpointing else 'off'}, batch {p.batch_size} per GPU at {p.latent[0]}x"
            f"{p.latent[1]} latents; activations are an estimate (x{ACTIVATION_CALIBRATION} the counted saved "
            f"tensors), overhead {CUDA_OVERHEAD / GiB:.0f} GiB included in total")
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], note])


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=["full", "lite", "tiny"])
    parser.add_argument("--mode", default="full", choices=["full", "lora"])
    parser.add_argument("--gpus", nargs="+", type=int, default=list(GPU_COUNTS))
    parser.add_argument("--gpu-memory", nargs="+", type=float, default=list(GPU_MEMORY), metavar="GB")
    parser.add_argument("--strategy", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    parser.add_argument("--optimizer-args", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no"])
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--batch-size", type=int, default=1, help="per GPU")
    parser.add_argument("--resolution", type=int, default=1024, help="bucket side in pixels")
    parser.add_argument("--training-scale", default="official", choices=["official", "kohya"])
    parser.add_argument("--network-dim", type=int, default=4)
    parser.add_argument("--network-target", default="attention", choices=["attention", "all_linear"])


def run_plan(args: argparse.Namespace) -> int:
    settings = {f: getattr(args, f) for f in ("mode", "optimizer", "optimizer_args", "mixed_precision",
                                              "gradient_checkpointing", "batch_size", "resolution",
                                              "training_scale", "network_dim", "network_target")}
    print(plan_table(tuple(args.variant), tuple(args.gpus), tuple(args.gpu_memory), tuple(args.strategy),
                     **settings), flush=True)
    return 0


def check_fit(config: Any, model: Any, device: Any, world_size: int, strategy: str,
              gpu_memory_gb: float | None = None) -> MemoryPlan | None:
    """At training start on CUDA: refuse when even the weights, gradients and optimizer states cannot fit the
    GPU (its memory, or `gpu_memory_gb`), warn when the estimate with activations does not; None (no check)
    off CUDA or for a model that is not the full, lite or tiny Stage C."""
    import warnings

    import torch

    from .config import ConfigError

    if device.type != "cuda":
        return None
    count = sum(p.numel() for p in model.parameters())
    known = {sum(math.prod(s) for s in _shapes(stage_c_config(v), 4, "attention")["shapes"]): v
             for v in ("full", "lite", "tiny")}
    if count not in known:
        return None
    memory = gpu_memory_gb or torch.cuda.get_device_properties(device).total_memory / GiB
    plan = plan_memory(known[count], mode=config.mode, gpus=world_size, gpu_memory_gb=memory,
                       strategy="fsdp" if strategy == "fsdp" else "ddp", optimizer=config.optimizer_type,
                       optimizer_args=config.optimizer_args, mixed_precision=config.mixed_precision,
                       gradient_checkpointing=config.gradient_checkpointing, batch_size=config.train_batch_size,
                       resolution=config.resolution if isinstance(config.resolution, int) else tuple(
                           config.resolution), training_scale=config.training_scale,
                       network_dim=config.network_dim, network_target=config.network_target,
                       text_encoder_cached=config.cache_text_encoder_outputs)
    if plan.fits:
        return plan
    advice = "; ".join(_advice(plan))
    if plan.static > memory * GiB:
        raise ConfigError(f"this run cannot fit the GPU's {memory:.0f} GiB: {plan.describe()}; before any "
                          f"activations it needs {plan.static / GiB:.1f} GiB. {advice}")
    warnings.warn(f"this run may not fit the GPU's {memory:.0f} GiB (an estimate): {plan.describe()}. {advice}",
                  RuntimeWarning, stacklevel=2)
    return plan


def _advice(plan: MemoryPlan) -> list[str]:
    out = []
    settings = {f.name: getattr(plan, f.name) for f in fields(plan)}
    if plan.mode == "full" and plan.variant != "custom":
        for n in (2, 4, 8, 16):
            fsdp = plan_memory(plan.variant, mode="full", gpus=n,
                               gpu_memory_gb=plan.gpu_memory_gb, strategy="fsdp", optimizer=plan.optimizer,
                               mixed_precision=plan.mixed_precision,
                               gradient_checkpointing=plan.gradient_checkpointing, batch_size=plan.batch_size)
            if fsdp.fits:
                out.append(f"strategy='fsdp' on {n} GPUs of this size needs {fsdp.total / GiB:.1f} GiB each")
                break
    if not settings["gradient_checkpointing"]:
        out.append("gradient_checkpointing=true cuts the activations")
    if settings["batch_size"] > 1:
        out.append("a smaller train_batch_size with gradient_accumulation_steps keeps the global batch")
    if plan.mode == "full":
        out.append("mode='lora' trains a small network on the frozen model")
    return out or ["use a larger GPU"]


__all__ = ["ACTIVATION_CALIBRATION", "MemoryPlan", "check_fit", "plan_memory", "plan_table",
           "saved_activation_bytes"]
