"""Helpers for the weights tests: header-only (sparse) files of real-size layouts, manifests as shapes."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import huggingface_hub
import pytest
from conftest import read_manifest

REV = "0123456789abcdef0123456789abcdef01234567"
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


def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hub cache in tmp_path (returns HF_HOME); any download attempt fails the test."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "CASCADE_LAB_COMFYUI", "CASCADE_LAB_COMFYUI_EXTRA_PATHS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        pytest.fail(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    return home


def cache_file(home: Path, repo: str, name: str, content: bytes = b"x") -> Path:
    """Put ``name`` into the Hub cache layout: models--org--repo/snapshots/<rev>/name + refs/main."""
    repo_dir = home / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REV)
    path = repo_dir / "snapshots" / REV / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path
