"""Helpers for the weights tests: header-only (sparse) files of real-size layouts, manifests as shapes."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

from conftest import read_manifest

CODES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2), "int64": ("I64", 8)}


def manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, shape, _ in read_manifest(name)}


def write_sparse(path: Path, shapes: Mapping[str, tuple[int, ...]], dtype: str = "bfloat16") -> Path:
    """A valid safetensors file with this layout whose data section is a hole: full size, no disk used."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        code, width = CODES["int64" if key.endswith("num_batches_tracked") else dtype]
        n = 1
        for s in shape:
            n *= s
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n * width]}
        offset += n * width
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path
