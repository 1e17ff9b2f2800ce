"""The GDF schedule, VP scaling and noise condition against reference/gdf/grids.json (bit-exact in fp32)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import reference_dir

from cascade_lab.diffusion.schedule import (
    eps_to_x0,
    logsnr,
    logsnr_limits,
    noise_cond,
    noise_cond_to_logsnr,
    sigma,
    train_t,
    vp_scalers,
    x0_to_eps,
)

TOL = dict(atol=1e-5, rtol=1e-5)  # reference/README.md, gdf grids


@pytest.fixture(scope="module")
def grids() -> dict:
    return json.loads((reference_dir("gdf") / "grids.json").read_text())


def test_limits_are_the_float32_shift1_ends(grids):
    assert logsnr_limits() == tuple(grids["schedule_limits_logSNR"])
    assert logsnr_limits()[1] != pytest.approx(math.log(9999), abs=1e-4)  # fp32 artefact, not ln 9999


@pytest.mark.parametrize("case", range(4))
def test_grid_case(grids, case):
    c = grids["cases"][case]
    t = torch.linspace(c["t_start"], c["t_end"], c["timesteps"] + 1)
    assert t.tolist() == c["t"]
    level = logsnr(t, shift=c["shift"])
    a, b = vp_scalers(level)
    for name, got in [("logSNR", level), ("a", a), ("b", b), ("noise_cond", noise_cond(level))]:
        torch.testing.assert_close(got, torch.tensor(c[name]), **TOL, msg=f"{c['name']} {name}")


def test_shift_is_clamped_after_shifting():
    lo, hi = logsnr_limits()
    ends = logsnr(torch.tensor([1.0, 0.0]), shift=2)
    assert ends[0].item() == lo  # not −10.6: clamped after the shift
    assert ends[1].item() == pytest.approx(hi - 2 * math.log(2), abs=1e-5)
    assert logsnr(torch.tensor([0.5]), shift=4).item() == pytest.approx(
        logsnr(torch.tensor([0.5])).item() - 2 * math.log(4), abs=1e-5)


def test_noise_cond_inverts_the_schedule_at_shift1():
    t = torch.linspace(0.1, 0.9, 9)
    torch.testing.assert_close(noise_cond(logsnr(t)), t, atol=1e-5, rtol=0)


def test_vp_and_recovery_roundtrip():
    level = torch.tensor(-1.3)
    a, b = vp_scalers(level)
    torch.testing.assert_close(a**2 + b**2, torch.tensor(1.0))
    assert sigma(level).item() == pytest.approx((b / a).item(), rel=1e-6)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x = a * x0 + b * eps
    torch.testing.assert_close(eps_to_x0(x, eps, level), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_to_eps(x, x0, level), eps, atol=1e-5, rtol=1e-5)


def test_per_sample_levels_broadcast_over_the_batch():
    levels = torch.tensor([-2.0, 3.0])  # [B]
    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    got = eps_to_x0(x, eps, levels)
    for i in range(2):
        torch.testing.assert_close(got[i], eps_to_x0(x[i], eps[i], levels[i]))


def test_train_draw(monkeypatch):
    u = torch.tensor([0.0, 0.5, 0.9995, 0.999999])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u.clone())
    torch.testing.assert_close(train_t(4), torch.tensor([1.0, 0.501, 0.0015, 0.001001]), atol=2e-7, rtol=0)



@pytest.mark.parametrize("case", range(4))
def test_noise_cond_inverts_back_to_the_scalers(grids, case):
    """A v-predicting model (the demo's Stage C and B) recovers a and b from the official r it is given."""
    c = grids["cases"][case]
    a, b = vp_scalers(noise_cond_to_logsnr(torch.tensor(c["noise_cond"])))
    assert torch.allclose(a, torch.tensor(c["a"]), atol=3e-5)
    assert torch.allclose(b, torch.tensor(c["b"]), atol=3e-5)
