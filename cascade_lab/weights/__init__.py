"""Weights: where files are, what they hold, and memory-lean loading. No torch import until used.

* :func:`locate` — explicit paths/folders, a ComfyUI ``models/`` tree, the Hub cache, then a download.
* :func:`comfyui_model_path` — the file a ComfyUI loader node's model name means (``models/<kind>/`` and
  ``extra_model_paths.yaml``, searched as ComfyUI does).
* :func:`detect` — what a safetensors file holds, from its header alone.
* :func:`load_stage` — a stage module built on meta and filled straight from the file.
* :func:`load_clip_file` / :func:`find_tokenizer` — the CLIP encoders from single files, their local tokenizer.
* :func:`locate_controlnet` / :func:`check_controlnet` — a ControlNet file found like the stages, checked from
  its header against its kind and the Stage C.
* :func:`choose_variant` / :func:`estimate` — memory needs per variant and the largest that fits.
"""

from __future__ import annotations

from .comfyui_paths import ComfyUIFolders, comfyui_folders, comfyui_model_path
from .controlnets import check_controlnet, locate_controlnet
from .convert import ConversionError, plan_official, to_official
from .detect import Component, Detection, detect
from .encoders import TokenizerNotFoundError, find_tokenizer, load_clip_file
from .loader import StateDictMismatchError, WrongStageError, effnet_normalization, load_stage, weight_files
from .locate import Located, WeightsNotFoundError, locate
from .memory import Choice, ComputeDtypes, MemoryEstimate, available_memory, choose_variant, compute_dtypes, estimate
from .safetensors_io import Header, WeightsFileError, read_header, read_tensors

__all__ = [
    "Choice",
    "ComfyUIFolders",
    "Component",
    "ComputeDtypes",
    "ConversionError",
    "Detection",
    "Header",
    "Located",
    "MemoryEstimate",
    "StateDictMismatchError",
    "TokenizerNotFoundError",
    "WeightsFileError",
    "WeightsNotFoundError",
    "WrongStageError",
    "available_memory",
    "check_controlnet",
    "choose_variant",
    "comfyui_folders",
    "comfyui_model_path",
    "compute_dtypes",
    "detect",
    "effnet_normalization",
    "estimate",
    "find_tokenizer",
    "load_clip_file",
    "load_stage",
    "locate",
    "locate_controlnet",
    "plan_official",
    "read_header",
    "read_tensors",
    "to_official",
    "weight_files",
]
