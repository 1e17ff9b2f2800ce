"""Does a Stage C or Stage B fine-tune fit: the memory per GPU by variant, GPU count, strategy, optimizer and
precision.

Weights, gradients and optimizer states are exact byte counts of the model's own tensors (built as fake
tensors: no memory, no file); FSDP's shards are counted as 1/N of them (its padding of each parameter to
whole rows per GPU is left out). Activations are a stated estimate: the bytes autograd saves for backward in
one forward pass of the real architecture, counted with saved-tensor hooks on fake tensors, times
ACTIVATION_CALIBRATION, the largest measured CPU peak over that count (benchmarks/RESULTS.md "Training memory":
small Stage C and Stage B models, with and without checkpointing, fp32 and bf16 autocast, peak at 0.99-1.15x
the count). The attention probability maps are left out: CUDA's fused attention kernels keep only per-row
statistics. With bf16 mixed precision the count runs under autocast with CUDA's float32 rule for the norms
(their outputs, so the residual stream, are float32 on a GPU), on the dtype the run holds the weights in (fp32
masters; bf16 weights with full_bf16; a LoRA's bf16 base); autocast's bf16 casts of fp32 weights are counted under
"transient", not as activations.

Frozen helper models a run keeps on the GPU during its steps are counted whole ("frozen", in the dtype the
run loads them in): the text encoder (bf16) when its outputs are not cached, the image encoders (EfficientNet,
and Stage A for Stage B) when the latents are not cached. Encoders that fill a cache go back to the CPU when
it is filled, so a cached run has none. Sample images are a separate peak ("sampling"): between renders their
models are on the CPU, and while rendering the pipeline holds one at a time on the GPU (text encoder bf16, the
other diffusion stage, Stage A fp32; the Previewer runs on the CPU), each for all the prompts of the event and then
back to the CPU (`training.sampling` renders stage by stage). That peak is the run's weights, optimizer
states, DDP's gradient buckets, autocast's weight copies (FSDP: the whole model gathered in the compute dtype
instead of its blocks in flight), the step's frozen encoders and the largest sampled model; the gradients are
freed after each step and the samples' own activations (one image, no gradients) are not counted.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from .config import BF16_ROUNDINGS

GiB = 1024**3
# measured CPU peak / counted saved bytes: fp32 1.01-1.05 without checkpointing, 1.10-1.13 with; bf16 autocast
# 1.13-1.15 without, 0.99-1.03 with (benchmarks/RESULTS.md)
ACTIVATION_CALIBRATION = 1.15
CUDA_OVERHEAD = GiB  # CUDA context, kernels and allocator slack (a margin, not a measurement)
STAGES = ("c", "b")
VARIANTS = ("full", "lite")  # Stage C 3.6 B / 1.03 B; Stage B 1.56 B / 0.70 B
VARIANT_NAMES = ("full", "bf16", "lite", "lite_bf16", "tiny")  # what `variant` accepts (bf16 files: same model)
SIZES = {"c": {"full": "3.6 B", "lite": "1.03 B"}, "b": {"full": "1.56 B", "lite": "700 M"}}
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
    latent: tuple[int, int]  # (w, h) of the trained stage's input: Stage C latent, or Stage B's Stage A latent
    params: int  # parameters of the trained stage
    trainable: int  # trained parameters (all of the stage, or the LoRA's)
    weights: int
    gradients: int  # including DDP's gradient buckets
    optimizer_states: int
    transient: int  # FSDP's all-gathered blocks, autocast weight copies, Adafactor's whole-gradient buffers
    activations: int
    overhead: int
    stage: str = "c"
    frozen: int = 0  # frozen helper models on the GPU during the steps (uncached text encoder / image encoders)
    helpers: tuple[str, ...] = ()  # their names
    sampling: int = 0  # the largest model sample images bring onto the GPU while they render (0: no samples)
    sampling_model: str = ""  # its name
    gradient_checkpointing_mode: str = "full"  # "selective": the blocks' product outputs are kept as well
    full_bf16: bool = False  # the trained weights and their gradients in bf16 (kohya --full_bf16)

    @property
    def steps_total(self) -> int:
        """What a training step needs."""
        return self.static + self.activations

    @property
    def sampling_peak(self) -> int:
        """What the GPU holds while sample images render (0 without samples): the weights, optimizer states and
        step helpers stay, the gradients are freed (DDP's buckets stay), one sampled model comes over."""
        if not self.sampling:
            return 0
        kept = self.weights + self.optimizer_states + self.frozen + self.overhead + self.sampling
        if self.strategy == "fsdp":  # the whole trained model gathered in the compute dtype (fsdp.gathered)
            return kept + self.params * (2 if self.mixed_precision == "bf16" else 4)
        buckets = (2 if self.full_bf16 else 4) * self.trainable if self.gpus > 1 else 0
        return kept + buckets + self.transient  # autocast's bf16 weight copies are made while sampling too

    @property
    def static(self) -> int:
        """Everything but the activations: what no batch size or checkpointing can lower."""
        return self.weights + self.gradients + self.optimizer_states + self.transient + self.frozen + self.overhead

    @property
    def total(self) -> int:
        """The peak: a training step, or rendering the sample images when that is larger."""
        return max(self.steps_total, self.sampling_peak)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GiB

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.1f}" for name in
                          ("weights", "gradients", "optimizer_states", "transient", "frozen", "activations",
                           "overhead"))
        sampling = (f"; {self.sampling_peak / GiB:.1f} GiB while sample images render ({self.sampling_model} "
                    f"{self.sampling / GiB:.1f} GiB on the GPU)" if self.sampling else "")
        return (f"Stage {self.stage.upper()} {self.variant} {self.mode}, {self.strategy} on {self.gpus} GPU(s): "
                f"{self.steps_total / GiB:.1f} GiB per GPU for a step ({parts} GiB){sampling}")


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: use 'c' (Stage C, the prior) or 'b' (Stage B, the decoder)")
    return stage


