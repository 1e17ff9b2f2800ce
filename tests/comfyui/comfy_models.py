"""The tiny models of ../shared/reference/comfyui in cascade_lab's classes, and a text encoder that hands back
ComfyUI's stored CLIPTextEncode outputs (the sampling tests are about seeding, sizes and samplers, not CLIP)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import reference_dir

from cascade_lab.models import StageA, StageB, StageC
from cascade_lab.pipeline import Pipeline, Stages


def load(path: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}


def tiny_config() -> dict[str, Any]:
    return json.loads((reference_dir("comfyui") / "config.json").read_text())["tiny"]  # type: ignore[no-any-return]


def official_model(cls: Any, kwargs: dict[str, Any], file: str) -> Any:
    """A cascade_lab model from the official-layout file of the reference, float16 values computed in float32."""
    model = cls(**kwargs)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in load(reference_dir("comfyui", "models",
                                                                                            "official") / file).items()}
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


class StoredTextEncoder:
    """`encode(prompts) -> (clip_text [N, 77, C], pooled [N, 1, C])` from ComfyUI's stored conditioning."""

    def __init__(self, table: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.table = table

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.table[p] for p in prompts]
        return torch.cat([c for c, _ in pairs]), torch.cat([p.view(1, 1, -1) for _, p in pairs])

    def to(self, *args: Any, **kwargs: Any) -> StoredTextEncoder:
        return self


def use_reference_sigma_tables() -> None:
    """Fill cascade_lab's σ tables (shift 1 and 2) with the values the reference machine computed.

    The entries come from float32 cos/log/exp, whose last bit depends on the CPU's maths library: ComfyUI
    itself, rerun on this project's machine, gets ~18 % of the 10000 entries a few ulps away (≤ 1.5e-6
    relative), and cascade_lab's tables equal ComfyUI's there bit for bit. The schedulers are tested against
    the stored tables at 1e-6; the replays then start from the reference's exact σ, because the model's r
    embedding magnifies one ulp of σ to ~1e-4 of the output.
    """
    from cascade_lab.diffusion.sigma_schedules import cascade_sigmas

    tables = load(reference_dir("comfyui", "sampling") / "schedules.safetensors")
    for shift in (1, 2):
        entries = cascade_sigmas(float(shift))._entries
        entries.update(dict(enumerate(tables[f"shift{shift}.model_sampling.sigmas"].unbind())))


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The reference README's tolerance: atol = 1e-4 · absmax(expected), rtol 1e-4."""
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4,
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def reference_tables():  # type: ignore[no-untyped-def]
    """The reference machine's σ tables for one test module (import it with autouse where needed)."""
    use_reference_sigma_tables()
    yield
    forget_reference_sigma_tables()


def forget_reference_sigma_tables() -> None:
    from cascade_lab.diffusion.sigma_schedules import cascade_sigmas

    for shift in (1, 2):
        cascade_sigmas(float(shift))._entries.clear()


def comfy_pipeline(table: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Pipeline:
    cfg = tiny_config()
    stages = Stages(stage_c=official_model(StageC, cfg["stage_c"], "stage_c.safetensors"),
                    stage_b=official_model(StageB, cfg["stage_b"], "stage_b.safetensors"),
                    stage_a=official_model(StageA, cfg["stage_a"], "stage_a.safetensors"),
                    text_encoder=StoredTextEncoder(table), variant="comfyui-tiny")
    return Pipeline(stages)
