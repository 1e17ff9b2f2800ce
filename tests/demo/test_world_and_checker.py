"""The demo world is reproducible and split cleanly; the analytic checker reads ground-truth renders right."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from cascade_lab.demo import checker, world


def digest(images: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(i.tobytes() for i in images)).hexdigest()


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    first = [image for _, image in world.sample(20, seed=3)]
    again = [image for _, image in world.sample(20, seed=3)]
    other = [image for _, image in world.sample(20, seed=4)]
    assert digest(first) == digest(again) != digest(other)
    assert first[0].shape == (world.SIZE, world.SIZE, 3) and first[0].dtype == np.uint8


def test_split_holds_out_a_fixed_tenth_never_sampled_for_training() -> None:
    train, held = world.split()
    assert len(train) + len(held) == len(world.all_scenes()) == 4 * 6 * 9 * 7
    assert not set(train) & set(held) and len(held) >= 50
    assert world.split() == (train, held)
    assert world.MAIN_PROMPT in [s.caption for s in train]
    drawn = {scene for scene, _ in world.sample(500, seed=0)}
    assert drawn <= set(train)
    assert len(world.eval_scenes(64)) == 64 and set(world.eval_scenes(64)) <= set(held)
    # the evaluation set covers every shape and shape colour, not just the first ones in order
    assert {s.shape for s in world.eval_scenes(64)} == set(world.SHAPES)
    assert {s.colour for s in world.eval_scenes(64)} == set(world.SHAPE_COLOURS)


def test_captions_say_exactly_the_scene() -> None:
    scene = world.Scene("circle", "red", "top left", "blue")
    assert scene.caption == "a red circle at the top left on a blue background"
    assert world.Scene("cross", "cyan", "center", "black").caption == "a cyan cross in the center on a black background"
    for s in world.all_scenes():
        assert world.parse_caption(s.caption) == s
    assert world.parse_caption("A Yellow Square at the Bottom on a white background!") == world.Scene(
        "square", "yellow", "bottom", "white")
    assert world.parse_caption("a watercolour fox in a snowy forest") is None


def test_checker_reads_ground_truth() -> None:
    scenes = world.all_scenes()
    rng = random.Random(1)
    checks = []
    for scene in rng.sample(scenes, 300):
        checks.append(checker.check(world.render(scene, random.Random(rng.random())), scene.caption))
    rates = checker.hit_rates(checks)
    assert rates["all"] == 1.0, [c for c in checks if not c.accepted][:3]


def test_checker_tolerates_blur_and_noise_but_not_a_wrong_prompt() -> None:
    import torch

    rng = random.Random(2)
    ok = 0
    scenes = rng.sample(world.all_scenes(), 100)
    for scene in scenes:
        image = torch.from_numpy(world.render(scene, random.Random(rng.random()))).permute(2, 0, 1).float() / 255
        blurred = torch.nn.functional.avg_pool2d(image[None], 5, stride=1, padding=2, count_include_pad=False)[0]
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(ok))
        noisy = (blurred + 0.05 * noise).clamp(0, 1)
        ok += checker.check(noisy, scene).accepted
    assert ok >= 95
    image = world.render(world.Scene("circle", "red", "top left", "blue"))
    verdict = checker.check(image, "a green square at the bottom right on a white background")
    assert not (verdict.colour or verdict.shape or verdict.position or verdict.background)


def test_a_plain_image_has_no_shape_and_a_foreign_prompt_is_refused() -> None:
    plain = np.full((128, 128, 3), 245, np.uint8)
    reading = checker.read(plain)
    assert reading.shape is None and reading.colour is None and reading.background == "white"
    with pytest.raises(ValueError, match="does not describe a demo scene"):
        checker.check(plain, "a watercolour fox")
