"""Previewer: official checkpoint layout, parity with the previewer reference, shapes and dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_matches_manifest, call_kwargs, load_fixture, reference_dir

from cascade_lab.models.previewer import Previewer, PreviewerConfig


@pytest.mark.reference
def test_full_config_matches_checkpoint_manifest():
    with torch.device("meta"):
        model = Previewer()
    assert_matches_manifest(model, "previewer")
    summary = json.loads((reference_dir("manifests") / "summary.json").read_text())["models"]["previewer"]
    state = model.state_dict()
    assert len(state) == summary["num_keys"]
    assert sum(v.numel() for v in state.values()) == summary["num_elements"]
    assert sum(p.numel() for p in model.parameters()) == summary["num_parameters"]
    assert len(list(model.buffers())) == summary["num_buffer_keys"]


@pytest.fixture(scope="module")
def reference():
    cfg, weights, io = load_fixture("previewer")
    model = Previewer(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
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
def test_bf16_without_autocast(reference):
    _, model, io = reference
    bf16 = Previewer()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.eval().to(torch.bfloat16)
    with torch.no_grad():
        out = bf16(io["x"].bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == io["out"].shape
    scale = io["out"].abs().max().item()  # about 7
    torch.testing.assert_close(out.float(), io["out"], atol=0.05 * scale, rtol=0.05)


@pytest.mark.parametrize("hw", [(24, 24), (7, 5), (1, 3)])
def test_upsamples_8x(hw):
    model = PreviewerConfig.tiny().build().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 16, *hw))
    assert out.shape == (2, 3, 8 * hw[0], 8 * hw[1])


def test_config_presets():
    assert PreviewerConfig.full() == PreviewerConfig(c_in=16, c_hidden=512, c_out=3)
    tiny = PreviewerConfig.tiny().build()
    assert [tuple(m.weight.shape) for m in tiny.blocks if isinstance(m, torch.nn.ConvTranspose2d)] == [
        (32, 16, 2, 2),
        (16, 8, 2, 2),
        (8, 8, 2, 2),
    ]
