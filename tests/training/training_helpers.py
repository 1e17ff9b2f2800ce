"""Helpers for the training tests: a synthetic dataset of coloured shapes, tiny run settings, Stage C inputs.

Fixtures live in training_fixtures.py, which test modules load with ``pytest_plugins`` (a conftest.py here
would shadow tests/conftest.py, which other test folders import as ``conftest``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: tuple[int, int, int], shape: str, size: int = 128, offset: int = 0):
    """A coloured shape on a light grey background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    lo, hi = size // 5 + offset, size - size // 5 + offset
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=colour)
    else:
        draw.polygon([(size // 2 + offset, lo), (hi, hi), (lo, hi)], fill=colour)
    return img


def make_shapes_dataset(folder: Path, size: int = 128, caption_extension: str = ".txt") -> Path:
    """12 images (4 colours x 3 shapes) with captions such as "a red circle"."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        for shape in SHAPES:
            stem = folder / f"{name}_{shape}"
            draw_shape(colour, shape, size).save(stem.with_suffix(".png"))
            stem.with_suffix(caption_extension).write_text(f"a {name} {shape}")
    return folder


def tiny_run(shapes: Path, cache: Path, out: Path, **changes: object) -> dict:
    """Settings of a fast tiny run on the shapes: 128 px at the kohya scale → 4x4 latents, batch 8."""
    return {"train_data_dir": str(shapes), "cache_dir": str(cache), "output_dir": str(out), "resolution": 128,
            "training_scale": "kohya", "train_batch_size": 8, "learning_rate": 1e-3, "val_every_n_steps": 0,
            "log_every_n_steps": 0} | changes


def stage_c_inputs(batch: int = 2, size: int = 4, seed: int = 0) -> dict:
    """Random inputs for the tiny Stage C (text width 24, image width 12)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, size, size, generator=g), "r": torch.rand(batch, generator=g),
            "clip_text": torch.randn(batch, 77, 24, generator=g), "clip_text_pooled": torch.randn(batch, 1, 24,
                                                                                                 generator=g),
            "clip_img": torch.zeros(batch, 1, 12)}


def comfyui_lora_names(model) -> dict[str, tuple[int, ...]]:
    """ComfyUI's rules (spec/training.md §3.3): in_proj split into to_q/k/v, then lora_unet_ + path with _."""
    weights: dict[str, tuple[int, ...]] = {}
    for key, value in model.state_dict().items():
        if key.endswith("in_proj_weight"):
            c = value.shape[0] // 3
            for letter in "qkv":
                weights[f"{key[:-len('in_proj_weight')]}to_{letter}"] = (c, value.shape[1])
        elif key.endswith(".weight"):
            weights[key[:-len(".weight")]] = tuple(value.shape)
    return {"lora_unet_" + path.replace(".", "_"): shape for path, shape in weights.items()}


class Moves:
    """A frozen helper that records where it is sent: it starts on a pretend home device (``meta``) and reports
    the last device it was moved to, while its tensors stay on the CPU and every other call goes to the model.
    ``log``: a list shared by several helpers, each move appended as ``(name, device)``."""

    def __init__(self, inner: object, home: str = "meta", log: list | None = None, name: str = "") -> None:
        import torch

        self.inner, self.moves, self.where = inner, [], torch.device(home)
        self.log, self.name = log, name

    @property
    def device(self):  # what `cache.placement` reads
        return self.where

    def to(self, device=None, dtype=None):
        import torch

        self.where = torch.device(device)
        self.moves.append(self.where)
        if self.log is not None:
            self.log.append((self.name, self.where))
        return self

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)


def torchrun_cli(settings: dict, config: Path) -> tuple[dict, str]:
    """`cascade-lab train CONFIG --quiet` under torchrun with 2 CPU processes (gloo, 1 thread each): the run's
    run.json and its stdout. `settings` are written to `config` as TOML first."""
    import json
    import os
    import subprocess
    import sys

    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cascade_lab.cli", "train", str(config), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(settings["output_dir"]) / "run.json").read_text()), proc.stdout


LORA_C, LORA_OUT = 24, 40  # TinyLoraModel's widths


class TinyLoraModel(nn.Module):
    """A Linear, a 1x1 conv and an attention (LORA_C in, LORA_OUT out): one of each layer kind a LoRA pairs with."""

    def __init__(self) -> None:
        from cascade_lab.models.common import MultiheadAttention

        super().__init__()
        self.proj = nn.Linear(LORA_C, LORA_OUT)
        self.conv = nn.Conv2d(LORA_C, LORA_OUT, 1)
        self.attn = MultiheadAttention(LORA_C, 2)
