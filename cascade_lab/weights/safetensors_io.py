"""Safetensors files read by hand: the header alone (instant on a 14 GB file) and tensors one at a time.

Format (github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
``{"name": {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data section; offsets are relative to its start. Every tensor is read with ``readinto`` straight
into its final storage, so loading never holds a second full-size copy of the weights.
Pickle files are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation refuses larger headers too


class WeightsFileError(ValueError):
    """A weights file that cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header; ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype_name(self) -> str:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Header:
    """What a safetensors file holds, from its JSON header only."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)
    file_size: int = 0

    def shape(self, key: str) -> tuple[int, ...] | None:
        info = self.tensors.get(key)
        return None if info is None else info.shape

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def dtypes(self) -> dict[str, int]:
        """Storage dtype name -> number of values, floating-point tensors only."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            name = t.torch_dtype_name
            if name.startswith(("float", "bfloat")):
                out[name] = out.get(name, 0) + t.numel
        return out

    @property
    def main_dtype(self) -> str | None:
        """The floating-point dtype holding most values (the file's storage dtype)."""
        d = self.dtypes
        return max(d, key=lambda k: d[k]) if d else None


def refuse_pickle(path: Path) -> None:
    """Raise for ``.ckpt``/``.pt``/``.bin``/``.pth`` files: only safetensors are read."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsFileError(
            f"{path}: {path.suffix} files are Python pickles, and loading a pickle can run arbitrary code, "
            f"so cascade_lab reads only .safetensors. Convert it once, in an environment you trust:\n"
            f"  python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', map_location='cpu', weights_only=True); "
            f"sd = sd.get('state_dict', sd); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.with_suffix('.safetensors')}')\""
        )


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of ``path`` without reading any tensor data."""
    path = Path(path)
    refuse_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsFileError(
                    f"{path}: the file is {size} bytes, too short to be safetensors (an empty or "
                    f"interrupted download?); delete it and fetch it again")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or n > size - 8:
                if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and 2 <= head[1] <= 5):
                    raise WeightsFileError(
                        f"{path}: this is a PyTorch pickle/zip file with a .safetensors name, not "
                        f"safetensors; convert it with safetensors.torch.save_file")
                raise WeightsFileError(
                    f"{path}: bad header length: the first 8 bytes say the JSON header is {n} bytes, but the "
                    f"file has {size - 8} bytes after them (limit {MAX_HEADER_BYTES}); the file is truncated "
                    f"or not safetensors. Delete it and fetch it again")
            raw = f.read(n)
    except OSError as e:
        raise WeightsFileError(f"{path}: cannot read the file: {e}") from e
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFileError(
            f"{path}: the {n}-byte JSON header is broken ({e}); the file is corrupt. "
            f"Delete it and fetch it again") from None
    if not isinstance(doc, dict):
        raise WeightsFileError(f"{path}: the JSON header is a {type(doc).__name__}, not an object; corrupt file")
    return _parse_entries(path, doc, data_start=8 + n, file_size=size)


def _parse_entries(path: Path, doc: dict[str, Any], *, data_start: int, file_size: int) -> Header:
    meta = doc.pop("__metadata__", None) or {}
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsFileError(
                f"{path}: header entry {name!r} is malformed ({entry!r}); corrupt file") from None
        if code not in DTYPES:
            raise WeightsFileError(
                f"{path}: tensor {name!r} has dtype {code!r}, which cascade_lab cannot read "
                f"(known: {', '.join(DTYPES)})")
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not (0 <= begin <= end):
            raise WeightsFileError(f"{path}: tensor {name!r} has a bad shape/offsets {entry!r}; corrupt file")
        info = TensorInfo(name, code, shape, data_start + begin, data_start + end)
        if end - begin != info.numel * DTYPES[code][1]:
            raise WeightsFileError(
                f"{path}: tensor {name!r} {code}{list(shape)} needs {info.numel * DTYPES[code][1]} bytes but "
                f"its offsets span {end - begin}; corrupt file")
        if end > data_len:
            raise WeightsFileError(
                f"{path}: the file is truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_len} bytes ({file_size} bytes on disk, "
                f"{data_start + end} expected). An interrupted download? Delete it and fetch it again")
        tensors[name] = info
    return Header(path, tensors, {str(k): str(v) for k, v in meta.items()}, file_size)


def read_headers(paths: Sequence[str | os.PathLike[str]]) -> Header:
    """One header for a sharded checkpoint: the union of the shards' entries (each keeps its own path)."""
    if len(paths) == 1:
        return read_header(paths[0])
    merged: dict[str, TensorInfo] = {}
    owner: dict[str, Path] = {}
    for p in paths:
        h = read_header(p)
        for k, t in h.tensors.items():
            if k in merged:
                raise WeightsFileError(f"tensor {k!r} appears in two shards: {owner[k]} and {h.path}")
            merged[k] = t
            owner[k] = h.path
    return ShardedHeader(Path(paths[0]).parent, merged, {}, 0, owner)


@dataclass(frozen=True)
class ShardedHeader(Header):
    """A header assembled from several shard files; ``owner`` says which file holds each tensor."""

    owner: Mapping[str, Path] = field(default_factory=dict)


def file_of(header: Header, key: str) -> Path:
    return header.owner[key] if isinstance(header, ShardedHeader) else header.path


