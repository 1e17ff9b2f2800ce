"""The EfficientNet inside a ComfyUI Stage C checkpoint (``vae.encoder.*`` + ComfyUI's ``mean``/``std``) loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import reference_dir
from safetensors.torch import load_file, save_file

from cascade_lab.models.effnet import IMAGENET_MEAN, IMAGENET_STD
from cascade_lab.weights.loader import effnet_normalization, load_stage
from cascade_lab.weights.safetensors_io import WeightsFileError, read_header

COMFY_C = reference_dir("comfyui", "models") / "stable_cascade_stage_c_tiny.safetensors"
EFFNET = reference_dir("fixtures", "effnet_encoder") / "weights.safetensors"


def _comfyui_stage_c(path: Path, std: tuple[float, ...] = IMAGENET_STD) -> Path:
    """ComfyUI's all-in-one Stage C layout with a full-size EfficientNet (the tiny file's own is a smaller net)."""
    tensors = {k: v for k, v in load_file(COMFY_C).items() if not k.startswith("vae.encoder.")}
    tensors |= {f"vae.encoder.{k}": v for k, v in load_file(EFFNET).items()}
    tensors["vae.encoder.mean"] = torch.tensor(IMAGENET_MEAN, dtype=torch.float16)  # what ComfyUI saves
    tensors["vae.encoder.std"] = torch.tensor(std, dtype=torch.float16)
    save_file(tensors, str(path), {"prompt": ""})
    return path


def test_effnet_loads_from_a_comfyui_stage_c_checkpoint(tmp_path: Path) -> None:
    path = _comfyui_stage_c(tmp_path / "stable_cascade_stage_c.safetensors")
    from_checkpoint = load_stage("effnet", path, dtype=torch.float32)
    official = load_stage("effnet", EFFNET, dtype=torch.float32)
    assert from_checkpoint.state_dict().keys() == official.state_dict().keys()
    for k, v in official.state_dict().items():
        assert torch.equal(from_checkpoint.state_dict()[k], v), k
    stored = effnet_normalization(read_header(path), "vae.encoder.")
    assert stored["mean"] == tuple(float(torch.tensor(m, dtype=torch.float16)) for m in IMAGENET_MEAN)
    assert effnet_normalization(read_header(EFFNET)) == {}


def test_other_normalisation_constants_are_refused_by_name(tmp_path: Path) -> None:
    path = _comfyui_stage_c(tmp_path / "odd.safetensors", std=(0.5, 0.5, 0.5))
    with pytest.raises(WeightsFileError, match=r"vae\.encoder\.std = \[0\.5, 0\.5, 0\.5\] is not ImageNet's"):
        load_stage("effnet", path)


def test_tiny_comfyui_checkpoint_no_longer_reports_mean_and_std() -> None:
    """The shipped tiny file's EfficientNet has a smaller stage table: only that is reported, not the constants."""
    with pytest.raises(WeightsFileError) as e:
        load_stage("effnet", COMFY_C)
    assert "shape mismatch" in str(e.value) and "mean (from" not in str(e.value) and "std (from" not in str(e.value)
