"""EfficientNet encoder: official checkpoint layout, parity with the effnet_encoder reference, helpers, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_matches_manifest, call_kwargs, load_fixture, reference_dir

from cascade_lab.models.effnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetEncoder,
    EfficientNetEncoderConfig,
    StochasticDepth,
    efficientnet_v2_s_features,
    imagenet_normalize,
)


@pytest.mark.reference
def test_full_config_matches_checkpoint_manifest():
    with torch.device("meta"):
        model = EfficientNetEncoder()
    assert_matches_manifest(model, "effnet_encoder")
    summary = json.loads((reference_dir("manifests") / "summary.json").read_text())["models"]["effnet_encoder"]
    state = model.state_dict()
    assert len(state) == summary["num_keys"]
    assert sum(v.numel() for v in state.values()) == summary["num_elements"]
    assert sum(p.numel() for p in model.parameters()) == summary["num_parameters"]
    assert len(list(model.buffers())) == summary["num_buffer_keys"]


@pytest.fixture(scope="module")
def reference():
    """The effnet_encoder fixture; its float16 weights are cast to float32 as the expectation was computed."""
    cfg, weights, io = load_fixture("effnet_encoder")
    model = EfficientNetEncoder(**cfg["kwargs"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)
    return cfg, model.eval(), io


@pytest.mark.reference
def test_reproduces_reference_output(reference):
    cfg, model, io = reference
    (call,) = cfg["calls"]
    with torch.no_grad():
        out = model(**call_kwargs(call, io))
    tol = cfg["tolerance"]
    torch.testing.assert_close(out, io["out"], atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.reference
def test_encode_image_applies_imagenet_normalisation(reference):
    cfg, model, io = reference
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img01 = io["x"] * std + mean  # the [0, 1] image the normalised fixture input came from
    torch.testing.assert_close(imagenet_normalize(img01), io["x"], atol=1e-6, rtol=0)
    with torch.no_grad():
        out = model.encode_image(img01)
    torch.testing.assert_close(out, io["out"], atol=cfg["tolerance"]["atol"], rtol=cfg["tolerance"]["rtol"])


@pytest.mark.reference
def test_bf16_without_autocast(reference):
    _, model, io = reference
    bf16 = EfficientNetEncoder()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.eval().to(torch.bfloat16)
    with torch.no_grad():
        out = bf16(io["x"].bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == io["out"].shape
    # bf16 keeps ~3 significant digits through 40 blocks: measured 0.054 against |out| <= 1.8.
    torch.testing.assert_close(out.float(), io["out"], atol=0.15, rtol=0.05)


def test_output_stride_is_32_and_config_builds():
    model = EfficientNetEncoderConfig.full().build().eval()
    assert EfficientNetEncoderConfig.full() == EfficientNetEncoderConfig(c_latent=16)
    with torch.no_grad():
        out = model.encode_image(torch.rand(1, 3, 96, 64))
    assert out.shape == (1, 16, 3, 2)
    assert torch.isfinite(out).all()


def test_features_for_controlnet_take_other_input_channels():
    features = efficientnet_v2_s_features(in_channels=1)
    stem = features[0][0]
    assert isinstance(stem, torch.nn.Conv2d)
    assert stem.weight.shape == (24, 1, 3, 3) and stem.padding == (1, 1) and stem.bias is None
    assert len(features) == 8
    with torch.no_grad():
        assert features.eval()(torch.rand(1, 1, 64, 32)).shape == (1, 1280, 2, 1)


def test_stochastic_depth_grows_to_0_2_and_acts_only_in_training():
    features = efficientnet_v2_s_features()
    probs = [m.p for m in features.modules() if isinstance(m, StochasticDepth)]
    assert len(probs) == 40 and probs[0] == 0.0 and probs[-1] == pytest.approx(0.2 * 39 / 40)
    drop = StochasticDepth(0.5)
    x = torch.ones(64, 2, 3, 3)
    assert torch.equal(drop.eval()(x), x)
    kept = drop.train()(x)[:, 0, 0, 0]
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # dropped rows, or kept rows scaled by 1/(1-p)


def test_batchnorms_use_torchvision_eps_and_mapper_is_not_affine():
    model = EfficientNetEncoder()
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert backbone_bns and all(m.eps == 1e-3 for m in backbone_bns)
    assert not model.mapper[1].affine
