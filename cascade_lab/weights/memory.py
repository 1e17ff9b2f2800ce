"""How much memory each variant needs on a device, and the largest variant that fits.

Weights are counted at their *compute* dtype: Stage C in bf16 where the device has it (CUDA with bf16,
or the CPU), else fp32 — never fp16, which gives black images (spec §10, peers §2); Stage B and the text
encoder in bf16, or fp16 on GPUs without bf16; Stage A in fp32. Two numbers per variant: everything
resident at once, and with stage swapping (only the largest of text encoder / Stage C / Stage B /
Stage A on the device at a time). Both add an activation margin for a 1024² image. ControlNets count at
Stage C's compute dtype (the pipeline runs them in it), once per control.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registry import Variant
from .controlnets import CONTROLNET_FILES

if TYPE_CHECKING:
    import torch

GiB = 1024**3
# Activations for one 1024x1024 image with CFG: Stage A's decode at 512x512x768 (fp32) dominates.
ACTIVATION_MARGIN = 2 * GiB
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRIORITY = ("full", "bf16", "lite", "lite_bf16")  # tie-break for variants of equal model size


@dataclass(frozen=True)
class ComputeDtypes:
    """The dtype each part computes in on a device."""

    stage_c: str
    stage_b: str
    text_encoder: str
    stage_a: str = "float32"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a variant needs on a device, per part, and the two totals."""

    variant: str
    dtypes: ComputeDtypes
    stage_c: int
    stage_b: int
    text_encoder: int
    stage_a: int
    margin: int
    controlnets: int = 0  # all the ControlNets of the generation together

    @property
    def resident(self) -> int:
        """Everything loaded at once."""
        return self.stage_c + self.stage_b + self.text_encoder + self.stage_a + self.controlnets + self.margin

    @property
    def swapped(self) -> int:
        """With stage swapping: only the largest part is on the device at a time (the ControlNets run before
        Stage C, their features kept)."""
        return max(self.stage_c, self.stage_b, self.text_encoder, self.stage_a, self.controlnets) + self.margin

    def describe(self) -> str:
        with_cn = f", ControlNets {self.controlnets / GiB:.2f} GiB" if self.controlnets else ""
        return (f"{self.variant}: {self.resident / GiB:.1f} GiB all resident, {self.swapped / GiB:.1f} GiB "
                f"with stage swapping (Stage C {self.dtypes.stage_c}, Stage B {self.dtypes.stage_b}{with_cn})")


@dataclass(frozen=True)
class Choice:
    """The variant picked for a device, with the numbers behind the choice."""

    variant: str | None
    available: int
    swap: bool
    estimates: tuple[MemoryEstimate, ...]
    reason: str


def _device(device: str | torch.device) -> tuple[str, int | None]:
    text = str(device)
    kind, _, index = text.partition(":")
    return kind, int(index) if index else None


def bf16_supported(device: str | torch.device) -> bool:
    """bf16 compute on this device: CUDA with bf16 support, or the CPU."""
    kind, index = _device(device)
    if kind == "cpu":
        return True
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
            try:  # native bf16 only (Ampere and later): older cards emulate it, slowly
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # torch < 2.3 has no including_emulation and never counts emulation
                return bool(torch.cuda.is_bf16_supported())
    return False


def compute_dtypes(device: str | torch.device = "cpu", *, bf16: bool | None = None) -> ComputeDtypes:
    """The compute dtypes for ``device`` (``bf16`` overrides the detection, for tests)."""
    has_bf16 = bf16_supported(device) if bf16 is None else bf16
    if has_bf16:
        return ComputeDtypes("bfloat16", "bfloat16", "bfloat16")
    # No bf16: Stage C must stay fp32 (fp16 overflows to NaN, spec §10); B and CLIP are fine in fp16.
    half = "float16" if _device(device)[0] != "cpu" else "float32"
    return ComputeDtypes("float32", half, half)


