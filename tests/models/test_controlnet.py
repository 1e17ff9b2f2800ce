"""ControlNet: the four shipped layouts, the controlnet_tiny reference and its end-to-end run through Stage C."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_matches_manifest, call_kwargs, load_fixture, reference_dir

from cascade_lab.models.controlnet import ControlNet, ControlNetConfig, scale_control
from cascade_lab.models.stage_c import StageC

PRESETS = {
    "controlnet_canny": ControlNetConfig.canny,
    "controlnet_inpainting": ControlNetConfig.inpainting,
    "controlnet_super_resolution": ControlNetConfig.super_resolution,
    "controlnet_identity": ControlNetConfig.identity,
}


@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shipped_configs_match_checkpoint_manifests(name):
    expected = json.loads((reference_dir("manifests") / "summary.json").read_text())["models"][name]
    config = PRESETS[name]()
    assert config.kwargs() == {**ControlNetConfig().kwargs(), **expected["kwargs"]}
    with torch.device("meta"):
        model = ControlNet.from_config(config)
    assert_matches_manifest(model, name)
    state = model.state_dict()
    assert len(state) == expected["num_keys"]
    assert sum(v.numel() for v in state.values()) == expected["num_elements"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]


@pytest.mark.parametrize("c_in", [1, 4])
def test_effnet_stem_replacement_keeps_the_official_quirks(c_in):
    model = ControlNet(c_in=c_in, c_proj=8, proj_blocks=[1], bottleneck_mode="effnet").eval()
    stem = model.backbone[0][0]
    assert stem.weight.shape == (24, c_in, 3, 3)
    assert stem.padding == (0, 0) and stem.stride == (2, 2) and stem.bias is None
    if c_in > 3:
        assert torch.count_nonzero(stem.weight[:, 3:]) == 0  # only the RGB channels are copied
    with torch.no_grad():
        out = model(torch.rand(1, c_in, 32, 64))
    assert out[0] is None and out[1].shape == (1, 8, 1, 2)  # stride 32 (the unpadded stem loses a pixel)
    assert torch.count_nonzero(out[1]) == 0  # zero-initialised output projection: a fresh net adds nothing


def test_rgb_effnet_backbone_is_untouched():
    model = ControlNet(c_in=3, c_proj=8, proj_blocks=[0])
    assert model.backbone[0][0].padding == (1, 1)


def test_large_bottleneck_forward_shape():
    with torch.device("meta"):  # 200M parameters: shapes only
        model = ControlNet(c_in=2, c_proj=4, proj_blocks=[2, 0], bottleneck_mode="large").eval()
        out = model(torch.randn(1, 2, 3, 5))
    assert [None if t is None else tuple(t.shape) for t in out] == [(1, 4, 3, 5), None, (1, 4, 3, 5)]


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="proj_blocks"):
        ControlNet(c_in=3)
    with pytest.raises(ValueError, match="bottleneck_mode 'huge'"):
        ControlNet(c_in=3, proj_blocks=[0], bottleneck_mode="huge")


@pytest.fixture(scope="module")
def tiny():
    cfg, weights, io = load_fixture("controlnet_tiny")
    model = ControlNet(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    tol = {"atol": cfg["tolerance"]["atol"], "rtol": cfg["tolerance"]["rtol"]}
    return cfg, model.eval(), io, tol


@pytest.mark.reference
def test_tiny_preset_is_the_fixture_config(tiny):
    cfg, _, _, _ = tiny
    assert ControlNetConfig.tiny().kwargs() == cfg["kwargs"]


@pytest.mark.reference
def test_reproduces_reference_outputs(tiny):
    cfg, model, io, tol = tiny
    (call,) = cfg["calls"]
    with torch.no_grad():
        outputs = model(**call_kwargs(call, io))
    assert len(outputs) == len(call["outputs"]) == 6
    for actual, name in zip(outputs, call["outputs"], strict=True):
        if name is None:
            assert actual is None
        else:
            torch.testing.assert_close(actual, io[name], **tol)


@pytest.mark.reference
def test_end_to_end_through_stage_c(tiny):
    _, model, io, _ = tiny
    c_cfg, c_weights, c_io = load_fixture("stage_c_tiny")
    stage_c = StageC(**c_cfg["kwargs"])
    stage_c.load_state_dict(c_weights, strict=True)
    stage_c.eval()
    inputs = {k: c_io[k] for k in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")}
    with torch.no_grad():
        out = stage_c(**inputs, cnet=model(io["x"]))
        unscaled = stage_c(**inputs, cnet=scale_control(model(io["x"]), 0.0))
    tol = {"atol": c_cfg["tolerance"]["atol"], "rtol": c_cfg["tolerance"]["rtol"]}  # README: use Stage C's
    torch.testing.assert_close(out, io["e2e_stage_c_out"], **tol)
    torch.testing.assert_close(unscaled, c_io["out_default"], **tol)  # strength 0 == no ControlNet