def stage_config(variant: Any, stage: str = "c") -> Any:
    """StageCConfig (stage "c") or StageBConfig (stage "b") of a variant name (full / bf16 / lite / lite_bf16 /
    tiny), or the config itself."""
    from ..models.stage_b import StageBConfig
    from ..models.stage_c import StageCConfig

    cls = StageBConfig if _check_stage(stage) == "b" else StageCConfig
    if isinstance(variant, (StageBConfig, StageCConfig)):
        if not isinstance(variant, cls):
            raise ValueError(f"variant is a {type(variant).__name__} but stage={stage!r}: pass a {cls.__name__} "
                             f"or stage={'b' if isinstance(variant, StageBConfig) else 'c'!r}")
        return variant
    name = _size_name(variant)
    if name is None:
        sizes = SIZES[stage]
        raise ValueError(f"variant={variant!r}: use one of {', '.join(VARIANT_NAMES)} (Stage {stage.upper()}: "
                         f"'full'/'bf16' {sizes['full']}, 'lite'/'lite_bf16' {sizes['lite']}, 'tiny') or a "
                         f"{cls.__name__}")
    return getattr(cls, name)()


def _size_name(variant: Any) -> str | None:
    """full / lite / tiny of a variant name (the bf16 files hold the same models), None if unknown."""
    if not isinstance(variant, str) or variant not in VARIANT_NAMES:
        return None
    return {"bf16": "full", "lite_bf16": "lite"}.get(variant, variant)


def stage_c_config(variant: Any) -> Any:
    """StageCConfig of a variant name (full / bf16 / lite / lite_bf16 / tiny) or the config itself."""
    return stage_config(variant, "c")


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


def _saved_bytes(config: Any, precision: str, latent: tuple[int, int], checkpointing: bool,
                 keep_products: bool = False) -> int:
    keep_products = checkpointing and keep_products
    return int(_memo(("saved", repr(config), precision, latent, checkpointing, keep_products),
                     lambda: _count_saved(config, precision, latent, checkpointing, keep_products)))


def _count_shapes(config: Any, lora_rank: int, lora_target: str) -> dict[str, Any]:
    """Parameter shapes of the stage (and of a LoRA on it), FSDP group sizes; fake tensors, no memory.

    FakeTensorMode (torch's shape-only tensors, what torch.compile traces with; it has no public name) rather
    than the meta device, on which the stages' forward cannot run (the autocast check needs a real device type)."""
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


def _precision(mixed_precision: str, mode: str, full_bf16: bool = False) -> str:
    """How the run holds and computes the stage: "no" (fp32), "bf16" (fp32 masters under autocast) or
    "bf16_base" (bf16 weights under autocast: a LoRA's frozen base, or full_bf16's trained ones)."""
    if mixed_precision != "bf16":
        return "no"
    return "bf16_base" if mode == "lora" or full_bf16 else "bf16"


def saved_activation_bytes(variant: Any, *, stage: str = "c", mixed_precision: str = "bf16", mode: str = "full",
                           latent: tuple[int, int] = (24, 24), gradient_checkpointing: bool = True,
                           gradient_checkpointing_mode: str = "full", full_bf16: bool = False) -> int:
    """The counted bytes one sample's forward saves for backward (before ACTIVATION_CALIBRATION); `latent` is the
    (w, h) of the stage's input (Stage B: the Stage A latent, image / 4); `gradient_checkpointing_mode` "full" or
    "selective" (the blocks' product outputs kept too); `full_bf16`: the weights in bf16 under autocast."""
    return _saved_bytes(stage_config(variant, stage), _precision(mixed_precision, mode, full_bf16),
                        (latent[0], latent[1]), gradient_checkpointing, _selective(gradient_checkpointing_mode))


def _selective(mode: str) -> bool:
    """Whether a planned gradient_checkpointing_mode keeps the products ("auto" plans a GPU run: full)."""
    from .config import CHECKPOINTING_MODES

    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"gradient_checkpointing_mode={mode!r}: use 'full', 'selective' or 'auto' (full on a GPU)")
    return mode == "selective"