def estimate(variant: Variant, dtypes: ComputeDtypes, *, margin: int = ACTIVATION_MARGIN,
             controls: Iterable[str | os.PathLike[str]] = ()) -> MemoryEstimate:
    """Bytes ``variant`` needs when its parts compute in ``dtypes``, with the ControlNets of ``controls``: kinds
    (``"canny"``, ``"inpainting"``, ``"super_resolution"``: the official files) or ControlNet files."""

    def part(name: str, dtype: str) -> int:
        f = variant.files.get(name)
        return 0 if f is None else f.params * BYTES[dtype]

    cnets = sum(controlnet_bytes(c, dtypes.stage_c) for c in controls)
    return MemoryEstimate(variant.name, dtypes, part("stage_c", dtypes.stage_c), part("stage_b", dtypes.stage_b),
                          part("text_encoder", dtypes.text_encoder), part("stage_a", dtypes.stage_a), margin, cnets)


def controlnet_bytes(control: str | os.PathLike[str], dtype: str) -> int:
    """Bytes of a ControlNet computing in ``dtype``: the official file of a kind, or a file read from its header
    (floating-point values in ``dtype``, integer buffers as stored)."""
    if isinstance(control, str) and control in CONTROLNET_FILES:
        return CONTROLNET_FILES[control].params * BYTES[dtype]
    if isinstance(control, str) and not control.endswith(".safetensors") and not os.path.exists(control):
        raise ValueError(f"control {control!r}: give a kind ({', '.join(CONTROLNET_FILES)}) or a ControlNet file")
    from .safetensors_io import DTYPES, read_header

    return sum(t.numel * (BYTES[dtype] if t.dtype.startswith(("F", "BF")) else DTYPES[t.dtype][1])
               for t in read_header(control).tensors.values())


def controlnet_stage_c(control: str | os.PathLike[str]) -> str | None:
    """The Stage C size (``full`` / ``lite``) a ControlNet is built for: a kind names an official file (3.6B
    Stage C); a file tells by its projection width (header only). None: a width of no official Stage C."""
    if isinstance(control, str) and control in CONTROLNET_FILES:
        return "full"  # every public ControlNet feeds the 3.6B Stage C (c_proj 2048)
    from .detect import STAGE_C_WIDTH
    from .safetensors_io import read_header

    widths = {t.shape[0] for k, t in read_header(control).tensors.items()
              if k.split(".")[-2:] == ["2", "weight"] and "projections." in k}
    return STAGE_C_WIDTH.get(widths.pop()) if len(widths) == 1 else None


def _width(module: Any, path: Sequence[Any], fallback: int) -> int:
    """The out_channels of the conv at ``path`` (attribute names and indexes) in a stage, or `fallback` when the
    stage is not a loaded module (a `Lazy` loader keeps its config: its width is read from there)."""
    config = getattr(module, "config", None)
    if config is not None and not hasattr(module, "parameters"):
        hidden = getattr(config, "c_hidden", None)
        if isinstance(hidden, int):  # Stage A: its top level is c_hidden / 2**(levels - 1)
            return hidden // 2 ** (int(getattr(config, "levels", 2)) - 1)
        if isinstance(hidden, (list, tuple)) and hidden:
            return int(hidden[0])
        return fallback
    node = module
    try:
        for step in path:
            node = node[step] if isinstance(step, int) else getattr(node, step)
        return int(node.out_channels)
    except (AttributeError, IndexError, TypeError):
        return fallback


def activation_bytes(stage_a: Any, stage_b: Any, width: int, height: int, batch: int = 1) -> int:
    """A lower bound of the memory a generation's decoding needs beyond the weights, at ``width`` x ``height``:

    Stage A's top level runs at half the image resolution with c0 channels and ResBlocks that widen them 4x
    (input, widened and output tensors live together: 6·c0 values per half-resolution pixel); Stage B's top
    level likewise at 1/8 of it with its c_hidden[0]; and the image itself (float32 RGB, twice while it is
    converted). Float32 values: Stage A and the decode run in float32. Official full-size: ~1.4 KB per pixel."""
    c_a = _width(stage_a, ("in_block", 1), 192)  # official Stage A: 192 at H/2
    c_b = _width(stage_b, ("embedding", 1), 320)  # official Stage B: 320 at H/8
    per_pixel = 6 * c_a * 4 / 4 + 6 * c_b * 4 / 64 + 3 * 4 * 2
    return int(batch * width * height * per_pixel)


