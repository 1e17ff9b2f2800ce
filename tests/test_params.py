"""GenerationParams: official latent sizes, input checks with helpful words, JSON round trip."""

from __future__ import annotations

import pytest

from cascade_lab.params import GenerationParams


@pytest.mark.parametrize(("height", "width", "c", "b"), [
    (1024, 1024, (24, 24), (256, 256)),
    (1024, 1536, (24, 36), (256, 384)),
    (1536, 1536, (36, 36), (384, 384)),
    (2048, 2048, (48, 48), (512, 512)),
    (1152, 896, (27, 21), (288, 224)),
])  # fmt: skip
def test_latent_sizes_match_the_official_calculate_latent_sizes(height, width, c, b) -> None:  # type: ignore[no-untyped-def]
    p = GenerationParams("x", width=width, height=height)
    assert p.latent_size_c == c and p.latent_size_b == b


def test_user_compression_factor() -> None:
    assert GenerationParams("x", compression=32).latent_size_c == (32, 32)


@pytest.mark.parametrize(("change", "words"), [
    ({"width": 100}, "width=100: use a whole number of pixels ≥ 128 and a multiple of 8"),
    ({"height": 1020}, "height=1020"),
    ({"steps_c": 0}, "steps_c=0: use at least 1 step"),
    ({"steps_b": 0}, "steps_b=0"),
    ({"cfg_c": -1.0}, "cfg_c=-1.0: classifier-free guidance must be a finite number ≥ 0"),
    ({"shift_c": 0.0}, "shift_c=0.0: shift must be > 0"),
    ({"strength": 0.0}, r"strength=0.0: use a value in \(0, 1\]"),
    ({"strength": 1.5}, "strength=1.5"),
    ({"strength": 0.5}, "strength=0.5 needs an input image"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"cfg_rho": 2.0}, "cfg_rho=2.0"),
    ({"seed": -1}, "seed=-1"),
    ({"seed_b": 4}, "seed_b=4: Stage B's own seed exists under compat='comfyui' only"),
])  # fmt: skip
def test_bad_values_are_named_with_what_to_do(change, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=words):
        GenerationParams("x", **change).validate()


def test_json_round_trip_keeps_every_field() -> None:
    p = GenerationParams("a {braced} $prompt", "neg", 512, 768, 2, 42, sampler_c="euler",
                         loras=(("a.safetensors", 0.5),), variations=(("img.png", 0.7),))
    assert GenerationParams.from_json(p.to_json()) == p


def test_unknown_json_fields_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown generation parameters \['stepz'\]"):
        GenerationParams.from_json('{"prompt": "x", "stepz": 3}')
