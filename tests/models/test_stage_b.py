"""Stage B: official checkpoint layout, parity with the stage_b_tiny reference, dtypes, checkpointing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_matches_manifest, call_kwargs, count_products, load_fixture, read_manifest, reference_dir

from cascade_lab.models.common import ResBlock
from cascade_lab.models.stage_b import StageB, StageBConfig


def count_forward_calls(module: torch.nn.Module) -> list[int]:
    """A list that grows by one per forward of module (forward hooks do not fire in checkpoint recomputes)."""
    calls: list[int] = []
    forward = module.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counting_forward  # type: ignore[method-assign]
    return calls


@pytest.mark.reference
@pytest.mark.parametrize("name, config", [("stage_b_full", StageBConfig.full()), ("stage_b_lite", StageBConfig.lite())])
def test_real_configs_match_checkpoint_manifests(name, config):
    expected = json.loads((reference_dir("manifests") / "summary.json").read_text())["models"][name]
    assert config.kwargs() == {**StageBConfig().kwargs(), **expected["kwargs"]}
    with torch.device("meta"):
        model = StageB.from_config(config)
    assert_matches_manifest(model, name)
    state = model.state_dict()
    assert list(state) == [row[0] for row in read_manifest(name)]  # even the official order
    assert len(state) == expected["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]


@pytest.mark.reference
def test_tiny_preset_is_the_fixture_config():
    cfg, _, _ = load_fixture("stage_b_tiny")
    assert StageBConfig.tiny().kwargs() == cfg["kwargs"]
    assert isinstance(StageBConfig.tiny().build(), StageB)


@pytest.fixture(scope="module")
def tiny():
    cfg, weights, io = load_fixture("stage_b_tiny")
    model = StageB(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    tol = {"atol": cfg["tolerance"]["atol"], "rtol": cfg["tolerance"]["rtol"]}
    return cfg, model.eval(), io, tol


def forward_inputs(io: dict) -> dict:
    return {k: io[k] for k in ("x", "r", "effnet", "clip")}


@pytest.mark.reference
@pytest.mark.parametrize("call_id", ["gen_r_embedding", "gen_c_embeddings", "default", "pixels"])
def test_reproduces_reference_outputs(tiny, call_id):
    cfg, model, io, tol = tiny
    call = next(c for c in cfg["calls"] if c["id"] == call_id)
    with torch.no_grad():
        actual = getattr(model, call["method"])(**call_kwargs(call, io))
    if call_id == "gen_r_embedding":  # the float32 operation order is part of the format: exact
        tol = {"atol": 0.0, "rtol": 0.0}
    torch.testing.assert_close(actual, io[call["outputs"][0]], **tol)


@pytest.mark.reference
def test_two_dimensional_clip_and_explicit_zero_conditions(tiny):
    _, model, io, tol = tiny
    inputs = forward_inputs(io)
    with torch.no_grad():
        flat = model(**inputs | {"clip": io["clip"][:, 0]})
        explicit = model(**inputs, pixels=torch.zeros(2, 3, 8, 8), sca=torch.zeros(2))
    torch.testing.assert_close(flat, io["out_default"], **tol)
    torch.testing.assert_close(explicit, io["out_default"], **tol)


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_run_without_autocast(tiny, dtype):
    _, model, io, _ = tiny
    half = copy.deepcopy(model).to(dtype)
    assert not torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        out = half(**forward_inputs(io), pixels=io["pixels"])  # float32 inputs come back as float32
        out_half = half(**{k: v.to(dtype) if k != "r" else v for k, v in forward_inputs(io).items()})
    assert out.dtype == torch.float32 and out_half.dtype == dtype
    for actual, expected in ((out, io["out_pixels"]), (out_half.float(), io["out_default"])):
        assert torch.isfinite(actual).all()
        assert (actual - expected).abs().max() < 0.05 * expected.abs().max()
        assert (actual - expected).abs().mean() < 0.02 * expected.std()


@pytest.mark.reference
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny, autocast):
    _, reference, io, _ = tiny
    grads, resblock_calls, backward_products = [], [], []
    for enabled, keep in ((False, False), (True, False), (True, True)):
        model = copy.deepcopy(reference).train()  # dropout is 0 in the tiny config
        model.enable_gradient_checkpointing(enabled, keep_products=keep)
        count = count_forward_calls(next(m for m in model.modules() if isinstance(m, ResBlock)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**forward_inputs(io), pixels=io["pixels"]).float().square().mean()
        backward_products.append(count_products(loss.backward))
        grads.append({n: p.grad for n, p in model.named_parameters()})
        resblock_calls.append(len(count))
    assert resblock_calls == [1, 2, 2], "checkpointing reruns each block once in the backward pass"
    off, full, keep = backward_products
    assert keep == off < full, "selective checkpointing recomputes no product of the forward pass"
    for name in grads[0]:
        assert grads[0][name] is not None, name
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
        assert torch.equal(grads[2][name], grads[1][name]), name  # kept outputs: the bits a recompute gives


def test_official_init_and_sizes():
    model = StageB(**StageBConfig.tiny().kwargs()).eval()
    assert torch.count_nonzero(model.clf[1].weight) == 0  # official init: outputs start at zero
    assert all(torch.count_nonzero(m.mapper.weight) == 0 for m in model.modules() if hasattr(m, "mapper_sca"))
    with torch.no_grad():  # 40x36 -> levels 20x18, 10x9, 5x4, 2x2: the up-path resize runs twice
        out = model(torch.randn(1, 4, 40, 36), torch.rand(1), torch.randn(1, 16, 3, 3), torch.randn(1, 24))
    assert out.shape == (1, 4, 40, 36)
