"""A CLIP tokenizer folder (``vocab.json`` + ``merges.txt``, the layout of ComfyUI's ``comfy/sd1_tokenizer``) made
offline from OpenAI's BPE file, ``bpe_simple_vocab_16e6.txt.gz``, which the ``open_clip_torch`` wheel ships.

The vocabulary is CLIP's, built as OpenAI's SimpleTokenizer builds it: the 256 byte symbols, the same with
``</w>``, one entry per merge (the first 48894 merges), then ``<|startoftext|>`` and ``<|endoftext|>``: 49408 ids.
Get the file without installing the package (and its torchvision): ``pip download --no-deps open_clip_torch``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import zipfile
from pathlib import Path

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49408 = 2·256 byte symbols + merges + 2 special tokens


def bpe_bytes(source: str | os.PathLike[str] | None = None) -> bytes:
    """The gzip'd BPE file from ``source`` (the .txt.gz, an open_clip_torch wheel, or a folder holding either),
    else from an installed ``open_clip`` package (found without importing it)."""
    candidates: list[Path] = []
    if source is not None:
        path = Path(source).expanduser()
        candidates = sorted(path.glob("*.whl")) + [path / BPE_NAME] if path.is_dir() else [path]
    else:
        spec = importlib.util.find_spec("open_clip")
        if spec is not None and spec.submodule_search_locations:
            candidates = [Path(p) / BPE_NAME for p in spec.submodule_search_locations]
    for path in candidates:
        if path.suffix in (".whl", ".zip") and path.is_file():
            with zipfile.ZipFile(path) as wheel:
                names = [n for n in wheel.namelist() if n.endswith("/" + BPE_NAME)]
                if names:
                    return wheel.read(names[0])
        elif path.is_file():
            return path.read_bytes()
    where = ", ".join(map(str, candidates)) or "no open_clip package installed"
    raise FileNotFoundError(f"CLIP's BPE file {BPE_NAME} not found (looked in {where}); get it with "
                            "`pip download --no-deps open_clip_torch` and pass the wheel")


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte → printable character table, in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(folder: str | os.PathLike[str], source: str | os.PathLike[str] | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's tokenizer into ``folder`` (made if needed); returns it.
    Point ``tokenizer=`` of `cascade_lab.comfyui.run` at it, or write it as ``<ComfyUI>/comfy/sd1_tokenizer``."""
    lines = gzip.decompress(bpe_bytes(source)).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder
