"""kohya's fine-tuning datasets: a metadata JSON (``--in_json`` or a subset's ``metadata_file``) naming the images.

The JSON is what kohya's ``finetune/merge_captions_to_metadata.py``, ``merge_dd_tags_to_metadata.py`` and
``prepare_buckets_latents.py`` write: ``{image_key: {"caption": ..., "tags": ..., "train_resolution": [w, h], ...}}``.
Read with kohya's meanings (``train_util.FineTuningDataset``): a key is an image path as it stands, else a file
stem in the subset's ``image_dir`` with one of the image extensions; the caption is ``caption``, or ``tags``, or
``caption + ", " + tags``; ``train_resolution`` is the image's bucket. An entry whose image cannot be found stops
kohya at the first one ("no image"); here all of them are listed before any training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .toml_config import IMAGE_EXTENSIONS, SubsetSpec

Size = tuple[int, int]  # (width, height)

@dataclass(frozen=True)
class MetadataEntry:
    """One image of a metadata JSON: where it is, its caption, and the bucket kohya assigned it (if any)."""

    key: str
    path: Path
    caption: str
    train_resolution: Size | None  # image pixels (w, h), from prepare_buckets_latents.py


def load_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """The JSON's entries, checked to have kohya's shape; a ConfigError names the file, the key and the value."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"metadata file {path}: not valid JSON ({exc}); give the file kohya's "
                          "finetune/merge_captions_to_metadata.py wrote") from None
    if not isinstance(data, dict):
        raise ConfigError(f"metadata file {path}: a JSON {type(data).__name__}, where kohya's metadata is an object "
                          '{"<image key>": {"caption": "...", "tags": "..."}, ...}')
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"metadata file {path}: entry {key!r} is {entry!r}; each entry is an object with "
                              '"caption" and/or "tags" (and "train_resolution": [w, h])')
        for name in ("caption", "tags"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise ConfigError(f"metadata file {path}: entry {key!r}: {name}={entry[name]!r}: use a text")
        reso = entry.get("train_resolution")
        if reso is not None and not (isinstance(reso, list) and len(reso) == 2
                                     and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in reso)):
            raise ConfigError(f"metadata file {path}: entry {key!r}: train_resolution={reso!r}: use [width, height] "
                              "in pixels (prepare_buckets_latents.py writes it), or leave it out")
    return data


def entry_caption(entry: dict[str, Any]) -> str:
    """kohya's caption of an entry: the caption, the tags when there is no caption, else both joined by ", "."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        return tags or ""
    return f"{caption}, {tags}" if tags else caption


def find_image(key: str, image_dir: str) -> Path | None:
    """The image file of a metadata key: the key as a path (kohya: --full_path keys), else ``image_dir/key`` plus
    each image extension, lower or upper case (the first in sorted order, as kohya's glob), else ``image_dir/key``
    when the key already ends in an image extension (kohya finds no image there)."""
    as_given = Path(key).expanduser()
    if as_given.is_file():
        return as_given
    if not image_dir:
        return None
    folder = Path(image_dir)
    found = sorted(str(folder / (key + ext)) for ext in {*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)}
                   if (folder / (key + ext)).is_file())
    if found:
        return Path(found[0])
    inside = folder / key
    return inside if inside.suffix.lower() in IMAGE_EXTENSIONS and inside.is_file() else None


def kohya_latent_cache(key: str, image_dir: str) -> Path | None:
    """The latent cache kohya would read for `key` (``train_util.image_key_to_npz_file``: ``<stem>.npz``, or the
    ``<stem>_sc_latents.npz`` of prepare_buckets_latents.py --stable_cascade), if one exists."""
    stem = os.path.splitext(key)[0]
    places = [Path(stem + ".npz"), Path(stem + "_sc_latents.npz")]
    if image_dir:
        places += [Path(image_dir) / (key + ".npz"), Path(image_dir) / (stem + "_sc_latents.npz")]
    return next((p for p in places if p.is_file()), None)


def read_subset(subset: SubsetSpec) -> tuple[list[MetadataEntry], list[Path]]:
    """The entries of a fine-tuning subset and the kohya latent caches found beside them; a ConfigError lists
    every entry whose image is missing."""
    assert subset.metadata_file is not None
    path = Path(subset.metadata_file)
    data = load_metadata(path)
    entries, caches, missing = [], [], []
    for key, entry in data.items():
        cache = kohya_latent_cache(key, subset.image_dir)
        if cache is not None:
            caches.append(cache)
        image = find_image(key, subset.image_dir)
        if image is None:
            missing.append((key, cache))
            continue
        reso = entry.get("train_resolution")
        entries.append(MetadataEntry(key, image, entry_caption(entry), (reso[0], reso[1]) if reso else None))
    if missing:
        where = f"{subset.image_dir}/<key>" if subset.image_dir else "<key> (no image_dir / train_data_dir given)"
        latents_only = sum(cache is not None for _, cache in missing)
        shown = ", ".join(repr(key) for key, _ in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"metadata file {path}: {len(missing)} of {len(data)} entries name no image: {shown} (looked for the key "
            f"as a path, then {where} with {', '.join(IMAGE_EXTENSIONS)}). kohya stops at the first such entry. Put "
            "the images in that folder, point train_data_dir / image_dir at theirs, or remove the entries"
            + (f"; {latents_only} of them have only a kohya latent cache (*.npz), which cascade_lab does not train "
               "from (docs/training.md: kohya's latent caches)" if latents_only else ""))
    return entries, caches


__all__ = ["MetadataEntry", "entry_caption", "find_image", "kohya_latent_cache",
           "load_metadata", "read_subset"]
