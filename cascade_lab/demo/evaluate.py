"""The demo's quality measure: generate every prompt of a fixed held-out set and let the checker read it.

Generation is the user's path: `pipeline.Pipeline.run` with the official sampling defaults (Stage C 20 steps,
CFG 4, shift 2; Stage B 10 steps, CFG 1.1) at the demo's native size, one seed per prompt.
"""

from __future__ import annotations

from typing import Any

from .checker import Check, check, hit_rates
from .world import Scene, eval_scenes


def generate_scenes(stages: Any, scenes: list[Scene], *, seed: int = 0, **options: Any) -> list[Any]:
    """One image (float [3, H, W] in [0, 1]) per scene, seed `seed + i` for scene i."""
    from ..params import GenerationParams
    from ..pipeline import Pipeline
    from .models import NATIVE

    pipeline = Pipeline(stages)
    images = []
    for i, scene in enumerate(scenes):
        params = GenerationParams(scene.caption, seed=seed + i, variant="demo", **{**NATIVE, **options})
        images.append(pipeline.run(params).images[0])
    return images


def evaluate(stages: Any, n: int = 64, *, seed: int = 0, **options: Any) -> tuple[dict[str, float], list[Check]]:
    """(hit rates, checks) over the first `n` held-out scenes (combinations never drawn in training)."""
    scenes = eval_scenes(n)
    checks = [check(image, scene) for image, scene in zip(generate_scenes(stages, scenes, seed=seed, **options),
                                                           scenes, strict=True)]
    return hit_rates(checks), checks


__all__ = ["evaluate", "generate_scenes"]
