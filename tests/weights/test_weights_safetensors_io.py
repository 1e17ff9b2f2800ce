"""The hand-written safetensors reader: headers, tensor reads, packing, and errors that name the problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascade_lab.weights.safetensors_io import (
    Recipe,
    WeightsFileError,
    read_header,
    read_headers,
    read_tensors,
    refuse_pickle,
)


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(6, 4, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.long),
        "h.to_q.weight": torch.randn(2, 5, generator=g),
        "h.to_k.weight": torch.randn(2, 5, generator=g),
        "h.to_v.weight": torch.randn(2, 5, generator=g),
        "half": torch.randn(2, 3, generator=g).half(),
    }
    path = tmp_path / "small.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def _raw(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def test_header_lists_names_shapes_dtypes_and_metadata(small) -> None:
    path, tensors = small
    h = read_header(path)
    assert set(h.keys()) == set(tensors)
    assert h.shape("a.weight") == (6, 4)
    assert h.tensors["b.bias"].dtype == "BF16"
    assert h.tensors["bn.num_batches_tracked"].shape == ()
    assert h.metadata == {"format": "pt"}
    assert h.main_dtype == "float32"  # 24 + 30 fp32 values against 3 bf16 and 6 fp16
    assert h.file_size == path.stat().st_size


@pytest.mark.parametrize("mmap", [True, False])
def test_read_tensors_returns_exact_values_and_keeps_integer_buffers(small, mmap: bool) -> None:
    path, tensors = small
    got = dict(read_tensors(read_header(path), tensors.keys(), mmap=mmap))
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        shared = got[k].untyped_storage().nbytes() == path.stat().st_size
        assert shared == mmap, k  # mmap: views of the mapped file; else each tensor owns its storage
    cast = dict(read_tensors(read_header(path), tensors.keys(), dtype=torch.bfloat16, mmap=mmap))
    assert cast["a.weight"].dtype == torch.bfloat16
    assert torch.equal(cast["a.weight"], tensors["a.weight"].to(torch.bfloat16))
    assert cast["bn.num_batches_tracked"].dtype == torch.long  # never cast integer buffers


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_read_tensors_packs_split_projections_and_transposes(small, dtype: torch.dtype | None) -> None:
    path, tensors = small
    plan = {"h.in_proj_weight": Recipe(("h.to_q.weight", "h.to_k.weight", "h.to_v.weight")),
            "a_t": Recipe(("a.weight",), transpose=True)}
    got = dict(read_tensors(read_header(path), plan, dtype=dtype))
    want = torch.cat([tensors["h.to_q.weight"], tensors["h.to_k.weight"], tensors["h.to_v.weight"]])
    assert torch.equal(got["h.in_proj_weight"], want.to(dtype or want.dtype))
    assert torch.equal(got["a_t"], tensors["a.weight"].t().to(dtype or want.dtype))
    assert got["a_t"].is_contiguous()
    assert plan["h.in_proj_weight"].shape(read_header(path)) == (6, 5)
    assert plan["a_t"].shape(read_header(path)) == (4, 6)


def test_sharded_headers_read_from_their_own_files(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"y": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    h = read_headers([tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"])
    got = dict(read_tensors(h, ["x", "y"]))
    assert torch.equal(got["x"], torch.ones(2)) and torch.equal(got["y"], torch.zeros(3))
    save_file({"x": torch.ones(1)}, str(tmp_path / "s3.safetensors"))
    with pytest.raises(WeightsFileError, match="appears in two shards"):
        read_headers([tmp_path / "s1.safetensors", tmp_path / "s3.safetensors"])


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused_with_a_conversion_hint(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"stage_c{suffix}"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(WeightsFileError) as e:
        read_header(path)
    msg = str(e.value)
    assert str(path) in msg and "pickle" in msg and "save_file" in msg and "stage_c.safetensors" in msg
    with pytest.raises(WeightsFileError):
        refuse_pickle(path)


def test_pickle_with_safetensors_name_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.ones(1)}, path)  # a zip archive
    with pytest.raises(WeightsFileError, match="pickle/zip file with a .safetensors name"):
        read_header(path)


def test_too_short_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsFileError, match=r"empty\.safetensors: the file is 2 bytes, too short"):
        read_header(path)


def test_bad_header_length(tmp_path: Path) -> None:
    path = _raw(tmp_path / "bad.safetensors", {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                b"\0" * 4, length=10**6)
    with pytest.raises(WeightsFileError) as e:
        read_header(path)
    assert "bad.safetensors" in str(e.value) and "bad header length" in str(e.value)
    assert "1000000 bytes" in str(e.value)


def test_broken_header_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    blob = b'{"x": {"dtype": "F32", "shape": [1], "data_off'
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    with pytest.raises(WeightsFileError, match=r"broken\.safetensors: the \d+-byte JSON header is broken"):
        read_header(path)


def test_truncated_data_names_the_tensor_and_sizes(small, tmp_path: Path) -> None:
    path, _ = small
    last = max(read_header(path).tensors.values(), key=lambda t: t.end).name
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsFileError) as e:
        read_header(cut)
    msg = str(e.value)
    assert "cut.safetensors" in msg and "truncated" in msg and "fetch it again" in msg
    assert repr(last) in msg  # the last tensor, whose bytes are gone


@pytest.mark.parametrize("mmap", [True, False])
def test_file_shrinking_after_the_header_was_read(small, tmp_path: Path, mmap: bool) -> None:
    path, tensors = small
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    header = read_header(copy)
    with open(copy, "r+b") as f:
        f.truncate(header.tensors["half"].begin + 2)
    with pytest.raises(WeightsFileError, match=r"copy\.safetensors: the file is truncated: tensor 'half'"):
        dict(read_tensors(header, tensors.keys(), mmap=mmap))


def test_inconsistent_offsets_and_unknown_dtypes(tmp_path: Path) -> None:
    path = _raw(tmp_path / "odd.safetensors", {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                b"\0" * 8)
    with pytest.raises(WeightsFileError, match=r"tensor 'x' F32\[3\] needs 12 bytes but its offsets span 8"):
        read_header(path)
    path = _raw(tmp_path / "dt.safetensors", {"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}},
                b"\0")
    with pytest.raises(WeightsFileError, match="dtype 'Q4'"):
        read_header(path)
    path = _raw(tmp_path / "entry.safetensors", {"x": {"shape": [1]}}, b"\0")
    with pytest.raises(WeightsFileError, match="header entry 'x' is malformed"):
        read_header(path)
