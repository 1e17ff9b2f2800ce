"""`cascade-lab generate --compat comfyui ...` and the sampler/scheduler listings with their families (issue 15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cascade_lab import cli, read_png_params


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cascade_lab.cli", *argv], capture_output=True, text=True,
                          timeout=300)


def test_generate_with_comfyuis_settings_writes_a_replayable_png(tmp_path: Path) -> None:
    out = tmp_path / "c.png"
    argv = ["generate", "a red circle", "-o", str(out), "--variant", "tiny", "--size", "128x128", "--steps-c", "3",
            "--steps-b", "2", "--compat", "comfyui", "--seed", "18446744073709551614", "--seed-b", "7",
            "--sampler", "dpmpp_2m", "--scheduler", "karras", "--quiet"]
    assert cli.main(argv) == 0
    params = read_png_params(out)
    assert (params.compat, params.seed, params.seed_b) == ("comfyui", 2**64 - 2, 7)
    assert (params.sampler_c, params.sampler_b, params.scheduler_c, params.scheduler_b) == \
        ("dpmpp_2m", "dpmpp_2m", "karras", "karras")  # ComfyUI's dpmpp_2m / karras under compat comfyui
    assert (params.compression, params.cfg_rho) == (42.0, 0.0)


def test_generate_defaults_stay_official(tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    assert cli.main(["generate", "x", "-o", str(out), "--variant", "tiny", "--size", "128x128", "--steps-c", "2",
                     "--steps-b", "2", "--seed", "1", "--quiet"]) == 0
    params = read_png_params(out)
    assert (params.compat, params.sampler_c, params.scheduler_b, params.cfg_rho, params.compression) == \
        ("official", "ddpm", "cosine", 0.7, 42.67)


@pytest.mark.parametrize(("argv", "words"), [
    (["--compat", "comfyui", "--sampler", "nope"], "unknown sampler 'nope'; available under compat='comfyui'"),
    (["--denoise", "0"], "denoise=0"),
    (["--denoise", "1.5"], "denoise=1.5"),
    (["--compat", "comfyui", "--compression", "500"], "compression=500.0 makes the Stage C latent"),
])  # fmt: skip
def test_bad_values_are_one_line_errors(tmp_path: Path, argv: list[str], words: str) -> None:
    result = run_cli("generate", "x", "-o", str(tmp_path / "x.png"), "--variant", "tiny", "--size", "128x128", *argv)
    assert result.returncode != 0 and words in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()


def test_listings_group_by_family() -> None:
    samplers = run_cli("samplers")
    assert samplers.returncode == 0
    text = samplers.stdout
    assert "official (6 samplers, logSNR levels):" in text and "comfyui (44 samplers, σ levels):" in text
    assert "  comfyui.euler_ancestral" in text and "  uni_pc_bh2" in text and "comfyui.NAME" in text
    schedulers = run_cli("schedulers").stdout
    assert "comfyui (9 schedulers, σ levels):" in schedulers and "  kl_optimal" in schedulers


@pytest.mark.parametrize(("argv", "words"), [
    (["--control", "canny:edges.png", "--control", "canny:edges.png", "--controlnet", "c.safetensors"],
     "2 control(s) (--control, --upscale) but 1 --controlnet"),
    (["--upscale", "2x"], "--upscale 2x needs --image"),
    (["--upscale", "3x", "--image", "edges.png"], "2x only"),
    (["--upscale", "2x", "--image", "edges.png", "--width", "512"], "width=512 with a 2x upscale of a 64x64"),
    (["--seed-b", "3"], "seed_b=3: Stage B's own seed exists under compat='comfyui' only"),
    (["--control", "depth:edges.png", "--controlnet", "c.safetensors"], "KIND one of canny, inpainting"),
    (["--control", "canny:edges.png", "--controlnet", "gone.safetensors"], "--controlnet 'gone.safetensors'"),
    (["--mask", "1,2,3,4"], "--mask / --mask-grow / --mask-feather are for an inpainting control"),
])  # fmt: skip
def test_control_flags_are_checked_before_anything_loads(tmp_path: Path, argv: list[str], words: str) -> None:
    """Issue 16: `cascade-lab generate --control KIND:IMAGE[:STRENGTH] --controlnet FILE [--mask ...]`."""
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "edges.png")
    (tmp_path / "c.safetensors").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "cascade_lab.cli", "generate", "x", "-o", "x.png", "--variant",
                             "tiny", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr
