"""The demo's Stage C and Stage B: the official classes and keys, predicting v, answering ε to every caller."""

from __future__ import annotations

import torch

from cascade_lab.demo.models import DemoConfig, DemoStageB, DemoStageC, eps_from_v, fresh_stages, with_coordinates
from cascade_lab.diffusion import diffuse, eps_to_x0, logsnr, noise_cond, vp_scalers
from cascade_lab.models.stage_b import StageB
from cascade_lab.models.stage_c import StageC


def test_demo_stages_keep_the_official_keys_and_shapes() -> None:
    config = DemoConfig()
    for demo, official in ((DemoStageC, StageC), (DemoStageB, StageB)):
        cfg = config.stage_c if demo is DemoStageC else config.stage_b
        ours, theirs = demo(**cfg.kwargs()).state_dict(), official(**cfg.kwargs()).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    stages = fresh_stages()
    assert isinstance(stages.stage_c, DemoStageC) and isinstance(stages.stage_b, DemoStageB)


def test_demo_stage_c_sees_the_coordinates_of_its_latent_pixels() -> None:
    x = torch.randn(2, 16, 3, 5)
    got = with_coordinates(x)
    assert got.shape == (2, 18, 3, 5) and torch.equal(got[:, :16], x)
    assert torch.equal(got[1, 16, :, 4], torch.linspace(-1, 1, 3))  # the row coordinate
    assert torch.equal(got[0, 17, 2], torch.linspace(-1, 1, 5))  # the column coordinate
    config = DemoConfig().stage_c
    assert (config.c_in, config.c_out) == (18, 16)
    stage_c = fresh_stages().stage_c.eval()
    seen: list[torch.Tensor] = []
    stage_c.embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x0, r = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        eps = stage_c(x0, r, torch.zeros(1, 4, 64), torch.zeros(1, 1, 64), torch.zeros(1, 1, 16))
    assert eps.shape == (1, 16, 8, 8) and torch.equal(seen[0], with_coordinates(x0))


def test_eps_from_v_is_the_noise_of_a_v_prediction() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 16, 8, 8, generator=g), torch.randn(5, 16, 8, 8, generator=g)
    lsnr = logsnr(torch.tensor([0.02, 0.3, 0.6, 0.9, 1.0]))
    a, b = (s.view(-1, 1, 1, 1) for s in vp_scalers(lsnr))
    x_t, v = a * x0 + b * eps, a * eps - b * x0
    got = eps_from_v(v, x_t, noise_cond(lsnr))
    assert torch.allclose(got, eps, atol=2e-4)
    assert torch.allclose(eps_to_x0(x_t[:4], got[:4], lsnr[:4]), x0[:4], atol=2e-3)  # a > 0.01 there


def test_an_untrained_v_model_already_answers_the_noisiest_step() -> None:
    """Zero-initialised output (v = 0): ε = b·x_t, which at t = 1 is x_t itself, the right answer there."""
    torch.manual_seed(0)
    stage_c = fresh_stages().stage_c.eval()
    x0 = torch.randn(2, 16, 8, 8)
    d = diffuse(x0, t=torch.tensor([1.0, 1.0]))
    with torch.no_grad():
        eps = stage_c(d.noised, d.noise_cond, torch.zeros(2, 4, 64), torch.zeros(2, 1, 64), torch.zeros(2, 1, 16))
    a, _ = vp_scalers(d.logsnr[:1])  # ~0.01: ε = b·x_t misses ε by about a·x0
    assert (eps - d.epsilon).abs().max() <= 1.5 * float(a) * x0.abs().max() + 1e-3
