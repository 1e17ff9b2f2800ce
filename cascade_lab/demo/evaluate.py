"""The demo's quality measure: generate every prompt of a fixed held-out set and let the checker read it.

Generation is the user's path: `pipeline.Pipeline.run` with the official sampling defaults (Stage C 20 steps,
CFG 4, shift 2; Stage B 10 steps, CFG 1.1) at the demo's native size, one seed per prompt.
`evaluate_control` measures a demo ControlNet through ``Cascade("demo").generate(controls=...)``: the outline
of a held-out scene at position P, a prompt naming another position Q; a hit is the shape drawn at P.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from .checker import Check, check, hit_rates
from .world import POSITIONS, Scene, eval_scenes, render


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


def control_cases(n: int = 64, seed: int = 0) -> list[tuple[Scene, Any, str]]:
    """(scene, its image as uint8 [H, W, 3], a prompt naming another position) for the first `n` held-out scenes;
    the image's jitter and the other position are drawn from a seed per case."""
    cases = []
    for i, scene in enumerate(eval_scenes(n)):
        rng = random.Random(seed * 1_000_003 + i)
        image = render(scene, rng)
        other = rng.choice([p for p in POSITIONS if p != scene.position])
        cases.append((scene, image, replace(scene, position=other).caption))
    return cases


def evaluate_control(n: int = 64, *, kind: str = "canny", controlnet: Any = None, control: bool = True,
                     seed: int = 0, cascade: Any = None, **options: Any) -> tuple[dict[str, float], list[Check]]:
    """(hit rates, checks) of the `kind` ControlNet (default: the shipped one) on `control_cases`: each check
    expects the scene the control image shows, so ``position`` counts the control beating the prompt. With
    ``control=False`` the same prompts run without it (the baseline: the prompt's position wins).
    ``position_and_shape`` is the issue's measure; ``cascade``: a ``Cascade("demo")`` to reuse."""
    from ..api import Cascade
    from ..controls import Control

    cascade = cascade if cascade is not None else Cascade("demo", device="cpu")
    checks = []
    for i, (scene, image, prompt) in enumerate(control_cases(n, seed)):
        controls = [Control(kind, image, model=controlnet)] if control else []
        result = cascade.generate(prompt, seed=seed + i, controls=controls, **options)
        checks.append(check(result.images[0], scene))
    rates = hit_rates(checks)
    rates["position_and_shape"] = sum(c.position and c.shape for c in checks) / max(1, len(checks))
    return rates, checks


def foreground(image: Any) -> Any:
    """Bool [H, W]: the pixels the checker counts as the shape (far from the border's median colour)."""
    import numpy as np

    from .checker import FOREGROUND_DISTANCE, _pixels

    px = _pixels(image)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])  # (4W, 3)
    return np.sqrt(((px - np.median(border, axis=0)) ** 2).sum(axis=-1)) > FOREGROUND_DISTANCE


def inpainting_cases(n: int = 64, seed: int = 0) -> list[tuple[Scene, Any, tuple[int, int, int, int]]]:
    """(scene, its image as uint8 [H, W, 3], a mask box (x0, y0, x1, y1)) for the first `n` held-out scenes: the box
    hides one half of the shape (left, right, top or bottom, drawn per case) with 4 px to spare."""
    import numpy as np

    cases = []
    for i, scene in enumerate(eval_scenes(n)):
        rng = random.Random(seed * 1_000_003 + i)
        image = render(scene, rng)
        ys, xs = np.nonzero(foreground(image))
        x0, x1, y0, y1 = int(xs.min()) - 4, int(xs.max()) + 5, int(ys.min()) - 4, int(ys.max()) + 5
        xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
        box = {"left": (x0, y0, xm, y1), "right": (xm, y0, x1, y1), "top": (x0, y0, x1, ym),
               "bottom": (x0, ym, x1, y1)}[rng.choice(["left", "right", "top", "bottom"])]
        size = image.shape[0]
        cases.append((scene, image, tuple(min(max(v, 0), size) for v in box)))
    return cases


def evaluate_inpainting(n: int = 64, *, controlnet: Any = None, control: bool = True, seed: int = 0,
                        cascade: Any = None, **options: Any) -> tuple[dict[str, float], list[Check]]:
    """(hit rates, checks) of the demo inpainting ControlNet on `inpainting_cases` with the scene's own caption:
    the half regenerated must complete the half kept. ``shape_iou``: mean overlap of the result's shape with the
    original's. ``control=False`` runs the same masks at strength 0 (composited the same, no ControlNet
    features): the baseline of a generation that does not see the kept half."""
    import numpy as np

    from ..api import Cascade
    from ..controls import Control

    cascade = cascade if cascade is not None else Cascade("demo", device="cpu")
    checks, ious = [], []
    for i, (scene, image, box) in enumerate(inpainting_cases(n, seed)):
        inpaint = Control("inpainting", image, strength=1.0 if control else 0.0, mask=[box], model=controlnet)
        result = cascade.generate(scene.caption, seed=seed + i, controls=[inpaint], **options).images[0]
        checks.append(check(result, scene))
        got, want = foreground(result), foreground(image)
        ious.append(float((got & want).sum() / max(1, (got | want).sum())))
    rates = hit_rates(checks)
    rates["shape_iou"] = float(np.mean(ious)) if ious else 0.0
    return rates, checks


__all__ = ["control_cases", "evaluate", "evaluate_control", "evaluate_inpainting", "foreground", "generate_scenes",
           "inpainting_cases"]