def _cuda_autocast_norms() -> Any:
    """A torch-function mode giving CPU autocast CUDA's rule for the norms: layer_norm / group_norm run in (and
    return) float32, as on a GPU; CPU autocast leaves them in the input's dtype. The counted stream dtypes then
    are a GPU's."""
    import torch
    from torch.overrides import TorchFunctionMode

    F = torch.nn.functional
    fp32_ops = {F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm}

    def cast(value: Any) -> Any:
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    class Norms(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func in fp32_ops and torch.is_autocast_enabled("cpu"):
                args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return Norms()


_VIEWS = {"SliceBackward0", "ViewBackward0", "TBackward0", "PermuteBackward0", "TransposeBackward0",
          "UnsafeViewBackward0", "AsStridedBackward0", "ExpandBackward0", "SelectBackward0", "UnsqueezeBackward0",
          "SqueezeBackward0", "SqueezeBackward1", "ReshapeAliasBackward0"}


def _weight_copy(t: Any) -> bool:
    """Whether `t` is autocast's cast of a parameter (or of a view of one): counted with the weights (the
    bf16 copies under "transient"), not as an activation."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    node = fn.next_functions[0][0] if fn.next_functions else None
    while node is not None and type(node).__name__ in _VIEWS:
        node = node.next_functions[0][0] if node.next_functions else None
    return node is not None and type(node).__name__ == "AccumulateGrad"


def _product_outputs(current: list[Any], kept: dict[int, tuple[Any, int]], alive: list[Any], is_map: Any) -> Any:
    """A dispatch mode recording the outputs of the products (`models.common.products`) run inside block calls:
    what selective checkpointing keeps (attention probability maps excepted, as in the count)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..models.common import products

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if current[0] is not None and func.overloadpacket in products():
                for t in out if isinstance(out, tuple | list) else (out,):
                    if isinstance(t, torch.Tensor) and not is_map(t):
                        alive.append(t)
                        kept[id(t)] = (current[0], t.numel() * t.element_size())
            return out

    return Record()


def _count_saved(config: Any, precision: str, latent: tuple[int, int], checkpointing: bool,
                 keep_products: bool = False) -> int:
    """Bytes saved for backward by one sample's forward (attention maps left out, see the module doc).

    With checkpointing: what is saved outside the blocks, every block call's inputs, and the largest block
    call's own activations (recomputed one block at a time in backward; Stage B runs some blocks several
    times, each call is its own unit). Selective checkpointing (`keep_products`) keeps the outputs of every
    block call's products and attention besides: those are counted for every call, and the recomputed block's
    activations less its kept outputs."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..models.common import AttnBlock
    from ..models.stage_b import StageBConfig

    saved: dict[int, tuple[Any, int]] = {}  # id → (block call or None, bytes); the tensors are kept alive below
    inputs: dict[int, int] = {}
    alive: list[Any] = []
    current: list[Any] = [None]
    calls = [0]
    maps: set[tuple[int, int]] = set()  # (queries, keys) of every attention call: its probability map's last dims
    kept: dict[int, tuple[Any, int]] = {}  # selective checkpointing: id → (block call, bytes) of a product's output

    def is_map(t: Any) -> bool:
        return t.dim() == 4 and tuple(t.shape[-2:]) in maps

    def pack(t: Any) -> Any:
        base = t._base if t._base is not None else t
        if (not isinstance(base, torch.nn.Parameter) and not is_map(base) and not _weight_copy(base)
                and id(base) not in saved):
            alive.append(base)
            saved[id(base)] = (current[0], base.numel() * base.element_size())
        return t

    weights = torch.bfloat16 if precision == "bf16_base" else torch.float32
    autocast = precision != "no"
    with FakeTensorMode():
        model = _fake_model(config, weights)
        model.train()
        for unit in (u for level in [*model.down_blocks, *model.up_blocks] for u in level):
            def enter(module: Any, args: Any) -> None:
                current[0] = calls[0] = calls[0] + 1
                for a in args:
                    if isinstance(a, torch.Tensor) and id(a) not in inputs:
                        alive.append(a)
                        inputs[id(a)] = a.numel() * a.element_size()
                if isinstance(module, AttnBlock):
                    n = args[0].shape[-2] * args[0].shape[-1]
                    maps.add((n, n + args[1].shape[1] if module.self_attn else args[1].shape[1]))

            def leave(module: Any, args: Any, out: Any) -> None:
                current[0] = None

            unit.register_forward_pre_hook(enter)
            unit.register_forward_hook(leave)
        w, h = latent
        if isinstance(config, StageBConfig):  # Stage A latent; EfficientNet of the whole image; pooled text
            x = torch.randn(1, config.c_in, h, w)
            conditioning: tuple[Any, ...] = (torch.randn(1, config.c_effnet, max(1, h * 4 // 32),
                                                         max(1, w * 4 // 32)), torch.randn(1, 1, config.c_clip))
        else:
            x = torch.randn(1, config.c_in, h, w)
            conditioning = (torch.randn(1, 77, config.c_clip_text), torch.randn(1, 1, config.c_clip_text_pooled),
                            torch.zeros(1, 1, config.c_clip_img))
        mixed = contextlib.ExitStack()
        if autocast:
            mixed.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            mixed.enter_context(_cuda_autocast_norms())
        if keep_products:
            mixed.enter_context(_product_outputs(current, kept, alive, is_map))
        with mixed, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, torch.rand(1), *conditioning)
    per_call: dict[Any, int] = {}  # kept outputs (selective checkpointing) are not recomputed: counted apart
    for key, (call, size) in saved.items():
        if key not in kept:
            per_call[call] = per_call.get(call, 0) + size
    if not checkpointing:
        return sum(per_call.values())
    largest = max((v for k, v in per_call.items() if k is not None), default=0)
    return per_call.get(None, 0) + sum(inputs.values()) + sum(size for _, size in kept.values()) + largest


def _adafactor_bytes(shapes: list[tuple[int, ...]], beta1: bool) -> tuple[int, int]:
    """(factored second moments, first moment) bytes of Adafactor over tensors of these shapes."""
    factored = 0
    for s in shapes:
        if len(s) >= 2:
            factored += math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]  # row means + column means
        else:
            factored += math.prod(s)
    return 4 * factored, 4 * sum(math.prod(s) for s in shapes) if beta1 else 0


def latent_size(stage: str, resolution: int | tuple[int, int], training_scale: str = "official") -> tuple[int, int]:
    """(w, h) of the trained stage's input for a bucket of `resolution` image pixels (an int: a square).

    Stage C: the EfficientNet latent of the bucket at the training scale (1024 px official → 24x24, kohya
    32x32). Stage B: its buckets are image pixels (multiples of 32) and it denoises their Stage A latent, a
    quarter of each side (1024 px → 256x256)."""
    side = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    if _check_stage(stage) == "b":
        return (max(32, side[0] // 32 * 32) // 4, max(32, side[1] // 32 * 32) // 4)
    scale = 0.75 if training_scale == "official" else 1.0
    return (max(1, round(side[0] * scale / 32)), max(1, round(side[1] * scale / 32)))


def frozen_helpers(stage: str, variant: Any, *, text_encoder_cached: bool = True,
                   latents_cached: bool = True) -> dict[str, int]:
    """Bytes of each frozen model a run keeps on the GPU during its steps, in the dtype the run loads it in:
    the encoders it runs every step (those whose outputs are not cached). Encoders that fill a cache go back to
    the CPU once it is filled; the samples' models are `sample_helpers`. Only known for the real sizes: a tiny or
    custom model's helpers are tiny models, not counted."""
    from ..builtins.variants import EFFNET, STAGE_A, TEXT_ENCODER

    if _size_name(variant) not in VARIANTS:
        return {}
    out: dict[str, int] = {}
    if not text_encoder_cached:
        out["text_encoder"] = 2 * TEXT_ENCODER  # bf16, as stored
    if not latents_cached:
        out["effnet"] = 4 * EFFNET
        if stage == "b":
            out["stage_a"] = 4 * STAGE_A  # the target: Stage A's encoder (the whole model is loaded)
    return out


def sample_helpers(stage: str, variant: Any, *, sample_full_images: bool = True) -> dict[str, int]:
    """Bytes of each frozen model sample images bring onto the GPU, one at a time while they render (the
    pipeline holds each for every prompt of a sampling event, then offloads it; the Previewer runs where it is
    loaded, on the CPU). Empty for a tiny or custom size."""
    from ..builtins.variants import STAGE_A, STAGE_B_FULL, STAGE_B_LITE, STAGE_C_FULL, STAGE_C_LITE, TEXT_ENCODER

    size = _size_name(variant)
    if size not in VARIANTS:
        return {}
    out = {"text_encoder": 2 * TEXT_ENCODER}  # bf16, as stored
    if stage == "b":  # C → B → A: the frozen Stage C makes the latent (fp32 in the pipeline)
        out["stage_c"] = 4 * (STAGE_C_FULL if size == "full" else STAGE_C_LITE)
        out["stage_a"] = 4 * STAGE_A
    elif sample_full_images:
        out["stage_b"] = 4 * (STAGE_B_FULL if size == "full" else STAGE_B_LITE)
        out["stage_a"] = 4 * STAGE_A
    return out


def plan_memory(variant: Any = "full", *, stage: str = "c", mode: str = "full", gpus: int = 1,
                gpu_memory_gb: float = 24, strategy: str = "ddp", optimizer: str = "adamw", optimizer_args: Any = (),
                mixed_precision: str = "bf16", gradient_checkpointing: bool = True,
                gradient_checkpointing_mode: str = "full", batch_size: int = 1,
                resolution: int | tuple[int, int] = 1024, training_scale: str = "official", network_dim: int = 4,
                network_target: str = "attention", text_encoder_cached: bool = True, latents_cached: bool = True,
                samples: bool = False, sample_full_images: bool = True, full_bf16: bool = False,
                bf16_rounding: str = "stochastic") -> MemoryPlan:
    """The per-GPU memory of a Stage C (``stage="c"``) or Stage B (``stage="b"``) fine-tune.

    `variant`: "full"/"bf16" (Stage C 3.6 B, Stage B 1.56 B), "lite"/"lite_bf16" (1.03 B, 700 M), "tiny", or a
    StageCConfig / StageBConfig. `batch_size` is per GPU; `resolution` the bucket side in image pixels (1024 px:
    Stage C 24x24 latents at the official scale, Stage B 256x256 Stage A latents); strategy "ddp" (every GPU
    holds everything) or "fsdp" (sharded over `gpus`). `text_encoder_cached`, `latents_cached` and `samples`
    say which frozen models are on the GPU during the steps (`frozen_helpers`) and whether sample images add
    their peak (`sample_helpers`, the largest one). `full_bf16`: the trained weights and gradients in bf16 (2 bytes
    each); AdamW's moments stay fp32 unless `bf16_rounding` is "nearest" (kohya's torch AdamW: bf16 moments)."""
    from .optim import parse_optimizer_args
    from .optimizers import state_bytes

    _check_stage(stage)
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy={strategy!r}: use 'ddp' or 'fsdp'")
    if mode not in ("full", "lora"):
        raise ValueError(f"mode={mode!r}: use 'full' or 'lora'")
    if not estimated(optimizer, optimizer_args):
        raise ValueError(f"optimizer={optimizer!r}: its states are not estimated; use AdamW, Adafactor or another of "
                         "kohya's names (Lion, SGDNesterov, Prodigy, DAdapt*, *8bit) or a torch.optim Adam, AdamW, "
                         "RAdam, NAdam, Adamax, Adagrad, RMSprop or SGD")
    if mixed_precision not in ("bf16", "no"):
        raise ValueError(f"mixed_precision={mixed_precision!r}: use 'bf16' or 'no'")
    if gpus < 1 or batch_size < 1:
        raise ValueError(f"gpus={gpus}, batch_size={batch_size}: use 1 or more")
    if strategy == "fsdp" and mode == "lora":
        from .config import LORA_FSDP

        raise ValueError(LORA_FSDP)
    if full_bf16 and (mixed_precision != "bf16" or strategy == "fsdp"):
        from .config import FULL_BF16_FSDP

        raise ValueError(FULL_BF16_FSDP if mixed_precision == "bf16" else "full_bf16=True needs mixed_precision="
                         "'bf16' (bf16 weights compute in bf16)")
    config = stage_config(variant, stage)
    info = _shapes(config, network_dim, network_target)
    shapes: list[tuple[int, ...]] = info["shapes"]
    params = sum(math.prod(s) for s in shapes)
    bf16 = mixed_precision == "bf16"
    shard = gpus if strategy == "fsdp" else 1
    trained = shapes if mode == "full" else info["lora"]
    trainable = sum(math.prod(s) for s in trained)
    per_trained = 2 if full_bf16 else 4  # bytes of a trained weight and of its gradient
    if mode == "full":
        weights = math.ceil(per_trained * params / shard)  # fp32 masters, or bf16 weights (full_bf16)
    else:
        weights = (2 if bf16 else 4) * params + per_trained * trainable  # the frozen base in the training dtype
    gradients = math.ceil(per_trained * trainable / shard)
    if strategy == "ddp" and gpus > 1:
        gradients += per_trained * trainable  # DDP's gradient buckets
    if optimizer.lower() == "adafactor":
        factored, first = _adafactor_bytes(trained, parse_optimizer_args(optimizer_args).get("beta1") is not None)
        states = factored + math.ceil(first / shard)  # factored moments stay whole on every FSDP process
    else:  # parameter-sized states in the trained weights' dtype; BF16AdamW (full_bf16, stochastic) keeps fp32 ones
        state_dtype = 4 if optimizer.lower() == "adamw" and full_bf16 and bf16_rounding == "stochastic" else per_trained
        sizes = state_bytes(optimizer, parse_optimizer_args(optimizer_args), state_dtype)
        assert sizes is not None  # estimated() refused the others above
        states = math.ceil(sizes[0] * trainable / shard) + sizes[1] * len(trained)
    transient = 0
    if strategy == "fsdp":
        bytes_per = 2 if bf16 else 4
        transient += (info["root"] + 2 * info["max_group"]) * bytes_per  # root + the block and the prefetched one
        transient += info["max_group"] * (4 + bytes_per)  # a block's unsharded gradients before reduce-scatter
        if optimizer.lower() == "adafactor":
            transient += 3 * 4 * max(math.prod(s) for s in shapes)  # whole gradient, parameter, update of one tensor
    elif bf16 and mode == "full" and not full_bf16:
        transient += 2 * params  # autocast's bf16 copies of the fp32 weights, kept through backward
    if full_bf16:  # one tensor's update in fp32: its gradient, the update or Adam's denominator, Adafactor's
        # squared gradient, the new value and the rounding's random bits
        transient += 5 * 4 * max(math.prod(s) for s in trained)
    helpers = frozen_helpers(stage, variant, text_encoder_cached=text_encoder_cached, latents_cached=latents_cached)
    sampled = sample_helpers(stage, variant, sample_full_images=sample_full_images) if samples else {}
    largest = max(sampled, key=lambda k: sampled[k], default="")
    latent = latent_size(stage, resolution, training_scale)
    selective = gradient_checkpointing and _selective(gradient_checkpointing_mode)
    per_sample = _saved_bytes(config, _precision(mixed_precision, mode, full_bf16), latent, gradient_checkpointing,
                              selective)
    activations = math.ceil(per_sample * ACTIVATION_CALIBRATION * batch_size)
    return MemoryPlan(variant if isinstance(variant, str) else "custom", mode, strategy, gpus, gpu_memory_gb,
                      optimizer.lower(), mixed_precision, gradient_checkpointing, batch_size, latent, params,
                      trainable, weights, gradients, states, transient, activations, CUDA_OVERHEAD, stage,
                      sum(helpers.values()), tuple(helpers), sampled.get(largest, 0), largest,
                      "selective" if selective else "full", full_bf16)


def plan_table(variants: tuple[str, ...] = VARIANTS, gpu_counts: tuple[int, ...] = GPU_COUNTS,
               gpu_memory: tuple[float, ...] = GPU_MEMORY, strategies: tuple[str, ...] = ("ddp", "fsdp"),
               **settings: Any) -> str:
    """A plain-text table: one row per variant × strategy × GPU count, GiB per GPU and fits on each size
    (`settings`: plan_memory's keywords, ``stage`` among them)."""
    head = ["variant", "mode", "strategy", "GPUs", "weights", "grads", "optim", "transient", "frozen", "activ.",
            "sampling", "total"]
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
                                                  plan.transient, plan.frozen, plan.activations)]
                gib += [f"{plan.sampling_peak / GiB:.1f}" if plan.sampling else "-", f"{plan.total / GiB:.1f}"]
                fits = ["yes" if plan.total <= m * GiB else "no" for m in gpu_memory]
                rows.append([variant, plan.mode, strategy if n > 1 else "1 GPU", str(n), *gib, *fits])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    p = plan_memory(variants[0], **settings)
    what = (f"Stage C, {p.latent[0]}x{p.latent[1]} latents" if p.stage == "c" else
            f"Stage B, {p.latent[0]}x{p.latent[1]} Stage A latents ({p.latent[0] * 4}x{p.latent[1] * 4} px)")
    frozen = (f"frozen during the steps: {', '.join(p.helpers)}" if p.helpers else
              "no frozen model on the GPU during the steps (cached encoders)")
    if p.sampling:
        frozen += (f"; sampling: the peak while sample images render ({p.sampling_model}, the largest of their "
                   "models, on the GPU; gradients freed); total: the larger of the step and sampling")
    weights = ", full_bf16 (bf16 weights and gradients)" if p.full_bf16 else ""
    note = (f"GiB per GPU; {what}; {p.optimizer}, mixed_precision={p.mixed_precision}{weights}, gradient checkpointing "
            f"{_checkpointing(p)}, batch {p.batch_size} per GPU; {frozen}; activations "
            f"are an estimate (x{ACTIVATION_CALIBRATION} the counted saved tensors), overhead "
            f"{CUDA_OVERHEAD / GiB:.0f} GiB included in total")
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], note])


