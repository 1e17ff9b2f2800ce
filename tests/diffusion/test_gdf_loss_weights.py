"""P2 and adaptive loss weights against reference/gdf/loss_weights.*; state round trips."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reference_dir

from cascade_lab.diffusion import AdaptiveLossWeight, P2LossWeight

TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def ref() -> dict:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(reference_dir("gdf") / "loss_weights.safetensors")).items()}


def test_p2(ref):
    p2 = P2LossWeight()
    torch.testing.assert_close(p2(ref["p2.logSNR"]), ref["p2.weight_shift1"], **TOL)
    torch.testing.assert_close(p2(ref["p2.logSNR"], shift=2), ref["p2.weight_shift2"], **TOL)


def test_adaptive_updates(ref):
    aw = AdaptiveLossWeight()
    torch.testing.assert_close(aw.bucket_ranges, ref["adaptive.bucket_ranges"], **TOL)
    assert aw.bucket_ranges[149].item() != 0.0  # float32 linspace: 2.3e-7
    torch.testing.assert_close(aw.bucket_losses, ref["adaptive.bucket_losses_init"])
    for k in range(5):
        p = f"adaptive.update{k}."
        assert torch.equal(aw.bucket_indices(ref[p + "logSNR"]), ref[p + "indices"]), f"update {k} indices"
        torch.testing.assert_close(aw(ref[p + "logSNR"]), ref[p + "weights"], **TOL, msg=f"update {k} weights")
        aw.update_buckets(ref[p + "logSNR"], ref[p + "loss"])
        torch.testing.assert_close(aw.bucket_losses, ref[p + "bucket_losses_after"], **TOL, msg=f"update {k}")


def test_duplicate_bucket_last_write_wins(ref):
    meta = json.loads((reference_dir("gdf") / "loss_weights.json").read_text())["adaptive"]["duplicates"]
    assert meta, "the reference records duplicate buckets"
    aw = AdaptiveLossWeight()
    for k in range(5):
        p = f"adaptive.update{k}."
        before = aw.bucket_losses.clone()
        aw.update_buckets(ref[p + "logSNR"], ref[p + "loss"])
        for dup in (d for d in meta if d["update"] == k):
            stored = aw.bucket_losses[dup["bucket"]].item()
            assert stored == pytest.approx(dup["stored"], abs=1e-7)
            winner = dup["winner_positions"][-1]
            expected = before[dup["bucket"]] * 0.99 + ref[p + "loss"][winner] * (1 - 0.99)
            assert stored == pytest.approx(expected.item(), abs=1e-7)


def test_state_roundtrips_through_json_and_state_dict():
    aw = AdaptiveLossWeight()
    aw.update_buckets(torch.tensor([-3.0, 0.5, 7.0]), torch.tensor([0.2, 0.4, 0.9]))
    restored = AdaptiveLossWeight.from_dict(json.loads(json.dumps(aw.to_dict())))
    assert torch.equal(restored.bucket_losses, aw.bucket_losses)
    assert torch.equal(restored.bucket_ranges, aw.bucket_ranges)
    other = AdaptiveLossWeight()
    other.load_state_dict(aw.state_dict())
    level = torch.linspace(-12, 12, 50)
    assert torch.equal(other(level), aw(level))
    with pytest.raises(ValueError, match="bucket_ranges"):
        other.load_state_dict({"bucket_ranges": [0.0, 1.0], "bucket_losses": [1.0]})


def test_adaptive_weight_clamps_and_shifts():
    aw = AdaptiveLossWeight()
    aw.bucket_losses[:] = 1e-9
    assert aw(torch.tensor([0.0])).item() == pytest.approx(1e7)
    aw = AdaptiveLossWeight()
    aw.bucket_losses[aw.bucket_indices(torch.tensor([2 * 0.6931472]))] = 0.5
    assert aw(torch.tensor([0.0]), shift=2).item() == pytest.approx(2.0)
