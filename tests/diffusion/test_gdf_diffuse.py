"""`diffuse` against the official GDF.diffuse (reference/gdf/diffuse.safetensors)."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_dir

from cascade_lab.diffusion import AdaptiveLossWeight, diffuse

TOL = dict(atol=1e-5, rtol=1e-5)
FIELDS = ("noised", "epsilon", "target", "logSNR", "noise_cond", "loss_weight")


@pytest.fixture(scope="module")
def ref() -> dict:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(reference_dir("gdf") / "diffuse.safetensors")).items()}


def check(out, ref, case):
    assert len(out) == 6
    for got, name in zip(out, FIELDS, strict=True):
        torch.testing.assert_close(got, ref[f"{case}.{name}"], **TOL, msg=f"{case}.{name}")


@pytest.mark.parametrize(("case", "kwargs"), [
    ("shift1", dict(shift=1, loss_shift=1)),
    ("shift2", dict(shift=2)),
    ("shift2_lossshift2", dict(shift=2, loss_shift=2)),
])
def test_diffuse_cases(ref, case, kwargs):
    check(diffuse(ref["x0"], t=ref["t"], epsilon=ref["noise"], **kwargs), ref, case)


def test_training_draw(ref, monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: ref["train_draw.u"].clone())
    check(diffuse(ref["x0"], epsilon=ref["noise"]), ref, "train_draw")


def test_offset_noise(ref):
    out = diffuse(ref["x0"], t=ref["t"], epsilon=ref["noise"], offset_noise=0.1, offset=ref["offset_noise0.1.offset"])
    check(out, ref, "offset_noise0.1")


def test_draws_its_own_noise_and_offset():
    x0 = torch.randn(3, 4, 2, 2)
    torch.manual_seed(0)
    out = diffuse(x0, t=torch.full([3], 0.5), offset_noise=0.1)
    assert out.epsilon.shape == x0.shape and out.logsnr.shape == (3,)
    a, b = out.noised[0].flatten()[0], out.epsilon[0].flatten()[0]
    assert torch.isfinite(a) and torch.isfinite(b)
    torch.manual_seed(0)
    again = diffuse(x0, t=torch.full([3], 0.5), offset_noise=0.1)
    torch.testing.assert_close(again.noised, out.noised)
    # the offset is constant over H, W: ε − (the same draw without offset) is [B, C, 1, 1]
    torch.manual_seed(0)
    plain = diffuse(x0, t=torch.full([3], 0.5))
    diff = out.epsilon - plain.epsilon
    torch.testing.assert_close(diff, diff[..., :1, :1].expand_as(diff))


def test_custom_loss_weight():
    aw = AdaptiveLossWeight()
    out = diffuse(torch.randn(2, 4, 2, 2), t=torch.tensor([0.3, 0.7]), loss_weight=aw)
    torch.testing.assert_close(out.loss_weight, torch.ones(2))