@dataclass(frozen=True)
class Recipe:
    """How to make one target tensor: concatenate ``sources`` on dim 0, then transpose if asked."""

    sources: tuple[str, ...]
    transpose: bool = False

    def shape(self, header: Header) -> tuple[int, ...]:
        """The resulting shape, from the header alone."""
        shapes = [header.tensors[s].shape for s in self.sources]
        shape = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
        return tuple(reversed(shape)) if self.transpose else shape


def read_tensors(
    header: Header,
    plan: Mapping[str, Recipe] | Iterable[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    mmap: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(target_name, tensor)`` for each entry of ``plan``, never holding more than one extra tensor.

    ``plan`` maps a target name to a :class:`Recipe` (split ``to_q/to_k/to_v`` are packed back into one
    ``in_proj_weight`` by reading each into its row block). Floating-point tensors are cast to ``dtype``;
    integer buffers keep theirs. With ``mmap`` (CPU only), a tensor already stored in its target dtype is
    a view of a private copy-on-write map of the file: nothing is copied, pages load on first use and stay
    reclaimable page cache. Every other tensor is read with ``readinto`` — straight into its final storage,
    or through one reused scratch buffer when it must be cast, transposed or moved to another device.
    """
    import torch

    if sys.byteorder != "little":  # pragma: no cover - no big-endian torch builds in practice
        raise WeightsFileError("safetensors data is little-endian; this machine is big-endian")
    if not isinstance(plan, Mapping):
        plan = {k: Recipe((k,)) for k in plan}
    dev = torch.device(device) if device is not None else torch.device("cpu")
    reader = _Reader(header, torch)
    try:
        for target, recipe in plan.items():
            infos = [header.tensors[s] for s in recipe.sources]
            shape = recipe.shape(header)
            stored = getattr(torch, infos[0].torch_dtype_name)
            out_dtype = dtype if dtype is not None and stored.is_floating_point else stored
            direct = dev.type == "cpu" and out_dtype == stored and not recipe.transpose
            t = reader.mapped(infos[0]) if direct and mmap and len(infos) == 1 else None
            if t is None and direct:  # bytes straight into the final storage
                t = torch.empty(shape, dtype=stored)
                reader.read_into(infos, t)
            elif t is None:
                raw_shape = tuple(reversed(shape)) if recipe.transpose else shape
                tmp = reader.scratch(raw_shape, stored)
                reader.read_into(infos, tmp)
                t = torch.empty(shape, dtype=out_dtype, device=dev)
                t.copy_(tmp.t() if recipe.transpose else tmp)  # cast, transpose and move in one copy
            yield target, t
    finally:
        reader.close()


class _Reader:
    """Open files, private file maps and a scratch buffer for one :func:`read_tensors` pass."""

    def __init__(self, header: Header, torch: Any) -> None:
        self.header, self.torch = header, torch
        self.handles: dict[Path, Any] = {}
        self.maps: dict[Path, Any] = {}
        self._scratch: Any = None

    def close(self) -> None:
        for h in self.handles.values():
            h.close()
        self._scratch = None

    def mapped(self, info: TensorInfo) -> Any:
        """``info`` as a view of a private (copy-on-write) map of its file, or None if misaligned/empty."""
        torch = self.torch
        if info.numel == 0 or info.begin % DTYPES[info.dtype][1]:
            return None
        path = file_of(self.header, info.name)
        base = self.maps.get(path)
        if base is None:
            storage = torch.UntypedStorage.from_file(str(path), False, os.path.getsize(path))  # MAP_PRIVATE
            base = self.maps[path] = torch.empty(0, dtype=torch.uint8).set_(storage)
        if base.numel() < info.end:  # the file shrank after its header was read
            self._truncated(path, info, base.numel() - info.begin)
        view = base[info.begin:info.end].view(getattr(torch, info.torch_dtype_name))
        return view.view(info.shape)

    def scratch(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A reused buffer viewed as ``shape``/``dtype`` (grown when needed, never shrunk)."""
        torch = self.torch
        nbytes = max(1, torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size())
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = None
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        return self._scratch[:nbytes].view(dtype)[: torch.Size(shape).numel()].view(shape)

    def read_into(self, infos: list[TensorInfo], out: Any) -> None:
        """Read ``infos`` back to back (concatenated on dim 0) into the contiguous tensor ``out``."""
        first = infos[0]
        for other in infos[1:]:
            if other.dtype != first.dtype or other.shape[1:] != first.shape[1:]:
                raise WeightsFileError(
                    f"{file_of(self.header, first.name)}: cannot pack {first.name!r} {first.dtype}"
                    f"{list(first.shape)} with {other.name!r} {other.dtype}{list(other.shape)}: "
                    f"dtypes or trailing shapes differ")
        flat = out.reshape(-1).view(self.torch.uint8)  # the same storage, as bytes
        pos = 0
        for info in infos:
            nbytes = info.end - info.begin
            if nbytes == 0:
                continue
            path = file_of(self.header, info.name)
            f = self.handles.get(path)
            if f is None:
                f = self.handles[path] = open(path, "rb", buffering=0)
            f.seek(info.begin)
            view = memoryview(flat[pos:pos + nbytes].numpy())
            got = 0
            while got < nbytes:  # readinto may return short counts on some file systems
                n = f.readinto(view[got:])
                if not n:
                    self._truncated(path, info, got)
                got += n
            pos += nbytes

    @staticmethod
    def _truncated(path: Path, info: TensorInfo, got: int) -> None:
        raise WeightsFileError(
            f"{path}: the file is truncated: tensor {info.name!r} should span bytes {info.begin}.."
            f"{info.end} but the file ends at {info.begin + max(got, 0)}. Delete it and fetch it again")