def check_generation_fits(stage_a: Any, stage_b: Any, width: int, height: int, batch: int,
                          device: str | torch.device = "cpu", *, available: int | None = None) -> None:
    """Refuse a size whose decoding cannot fit the free memory of ``device``, naming the largest size (same
    aspect ratio, multiples of 128) and batch that would, before any sampling starts."""
    need = activation_bytes(stage_a, stage_b, width, height, batch)
    free = available_memory(device) if available is None else available
    if free <= 0 or need <= free:
        return
    scale = (free / need) ** 0.5
    w, h = (max(128, int(width * scale) // 128 * 128), max(128, int(height * scale) // 128 * 128))
    fits_batch = batch > 1 and activation_bytes(stage_a, stage_b, width, height, 1) <= free
    more = (f", or batch_size={max(1, int(free // activation_bytes(stage_a, stage_b, width, height, 1)))} at this "
            "size") if fits_batch else ""
    raise ValueError(f"{width}x{height} (batch {batch}) needs at least {need / GiB:.1f} GiB to decode, more than the "
                     f"{free / GiB:.1f} GiB free on {device}; the largest size that fits is about {w}x{h}{more}")


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available RAM otherwise."""
    kind, index = _device(device)
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def real_variants() -> list[Variant]:
    """Registered variants that load both diffusion stages from files (not the built-in tiny ones)."""
    from ..plugins import registries

    return [v for v in registries()["variant"] if "stage_c" in v.files and "stage_b" in v.files]


def choose_variant(
    device: str | torch.device = "cpu",
    *,
    available: int | None = None,
    swap: bool = True,
    variants: Iterable[Variant] | None = None,
    dtypes: ComputeDtypes | None = None,
    margin: int = ACTIVATION_MARGIN,
    controls: Iterable[str | os.PathLike[str]] = (),
) -> Choice:
    """The largest variant whose weights fit ``available`` bytes (default: free memory on ``device``).

    Largest means most diffusion-model parameters; among equal sizes the one whose files are stored in the
    compute dtype wins (the bf16 files when computing in bf16: same quality, half the download). ``controls``
    adds ControlNets as :func:`estimate` does, and keeps only the variants whose Stage C they fit (the shipped
    ControlNets are built for the 3.6B Stage C: never lite with them).
    """
    dtypes = dtypes or compute_dtypes(device)
    free = available_memory(device) if available is None else available
    pool = list(real_variants() if variants is None else variants)
    controls = tuple(controls)
    sizes = {controlnet_stage_c(c) for c in controls} - {None}
    note = ""
    if sizes:
        fitting = [v for v in pool if v.stage_c in sizes]
        if len(sizes) > 1 or not fitting:
            built = ", ".join(sorted(f"{s} Stage C" for s in sizes if s))
            return Choice(None, free, swap, (), f"the ControlNets given are built for the {built}, and "
                          + ("no single Stage C fits them all" if len(sizes) > 1 else
                             f"none of the variants at hand ({', '.join(v.name for v in pool) or 'none'}) has it"))
        if len(fitting) < len(pool):
            note = (f" (the ControlNets given are built for the {sizes.pop()} Stage C: "
                    + ", ".join(v.name for v in pool if v not in fitting) + " ruled out)")
        pool = fitting
    ests = {v.name: estimate(v, dtypes, margin=margin, controls=controls) for v in pool}

    def rank(v: Variant) -> tuple[int, int, int]:
        size = sum(f.params for k, f in v.files.items() if k in ("stage_c", "stage_b"))
        stored = v.files["stage_c"].dtype if "stage_c" in v.files else ""
        match = 0 if stored == dtypes.stage_c else 1
        prio = PRIORITY.index(v.name) if v.name in PRIORITY else len(PRIORITY)
        return (-size, match, prio)

    ordered = sorted(pool, key=rank)
    need, how = ("swapped", "with stage swapping") if swap else ("resident", "all resident")
    estimates = tuple(ests[v.name] for v in ordered)
    for v in ordered:
        e = ests[v.name]
        if getattr(e, need) <= free:
            return Choice(v.name, free, swap, estimates,
                          f"{v.name} needs {getattr(e, need) / GiB:.1f} GiB {how} "
                          f"of {free / GiB:.1f} GiB free on {device}")
    smallest = min(estimates, key=lambda e: getattr(e, need), default=None)
    reason = (f"no variant fits {free / GiB:.1f} GiB free on {device}"
              + (f"; the smallest, {smallest.variant}, needs {getattr(smallest, need) / GiB:.1f} GiB"
                 if smallest else "; no variants are registered") + note)
    return Choice(None, free, swap, estimates, reason)
