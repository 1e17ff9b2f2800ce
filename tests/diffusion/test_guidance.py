"""Classifier-free guidance and the GuidedDenoiser (GDF.sample's per-step body)."""

from __future__ import annotations

import pytest
import torch

from cascade_lab.diffusion import (
    GuidedDenoiser,
    batch_inputs,
    cfg_combine,
    eps_to_x0,
    guidance_scale,
    logsnr,
    noise_cond,
)


class RecordingModel:
    """ε̂ = 0.1·x + mean(clip) per sample, recording every call's batch size and r."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x, r, clip, cnet=None, **_):
        self.calls.append((x.shape[0], r.clone()))
        assert r.shape == (x.shape[0],) and clip.shape[0] == x.shape[0]
        return 0.1 * x + clip.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_cfg_is_lerp_then_global_std_rescale():
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    plain = cfg_combine(cond, uncond, 4.0, rho=0.0)
    torch.testing.assert_close(plain, uncond + 4.0 * (cond - uncond))
    full = cfg_combine(cond, uncond, 4.0, rho=1.0)
    assert full.std().item() == pytest.approx(cond.std().item(), rel=1e-5)  # std over the whole batch
    mixed = cfg_combine(cond, uncond, 4.0, rho=0.7)
    torch.testing.assert_close(mixed, 0.7 * full + 0.3 * plain, atol=1e-5, rtol=1e-5)


def test_guidance_pair_interpolates_in_step_t():
    assert guidance_scale(4.0, 0.3) == 4.0
    assert guidance_scale((8.0, 2.0), 1.0) == 8.0
    assert guidance_scale((8.0, 2.0), 0.0) == 2.0
    assert guidance_scale((8.0, 2.0), 0.5) == pytest.approx(5.0)


def test_batch_inputs_tensors_lists_and_dicts():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    out = batch_inputs({"t": a, "cnet": [a, None, a], "extra": {"sca": a}, "flag": True},
                       {"t": b, "cnet": [b, b, None], "extra": {}, "flag": True})
    assert torch.equal(out["t"], torch.cat([a, b]))
    assert torch.equal(out["cnet"][0], torch.cat([a, b])) and out["cnet"][1:] == [None, None]
    assert torch.equal(out["extra"]["sca"], torch.cat([a, torch.zeros_like(a)]))
    assert out["flag"] is True
    with pytest.raises(ValueError, match="same keys"):
        batch_inputs({"clip": a}, {"clip_text": b})
    with pytest.raises(ValueError, match="length 2"):
        batch_inputs({"cnet": [a, a]}, {"cnet": [b]})


def test_one_batched_call_with_cfg_and_x0_from_eps():
    model = RecordingModel()
    cond, uncond = {"clip": torch.ones(2, 5, 3)}, {"clip": torch.zeros(2, 5, 3)}
    den = GuidedDenoiser(model, cond, uncond, cfg=3.0, cfg_rho=0.0)
    x, level = torch.randn(2, 4, 3, 3), torch.tensor(-1.0)
    x0 = den(x, level)
    assert len(model.calls) == 1 and model.calls[0][0] == 4
    r = noise_cond(level)
    torch.testing.assert_close(model.calls[0][1], r.expand(4))
    eps = 0.1 * x + 3.0  # lerp(0.1x, 0.1x + 1, 3)
    torch.testing.assert_close(x0, eps_to_x0(x, eps, level))


def test_no_cfg_calls_the_model_on_cond_only():
    model = RecordingModel()
    den = GuidedDenoiser(model, {"clip": torch.ones(2, 5, 3)}, cfg=None)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(den.predict(x, torch.tensor(0.5)), 0.1 * x + 1)
    assert [c[0] for c in model.calls] == [2]


def test_uncond_defaults_to_zeros():
    model = RecordingModel()
    den = GuidedDenoiser(model, {"clip": torch.ones(2, 5, 3)}, cfg=2.0, cfg_rho=0.0)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(den.predict(x, torch.tensor(0.5)), 0.1 * x + 2.0)


def test_guidance_window_on_r():
    model = RecordingModel()
    den = GuidedDenoiser(model, {"clip": torch.ones(1, 5, 3)}, cfg=2.0, cfg_t_stop=0.3, cfg_t_start=0.8)
    x = torch.randn(1, 4, 3, 3)
    for t in (0.95, 0.6, 0.1):  # above, inside, below the window (r = t at shift 1)
        den.predict(x, logsnr(torch.tensor(t)))
    assert [c[0] for c in model.calls] == [1, 2, 1]
    assert den.guided(0.3) and den.guided(0.8) and not den.guided(0.81)
