"""Memory estimates per variant and the automatic choice, with fake memory sizes."""

from __future__ import annotations

import pytest

from cascade_lab.builtins.variants import (
    STAGE_A,
    STAGE_B_FULL,
    STAGE_B_LITE,
    STAGE_C_FULL,
    STAGE_C_LITE,
    TEXT_ENCODER,
    VARIANTS,
)
from cascade_lab.weights import memory
from cascade_lab.weights.memory import (
    ACTIVATION_MARGIN,
    ComputeDtypes,
    GiB,
    available_memory,
    choose_variant,
    compute_dtypes,
    estimate,
)

REAL = [v for v in VARIANTS if "stage_c" in v.files]
BY_NAME = {v.name: v for v in REAL}
BF16 = ComputeDtypes("bfloat16", "bfloat16", "bfloat16")
NO_BF16_GPU = compute_dtypes("cuda", bf16=False)


def test_stage_c_is_never_fp16() -> None:
    assert compute_dtypes("cpu").stage_c == "bfloat16"
    assert compute_dtypes("cuda:0", bf16=True) == BF16
    assert NO_BF16_GPU == ComputeDtypes("float32", "float16", "float16")
    assert compute_dtypes("cpu", bf16=False).stage_c == "float32"
    assert compute_dtypes("mps").stage_c == "float32"


def test_estimate_counts_weights_at_compute_dtype() -> None:
    e = estimate(BY_NAME["lite"], BF16)  # fp32 files, computed in bf16: half the file size
    assert (e.stage_c, e.stage_b, e.text_encoder) == (2 * STAGE_C_LITE, 2 * STAGE_B_LITE, 2 * TEXT_ENCODER)
    assert e.stage_a == 4 * STAGE_A and e.margin == ACTIVATION_MARGIN
    assert e.resident == e.stage_c + e.stage_b + e.text_encoder + e.stage_a + ACTIVATION_MARGIN
    assert e.swapped == e.stage_c + ACTIVATION_MARGIN  # Stage C is the largest part
    full = estimate(BY_NAME["bf16"], NO_BF16_GPU)  # bf16 files upcast for an fp32 Stage C
    assert full.stage_c == 4 * STAGE_C_FULL and full.stage_b == 2 * STAGE_B_FULL
    assert round(full.resident / GiB, 1) == 19.6 and round(full.swapped / GiB, 1) == 15.4
    assert "with stage swapping" in full.describe()


@pytest.mark.parametrize("free_gib,swap,dtypes,expected", [
    (80, True, BF16, "bf16"),  # bf16 compute: the bf16 files give the same model for half the download
    (80, True, NO_BF16_GPU, "full"),  # fp32 compute: the fp32 files are the exact weights
    (10, True, BF16, "bf16"),  # full needs 6.7 + 2 GiB with swapping
    (10, False, BF16, "lite_bf16"),  # ... but 13 GiB all resident
    (14, False, BF16, "bf16"),
    (8, True, NO_BF16_GPU, "lite"),  # full Stage C in fp32 alone is 13.4 GiB
    (4.5, True, BF16, "lite_bf16"),
    (3, True, BF16, None),
])
def test_choice_is_the_largest_that_fits(free_gib: float, swap: bool, dtypes: ComputeDtypes,
                                         expected: str | None) -> None:
    choice = choose_variant("cuda:0", available=int(free_gib * GiB), swap=swap, variants=REAL, dtypes=dtypes)
    assert choice.variant == expected, choice.reason
    assert len(choice.estimates) == 4
    if expected is None:
        assert "no variant fits 3.0 GiB" in choice.reason and "lite" in choice.reason
    else:
        assert choice.reason.startswith(expected)


def test_choice_reads_free_memory_of_the_device(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device: 5 * GiB)
    assert choose_variant("cpu", variants=REAL).variant == "lite_bf16"
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * GiB)
    assert choose_variant("cpu", variants=REAL, swap=False).variant == "bf16"


def test_registered_variants_are_the_default_pool(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * GiB)
    choice = choose_variant("cpu")
    assert {e.variant for e in choice.estimates} >= {"full", "bf16", "lite", "lite_bf16"}
    assert "tiny" not in {e.variant for e in choice.estimates}


def test_available_memory_on_cpu_is_plausible() -> None:
    free = available_memory("cpu")
    assert 0 < free < 1 << 50