def _checkpointing(plan: MemoryPlan) -> str:
    if not plan.gradient_checkpointing:
        return "off"
    return "on (selective)" if plan.gradient_checkpointing_mode == "selective" else "on"


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", default="c", choices=list(STAGES),
                        help="c: Stage C (the prior, default); b: Stage B (the decoder)")
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANT_NAMES),
                        help="full/bf16: Stage C 3.6 B or Stage B 1.56 B; lite/lite_bf16: 1.03 B or 700 M; tiny "
                        "(default: full lite)")
    parser.add_argument("--mode", default="full", choices=["full", "lora"])
    parser.add_argument("--gpus", nargs="+", type=int, default=list(GPU_COUNTS))
    parser.add_argument("--gpu-memory", nargs="+", type=float, default=list(GPU_MEMORY), metavar="GB")
    parser.add_argument("--strategy", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--optimizer", default="adamw",
                        help="adamw, adafactor, or another of kohya's names (lion, sgdnesterov, prodigy, dadaptadam, "
                        "adamw8bit, ...) or a torch.optim class (radam, ...)")
    parser.add_argument("--optimizer-args", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no"])
    parser.add_argument("--full-bf16", action="store_true",
                        help="the trained weights and gradients in bf16 (kohya --full_bf16; needs bf16 mixed "
                        "precision)")
    parser.add_argument("--bf16-rounding", default="stochastic", choices=BF16_ROUNDINGS,
                        help="with --full-bf16: nearest is kohya's AdamW with bf16 moments (stochastic: fp32 moments)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--gradient-checkpointing-mode", default="full", choices=["full", "selective"],
                        help="selective: the blocks' matrix products' and attention's outputs are kept (more memory, "
                        "less recomputation)")
    parser.add_argument("--batch-size", type=int, default=1, help="per GPU")
    parser.add_argument("--resolution", type=int, default=1024,
                        help="bucket side in image pixels (Stage C: 1024 -> 24x24 latents at the official scale; "
                        "Stage B: 1024 -> 256x256 Stage A latents)")
    parser.add_argument("--training-scale", default="official", choices=["official", "kohya"],
                        help="Stage C only (Stage B trains on the image's own Stage A latent)")
    parser.add_argument("--network-dim", type=int, default=4)
    parser.add_argument("--network-target", default="attention", choices=["attention", "all_linear"])
    parser.add_argument("--no-cache-text-encoder-outputs", dest="text_encoder_cached", action="store_false",
                        help="the text encoder stays on the GPU (bf16)")
    parser.add_argument("--no-cache-latents", dest="latents_cached", action="store_false",
                        help="the image encoders stay on the GPU (EfficientNet; Stage A for Stage B)")
    parser.add_argument("--samples", action="store_true",
                        help="sample images during the run: their frozen models come to the GPU one at a time while "
                        "they render (Stage B runs: the Stage C of the same size in fp32)")


def run_plan(args: argparse.Namespace) -> int:
    if not estimated(args.optimizer, args.optimizer_args):
        raise SystemExit(f"cascade-lab train plan: --optimizer {args.optimizer}: its states are not estimated; use "
                         "adamw, adafactor, or another of kohya's names (lion, sgdnesterov, prodigy, dadaptadam, "
                         "adamw8bit, ...)")
    settings = {f: getattr(args, f) for f in ("stage", "mode", "optimizer", "optimizer_args", "mixed_precision",
                                              "gradient_checkpointing", "gradient_checkpointing_mode",
                                              "batch_size", "resolution",
                                              "training_scale", "network_dim", "network_target",
                                              "text_encoder_cached", "latents_cached", "samples", "full_bf16",
                                              "bf16_rounding")}
    if args.full_bf16:
        if args.mixed_precision != "bf16":
            raise SystemExit("cascade-lab train plan: --full-bf16 with --mixed-precision no: bf16 weights compute in "
                             "bf16; leave --mixed-precision at bf16")
        strategies = [s for s in args.strategy if s != "fsdp"]  # full_bf16 is refused with FSDP
        if not strategies:
            from .config import FULL_BF16_FSDP

            raise SystemExit(f"cascade-lab train plan: {FULL_BF16_FSDP}")
        args.strategy = strategies
    print(plan_table(tuple(args.variant), tuple(args.gpus), tuple(args.gpu_memory), tuple(args.strategy),
                     **settings), flush=True)
    return 0


def estimated(optimizer: str, optimizer_args: Any = ()) -> bool:
    """Whether the planner knows `optimizer`'s states (AdamW, Adafactor, kohya's other names, torch's common ones)."""
    from .optim import parse_optimizer_args
    from .optimizers import state_bytes

    return optimizer.lower() in ("adamw", "adafactor") or \
        state_bytes(optimizer, parse_optimizer_args(optimizer_args), 4) is not None


def known_variant(model: Any, stage: str) -> str | None:
    """full / lite / tiny of a built Stage C or Stage B by its parameter count (None: another size)."""
    count = sum(p.numel() for p in model.parameters())
    known = {sum(math.prod(s) for s in _shapes(stage_config(v, stage), 4, "attention")["shapes"]): v
             for v in ("full", "lite", "tiny")}
    return known.get(count)


def run_settings(config: Any, world_size: int, strategy: str) -> dict[str, Any]:
    """plan_memory's keywords for a TrainConfig on `world_size` processes (all but the variant and GPU size)."""
    from .config import checkpointing_mode

    sampling = bool(config.sample_prompts) and bool(config.sample_every_n_steps or config.sample_every_n_epochs
                                                    or config.sample_at_first)
    return {"stage": config.stage, "mode": config.mode, "gpus": world_size,
            "strategy": "fsdp" if strategy == "fsdp" else "ddp", "optimizer": config.optimizer_type,
            "optimizer_args": config.optimizer_args, "mixed_precision": config.mixed_precision,
            "gradient_checkpointing": config.gradient_checkpointing,
            "gradient_checkpointing_mode": checkpointing_mode(config, "cuda"), "batch_size": config.train_batch_size,
            "resolution": config.resolution if isinstance(config.resolution, int) else tuple(config.resolution),
            "training_scale": config.training_scale, "network_dim": config.network_dim,
            "network_target": config.network_target, "text_encoder_cached": config.cache_text_encoder_outputs,
            "latents_cached": config.cache_latents, "samples": sampling,
            "sample_full_images": config.sample_full_images, "full_bf16": config.full_bf16,
            "bf16_rounding": config.bf16_rounding}


def check_fit(config: Any, model: Any, device: Any, world_size: int, strategy: str,
              gpu_memory_gb: float | None = None) -> MemoryPlan | None:
    """At training start on CUDA: refuse when even the weights, gradients, optimizer states and frozen models,
    or the sampling peak, cannot fit the GPU (its memory, or `gpu_memory_gb`), warn when the estimate with
    activations does not; None (no check) off CUDA, for an optimizer whose states are not known, or for a model
    that is not the full, lite or tiny size of the trained stage (``config.stage``: Stage C or Stage B)."""
    import warnings

    import torch

    from .config import ConfigError

    if device.type != "cuda" or not estimated(config.optimizer_type, config.optimizer_args):
        return None  # a custom class's states are not estimated
    variant = known_variant(model, config.stage)
    if variant is None:
        return None
    memory = gpu_memory_gb or torch.cuda.get_device_properties(device).total_memory / GiB
    settings = run_settings(config, world_size, strategy)
    plan = plan_memory(variant, gpu_memory_gb=memory, **settings)
    if plan.fits:
        return plan
    advice = "; ".join(_advice(plan, variant, settings))
    if plan.static > memory * GiB:
        raise ConfigError(f"this run cannot fit the GPU's {memory:.0f} GiB: {plan.describe()}; before any "
                          f"activations it needs {plan.static / GiB:.1f} GiB. {advice}")
    if plan.sampling_peak > memory * GiB:
        raise ConfigError(f"this run's sample images cannot fit the GPU's {memory:.0f} GiB: {plan.describe()}. "
                          f"{advice}")
    warnings.warn(f"this run may not fit the GPU's {memory:.0f} GiB (an estimate): {plan.describe()}. {advice}",
                  RuntimeWarning, stacklevel=2)
    return plan


def _advice(plan: MemoryPlan, variant: str, settings: dict[str, Any]) -> list[str]:
    out = []
    if plan.mode == "full":
        for n in (2, 4, 8, 16):
            fsdp = plan_memory(variant, gpu_memory_gb=plan.gpu_memory_gb, **{**settings, "gpus": n,
                                                                               "strategy": "fsdp", "full_bf16": False})
            if fsdp.fits:
                unlike = " (fp32 weights sharded: without full_bf16)" if plan.full_bf16 else ""
                out.append(f"strategy='fsdp'{unlike} on {n} GPUs of this size needs {fsdp.total / GiB:.1f} GiB each")
                break
    if plan.mode == "full" and not plan.full_bf16 and plan.strategy == "ddp":
        tries: list[dict[str, Any]] = [{}, {"gradient_checkpointing": True}, {"optimizer": "adafactor"},
                                       {"optimizer": "adafactor", "gradient_checkpointing": True}]
        for extra in tries:
            changed = {**settings, "full_bf16": True, "mixed_precision": "bf16", **extra}
            bf16 = plan_memory(variant, gpu_memory_gb=plan.gpu_memory_gb, **changed)
            if bf16.fits:
                also = "".join(f", {k}={v!r}".replace("True", "true") for k, v in extra.items()
                               if settings.get(k) != v)
                precision = ", mixed_precision='bf16'" if settings.get("mixed_precision", "bf16") != "bf16" else ""
                out.append(f"full_bf16=true (kohya --full_bf16: weights and gradients in bf16{precision}{also}) "
                           f"needs {bf16.total / GiB:.1f} GiB")
                break
    if not plan.gradient_checkpointing:
        out.append("gradient_checkpointing=true cuts the activations")
    elif plan.gradient_checkpointing_mode == "selective":
        full = plan_memory(variant, gpu_memory_gb=plan.gpu_memory_gb,
                           **{**settings, "gradient_checkpointing_mode": "full"})
        out.append(f"gradient_checkpointing_mode='full' recomputes the products selective checkpointing keeps "
                   f"(activations {plan.activations / GiB:.1f} -> {full.activations / GiB:.1f} GiB)")
    if plan.batch_size > 1:
        out.append("a smaller train_batch_size with gradient_accumulation_steps keeps the global batch")
    if plan.mode == "full":
        out.append("mode='lora' trains a small network on the frozen model")
    if plan.sampling and plan.sampling_peak > plan.gpu_memory_gb * GiB:
        out.append(f"the sample images bring {plan.sampling_model} ({plan.sampling / GiB:.1f} GiB) onto the GPU "
                   "while they render: sample less, or not at all")
    if plan.helpers:
        out.append(f"cache_latents / cache_text_encoder_outputs keep {', '.join(plan.helpers)} "
                   f"({plan.frozen / GiB:.1f} GiB) off the GPU")
    return out or ["use a larger GPU"]


__all__ = ["ACTIVATION_CALIBRATION", "MemoryPlan", "check_fit", "frozen_helpers", "latent_size", "plan_memory",
           "plan_table", "sample_helpers", "saved_activation_bytes", "stage_config"]
