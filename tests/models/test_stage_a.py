"""Stage A: official checkpoint layout, parity with the stage_a_tiny reference, shapes, dtypes, gradients."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_matches_manifest, call_kwargs, load_fixture, reference_dir

from cascade_lab.models.stage_a import StageA, StageAConfig, nearest_code


@pytest.mark.reference
def test_full_config_matches_checkpoint_manifest():
    with torch.device("meta"):
        model = StageA()
    assert_matches_manifest(model, "stage_a")
    summary = json.loads((reference_dir("manifests") / "summary.json").read_text())["models"]["stage_a"]
    state = model.state_dict()
    assert len(state) == summary["num_keys"]
    assert sum(v.numel() for v in state.values()) == summary["num_elements"]
    assert sum(p.numel() for p in model.parameters()) == summary["num_parameters"]
    assert len(list(model.buffers())) == summary["num_buffer_keys"]


@pytest.mark.reference
def test_config_presets():
    assert StageAConfig.full() == StageAConfig()
    cfg, _, _ = load_fixture("stage_a_tiny")
    assert StageAConfig.tiny() == StageAConfig(**cfg["kwargs"])
    assert isinstance(StageAConfig.tiny().build(), StageA)


@pytest.fixture(scope="module")
def tiny():
    cfg, weights, io = load_fixture("stage_a_tiny")
    model = StageA(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    return cfg, model.eval(), io


@pytest.mark.reference
@pytest.mark.parametrize("call_id", ["encode", "encode_quantized", "decode", "forward", "forward_quantized"])
def test_reproduces_reference_outputs(tiny, call_id):
    cfg, model, io = tiny
    call = next(c for c in cfg["calls"] if c["id"] == call_id)
    with torch.no_grad():
        result = getattr(model, call["method"])(**call_kwargs(call, io))
    result = result if isinstance(result, tuple) else (result,)
    picked = [result[i] for i in call["pick"]] if "pick" in call else list(result)
    tol = cfg["tolerance"]
    for actual, name in zip(picked, call["outputs"], strict=True):
        expected = io[name]
        if expected.dtype == torch.int64:  # codebook indices: exact
            assert actual.dtype == torch.int64 and torch.equal(actual, expected), name
        else:
            torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"], msg=name)


@pytest.mark.reference
def test_unquantized_encode_and_forward_return_nones(tiny):
    _, model, io = tiny
    with torch.no_grad():
        _, q_x, indices, loss = model.encode(io["x"])
        _, vq_loss = model(io["x"])
    assert q_x is None and indices is None and loss is None and vq_loss is None


def test_nearest_code_is_the_euclidean_argmin():
    gen = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(500, 4, generator=gen), torch.randn(64, 4, generator=gen)
    expected = torch.cdist(x.double(), codebook.double()).argmin(dim=1)
    assert torch.equal(nearest_code(x, codebook), expected)


@pytest.mark.parametrize("hw", [(28, 20), (36, 44), (4, 4)])
def test_encode_decode_shapes_for_odd_latent_sizes(hw):
    torch.manual_seed(0)
    model = StageAConfig.tiny().build().eval()
    h, w = hw
    with torch.no_grad():
        z = model.encode(torch.rand(2, 3, h, w))[0]
        assert z.shape == (2, 4, h // 4, w // 4)  # 7x5, 9x11, 1x1: odd latents
        assert model.decode(z).shape == (2, 3, h, w)


@pytest.mark.parametrize("levels", [2, 3])
def test_downscale_is_the_image_to_latent_ratio(levels):
    model = StageA(levels=levels, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=8).eval()
    with torch.no_grad():
        z = model.encode(torch.rand(1, 3, 32, 32))[0]
    assert model.downscale == 2**levels and z.shape[-1] == 32 // model.downscale
    assert "downscale" not in model.state_dict()  # not part of the checkpoint format


def test_odd_image_size_is_refused_with_a_clear_message():
    model = StageAConfig.tiny().build()
    with pytest.raises(ValueError, match=r"even image size, got \(31, 24\)"):
        model.encode(torch.rand(1, 3, 31, 24))


def test_bf16_without_autocast():
    torch.manual_seed(0)
    model = StageAConfig.tiny().build().eval().to(torch.bfloat16)
    x = torch.rand(1, 3, 20, 28, dtype=torch.bfloat16)
    with torch.no_grad():
        z, _, _, _ = model.encode(x)
        qe, _, indices, loss = model.encode(x, quantize=True)
        img = model.decode(z)
    assert z.dtype == qe.dtype == img.dtype == torch.bfloat16
    assert indices is not None and indices.shape == (1, 5, 7)
    assert loss is not None and torch.isfinite(loss)
    assert img.shape == (1, 3, 20, 28) and torch.isfinite(img).all()


@pytest.mark.reference
def test_quantized_path_trains_encoder_straight_through_and_codebook_via_loss(tiny):
    _, reference, io = tiny
    model = StageAConfig.tiny().build()
    model.load_state_dict(reference.state_dict())
    qe, x_bn, indices, loss = model.encode(io["x"], quantize=True)
    assert x_bn is not None and indices is not None and loss is not None
    # The quantized latent is exactly the chosen codebook rows (/ scale_factor) ...
    rows = model.vquantizer.codebook.weight[indices].permute(0, 3, 1, 2) / model.scale_factor
    torch.testing.assert_close(qe, rows, atol=0, rtol=0)
    # ... its gradient reaches the encoder unchanged, and the loss (1.25 * MSE) reaches the codebook.
    qe.sum().backward(retain_graph=True)
    assert model.in_block[1].weight.grad is not None and model.in_block[1].weight.grad.abs().sum() > 0
    assert model.vquantizer.codebook.weight.grad is None
    torch.testing.assert_close(loss, 1.25 * ((qe - x_bn) * model.scale_factor).pow(2).mean())
    loss.backward()
    assert model.vquantizer.codebook.weight.grad is not None



def test_inference_decode_folds_the_gammas_with_the_same_numbers(monkeypatch):
    """decode under inference_mode (gammas folded into the weights, NHWC, fused matmuls) equals the module
    path autograd runs, to float32 rounding, with gammas far from their zero init."""
    from cascade_lab.models import stage_a
    from cascade_lab.models.stage_a import StageAResBlock

    torch.manual_seed(0)
    model = StageAConfig.tiny().build().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, StageAResBlock):
                module.gammas.normal_(0, 0.5)
    folded = []
    monkeypatch.setattr(stage_a, "_MLP_ROWS", 7)  # several row blocks and a remainder
    original = StageAResBlock._forward_folded
    monkeypatch.setattr(StageAResBlock, "_forward_folded", lambda self, x: folded.append(1) or original(self, x))
    z = torch.randn(2, model.c_latent, 9, 10)
    with torch.inference_mode():
        fast = model.decode(z)
    assert folded, "the inference path did not run"
    count = len(folded)
    with torch.enable_grad():
        slow = model.decode(z)
    assert len(folded) == count and slow.requires_grad  # autograd runs the module path
    assert fast.is_contiguous() and fast.shape == slow.shape == (2, 3, 36, 40)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    # a hooked layer (a LoRA wrapper, a probe) keeps its block on the module path, where the hook sees it run
    block = next(m for m in model.up_blocks if isinstance(m, StageAResBlock))
    seen = []
    block.channelwise[0].register_forward_hook(lambda *args: seen.append(1))
    with torch.inference_mode():
        hooked = model.decode(z)
    assert seen == [1]
    torch.testing.assert_close(hooked, fast, atol=1e-5, rtol=1e-5)
