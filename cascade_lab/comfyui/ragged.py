"""Cond and uncond of different lengths in one guided step, as ComfyUI runs them: separate model calls.

ComfyUI batches the positive and negative rows into one forward only when their inputs have the same shapes;
an unCLIP positive with two images ([1, 2, 768] image embeddings) against the plain negative ([1, 1, 768]), or a
154-token prompt against a 77-token one, runs as two forwards. cascade_lab's guided denoisers stack cond and
uncond along the batch, so such inputs are zero-padded to one length here, each row carries its true length,
and `RaggedModel` calls the model once per group of rows of equal lengths with the padding cut off again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Tensor = torch.Tensor
LENGTHS = "_ragged_lengths"  # [rows, n keys] int64: each row's true length of each padded input


def pad_pair(cond: dict[str, Any], uncond: dict[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, Any],
                                                                                          dict[str, Any], bool]:
    """Zero-pad ``keys`` (dim 1) of cond and uncond to a common length; the lengths go in under `LENGTHS`.
    Returns the inputs unchanged, and False, when the lengths already agree."""
    if all(cond[k].shape[1] == uncond[k].shape[1] for k in keys):
        return cond, uncond, False
    out = []
    for side in (cond, uncond):
        padded = dict(side)
        rows = side[keys[0]].shape[0]
        lengths = []
        for k in keys:
            top = max(cond[k].shape[1], uncond[k].shape[1])
            value = side[k]
            lengths.append(value.shape[1])
            if value.shape[1] < top:
                zeros = value.new_zeros(value.shape[0], top - value.shape[1], *value.shape[2:])
                padded[k] = torch.cat([value, zeros], dim=1)
        padded[LENGTHS] = torch.tensor([lengths] * rows, dtype=torch.long)
        out.append(padded)
    return out[0], out[1], True


class RaggedModel:
    """Wraps a stage model: rows are grouped by their `LENGTHS` row, each group runs with its inputs cut back."""

    def __init__(self, model: Any, keys: tuple[str, ...]) -> None:
        self.model, self.keys = model, keys

    def to(self, *args: Any, **kwargs: Any) -> RaggedModel:
        self.model.to(*args, **kwargs)
        return self

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, x: Tensor, r: Tensor, **inputs: Any) -> Tensor:
        lengths = inputs.pop(LENGTHS)
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, key in enumerate(map(tuple, lengths.tolist())):
            groups.setdefault(key, []).append(row)
        out = torch.empty_like(x)
        for key, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            part = {name: _rows(value, index, x.size(0)) for name, value in inputs.items()}
            for name, length in zip(self.keys, key, strict=True):
                part[name] = part[name][:, :length]
            out[index] = self.model(x[index], r[index], **part).to(out.dtype)
        return out


def _rows(value: Any, index: Tensor, batch: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.size(0) == batch:
        return value[index.to(value.device)]
    if isinstance(value, (list, tuple)):
        return [_rows(v, index, batch) for v in value]
    if isinstance(value, Mapping):
        return {k: _rows(v, index, batch) for k, v in value.items()}
    return value
