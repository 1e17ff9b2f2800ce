"""A KSampler side (positive or negative) with several conditionings, or sides that cannot share one forward, run
as ComfyUI runs them: each conditioning its own model call, the side's prediction their average.

ComfyUI evaluates every conditioning entry of a side (ConditioningCombine makes several; ConditioningSetTimestepRange
limits one to a fraction of the steps) and averages the active ones' predictions; it batches the positive and
negative rows into one forward only when their inputs have the same shapes (an unCLIP positive with two images
against a plain negative, or a 154-token prompt against a 77-token one, run apart). cascade_lab's guided denoiser
stacks cond and uncond rows in one call, so `SeparateSides` takes that call, marked by a ``side`` input per row and
the step position ``t``, and makes the per-entry calls itself. Averaging ε or x0 is the same: x0 = x − σ·ε.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
SIDE, STEP = "_side", "_t"  # per-row side (0 positive, 1 negative) and the step position t, as model inputs


@dataclass(frozen=True)
class Entry:
    """One conditioning of a side: its model inputs ([1 or B, ...] tensors), the step fraction it applies in, and
    ``extra(t)``, inputs of its own per step (its ControlNets' features)."""

    inputs: Mapping[str, Any]
    start: float = 0.0
    end: float = 1.0
    extra: Callable[[float], Mapping[str, Any]] | None = None


def needs_separate_calls(sides: Sequence[Sequence[Entry]]) -> bool:
    """True unless each side is one conditioning over all steps and both sides' inputs have the same shapes."""
    if any(len(side) != 1 or (side[0].start, side[0].end) != (0.0, 1.0) for side in sides):
        return True
    if len(sides) < 2:
        return False
    a, b = sides[0][0].inputs, sides[1][0].inputs
    return any(isinstance(a[k], Tensor) and a[k].shape != b[k].shape for k in a)


def check_coverage(sides: Sequence[Sequence[Entry]], names: Sequence[str]) -> None:
    """Every step needs an active conditioning on each side (ComfyUI would predict zeros there)."""
    for side, name in zip(sides, names, strict=False):
        ranges = sorted((e.start, e.end) for e in side)
        covered = 0.0
        for start, end in ranges:
            if start > covered + 1e-9:
                break
            covered = max(covered, end)
        if covered < 1.0 - 1e-9:
            spans = ", ".join(f"{a:g}-{b:g}" for a, b in ranges)
            raise ValueError(f"the {name} conditioning's timestep ranges ({spans}) leave the steps from {covered:g} "
                             "on without a conditioning; cover 0 to 1")


class SeparateSides:
    """A stage model called per conditioning entry; rows are told apart by the `SIDE` input."""

    def __init__(self, model: Any, sides: Sequence[Sequence[Entry]],
                 active: Callable[[float, float, float], bool] | None = None) -> None:
        """``active(t, start, end)``: whether an entry applies at the step's t (default: t the step position)."""
        from ..controls import in_step_range

        self.model, self.sides, self.active = model, [list(s) for s in sides], active or in_step_range

    def to(self, *args: Any, **kwargs: Any) -> SeparateSides:
        self.model.to(*args, **kwargs)
        return self

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, x: Tensor, r: Tensor, **inputs: Any) -> Tensor:
        side_of_row = inputs.pop(SIDE)
        t = float(inputs.pop(STEP, 1.0))
        out = torch.empty_like(x)
        for side in side_of_row.unique().tolist():
            rows = (side_of_row == side).nonzero().flatten().to(x.device)
            shared = {k: _rows(v, rows, x.size(0)) for k, v in inputs.items()}  # ControlNet features, ...
            active = [e for e in self.sides[int(side)] if self.active(t, e.start, e.end)]
            total = torch.zeros_like(x[rows])
            for entry in active:
                given = {k: _expand(v, len(rows)) for k, v in entry.inputs.items()}
                if entry.extra is not None:
                    given.update(entry.extra(t) or {})
                total += self.model(x[rows], r[rows], **{**shared, **given}).to(x.dtype)
            out[rows] = total / max(1, len(active))
        return out


def _expand(value: Any, rows: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.size(0) == 1 and rows > 1:
        return value.expand(rows, *value.shape[1:])
    return value


def _rows(value: Any, index: Tensor, batch: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.size(0) == batch:
        return value[index.to(value.device)]
    if isinstance(value, (list, tuple)):
        return [_rows(v, index, batch) for v in value]
    return value
