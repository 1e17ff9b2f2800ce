"""Stage C: official checkpoint layout, parity with the stage_c_tiny reference, dtypes, checkpointing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_matches_manifest, call_kwargs, count_products, load_fixture, read_manifest, reference_dir

from cascade_lab.models.common import AttnBlock, ResBlock
from cascade_lab.models.stage_c import StageC, StageCConfig


def count_forward_calls(module: torch.nn.Module) -> list[int]:
    """A list that grows by one per forward of module (forward hooks do not fire in checkpoint recomputes)."""
    calls: list[int] = []
    forward = module.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counting_forward  # type: ignore[method-assign]
    return calls


def summary(name: str) -> dict:
    return json.loads((reference_dir("manifests") / "summary.json").read_text())["models"][name]


@pytest.mark.reference
@pytest.mark.parametrize("name, config", [("stage_c_full", StageCConfig.full()), ("stage_c_lite", StageCConfig.lite())])
def test_real_configs_match_checkpoint_manifests(name, config):
    expected = summary(name)
    assert config.kwargs() == {**StageCConfig().kwargs(), **expected["kwargs"]}
    with torch.device("meta"):
        model = StageC.from_config(config)
    assert_matches_manifest(model, name)
    state = model.state_dict()
    assert list(state) == [row[0] for row in read_manifest(name)]  # even the official order
    assert len(state) == expected["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]


@pytest.mark.reference
def test_tiny_preset_is_the_fixture_config():
    cfg, _, _ = load_fixture("stage_c_tiny")
    assert StageCConfig.tiny().kwargs() == cfg["kwargs"]
    assert isinstance(StageCConfig.tiny().build(), StageC)


@pytest.fixture(scope="module")
def tiny():
    cfg, weights, io = load_fixture("stage_c_tiny")
    model = StageC(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    return cfg, model.eval(), io


@pytest.mark.reference
@pytest.mark.parametrize("call_id", ["gen_r_embedding", "gen_c_embeddings", "default", "sca_crp", "cnet"])
def test_reproduces_reference_outputs(tiny, call_id):
    cfg, model, io = tiny
    call = next(c for c in cfg["calls"] if c["id"] == call_id)
    with torch.no_grad():
        actual = getattr(model, call["method"])(**call_kwargs(call, io))
    expected = io[call["outputs"][0]]
    if call_id == "gen_r_embedding":  # the float32 operation order is part of the format: exact
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    else:
        torch.testing.assert_close(actual, expected, **_tol(cfg))


def _tol(cfg: dict) -> dict:
    return {"atol": cfg["tolerance"]["atol"], "rtol": cfg["tolerance"]["rtol"]}


def forward_inputs(io: dict) -> dict:
    return {k: io[k] for k in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")}


@pytest.mark.reference
def test_two_dimensional_pooled_text_and_image_embeddings(tiny):
    # The official 2-D pooled branch crashes; here [B, C] means the same as [B, 1, C].
    cfg, model, io = tiny
    inputs = forward_inputs(io) | {"clip_text_pooled": io["clip_text_pooled"][:, 0], "clip_img": io["clip_img"][:, 0]}
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out, io["out_default"], **_tol(cfg))


@pytest.mark.reference
def test_attention_runs_through_sdpa(tiny, monkeypatch):
    _, model, io = tiny
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    with torch.no_grad():
        model(**forward_inputs(io))
    assert len(calls) == sum(isinstance(m, AttnBlock) for m in model.modules()) == 6


@pytest.mark.reference
def test_bfloat16_runs_without_autocast_close_to_float32(tiny):
    _, model, io = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert not torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        out = bf16(**forward_inputs(io))  # float32 inputs are cast; the output comes back as float32
        out_bf16 = bf16(**{k: v.bfloat16() if k != "r" else v for k, v in forward_inputs(io).items()})
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    expected = io["out_default"]
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()
    assert (out - expected).abs().mean() < 0.02 * expected.std()
    assert (out_bf16.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_float16_is_refused_with_a_helpful_message():
    model = StageC(**StageCConfig.tiny().kwargs())
    words = ("float16", "black", "bfloat16")
    for convert in (lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.float16)):
        with pytest.raises(TypeError) as err:
            convert(model)
        assert all(w in str(err.value) for w in words)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "a refused cast must not convert anything"
    with pytest.raises(TypeError, match="float16"):
        torch.nn.ModuleDict({"prior": model}).half()  # a parent's cast reaches StageC._apply
    model.to(torch.bfloat16).float()  # the supported casts still work

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with pytest.raises(TypeError, match="black"):
            StageC(**StageCConfig.tiny().kwargs())
    finally:
        torch.set_default_dtype(previous)

    # float16 weights that arrive without a cast (load_state_dict(assign=True)) are caught in forward
    half_state = {k: v.half() for k, v in model.state_dict().items()}
    model.load_state_dict(half_state, assign=True)
    x = torch.randn(1, 16, 4, 4)
    with pytest.raises(TypeError, match="bfloat16 or torch.float32"):
        model(x, torch.rand(1), torch.randn(1, 77, 24), torch.randn(1, 1, 24), torch.zeros(1, 1, 12))


def test_float16_autocast_is_refused():
    model = StageC(**StageCConfig.tiny().kwargs()).eval()
    args = (torch.randn(1, 16, 4, 4), torch.rand(1), torch.randn(1, 77, 24), torch.randn(1, 1, 24), torch.zeros(1, 12))
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(TypeError, match="autocast"):
        model(*args)


@pytest.mark.reference
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny, autocast):
    _, reference, io = tiny
    inputs = forward_inputs(io)
    grads, resblock_calls, backward_products = [], [], []
    for enabled, keep in ((False, False), (True, False), (True, True)):
        model = copy.deepcopy(reference).train()  # dropout is 0 in the tiny config
        model.enable_gradient_checkpointing(enabled, keep_products=keep)
        count = count_forward_calls(next(m for m in model.modules() if isinstance(m, ResBlock)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).float().square().mean()
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


@pytest.mark.reference
def test_selective_checkpointing_keeps_products_within_its_budget(tiny):
    """keep_bytes bounds what one forward pass keeps; the products past it are recomputed, with the same gradients.
    The budget is per forward pass: a second step keeps as much as the first."""
    _, reference, io = tiny
    inputs = forward_inputs(io)

    def step(model: torch.nn.Module) -> tuple[int, dict]:
        loss = model(**inputs).square().mean()
        products = count_products(loss.backward)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return products, grads

    runs = {}
    for name in ("all", "none", "half"):  # "half": half of what "all" kept
        keep_bytes = {"all": None, "none": 0}.get(name, runs["all"][2] // 2 if runs else None)
        model = copy.deepcopy(reference).train()
        model.enable_gradient_checkpointing(True, keep_products=True, keep_bytes=keep_bytes)
        first, grads = step(model)
        second, _ = step(model)
        runs[name] = (first, grads, model.checkpoint_budget.kept, model.checkpoint_budget.recomputed, second)
    full = copy.deepcopy(reference).train()
    full.enable_gradient_checkpointing(True)
    full_products, full_grads = step(full)
    assert runs["all"][3] == 0 and runs["none"][2] == 0 and runs["none"][3] == runs["all"][2]
    assert runs["none"][0] == full_products > runs["half"][0] > runs["all"][0]
    assert 0 < runs["half"][2] <= runs["all"][2] // 2 and runs["half"][2] + runs["half"][3] == runs["all"][2]
    for name, (first, grads, _, _, second) in runs.items():
        assert second == first, name
        for key in full_grads:
            assert torch.equal(grads[key], full_grads[key]), (name, key)


def test_gradient_checkpointing_is_inactive_in_eval():
    model = StageC(**StageCConfig.tiny().kwargs()).eval()
    model.gradient_checkpointing = True
    count = count_forward_calls(next(m for m in model.modules() if isinstance(m, ResBlock)))
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    model(x, torch.rand(1), torch.randn(1, 77, 24), torch.randn(1, 24), torch.zeros(1, 12)).sum().backward()
    assert len(count) == 1


def test_attention_dropout_only_in_training():
    config = StageCConfig.tiny()
    config.dropout = [0.5, 0.5]
    torch.manual_seed(0)
    model = config.build()
    for p in model.parameters():  # the official init zeroes the output conv; make the output depend on x
        torch.nn.init.normal_(p, std=0.2)
    args = (torch.randn(2, 16, 4, 4), torch.rand(2), torch.randn(2, 77, 24), torch.randn(2, 24), torch.zeros(2, 12))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(*args), model(*args))
        model.train()
        assert not torch.equal(model(*args), model(*args))


def test_any_latent_size_and_official_init():
    model = StageC(**StageCConfig.tiny().kwargs()).eval()
    assert torch.count_nonzero(model.clf[1].weight) == 0  # official init: outputs start at zero
    with torch.no_grad():
        out = model(
            torch.randn(3, 16, 7, 3), torch.rand(3), torch.randn(3, 77, 24), torch.randn(3, 24), torch.zeros(3, 12)
        )
    assert out.shape == (3, 16, 7, 3)


@pytest.mark.parametrize(
    "options",
    [
        {"switch_level": [True]},  # real down/up resampling between the levels
        {"switch_level": None},  # stride-2 conv / transposed conv scalers, as in Stage B
        {"level_config": ["CTAF", "CTF"], "self_attn": False},
        {"block_repeat": [[2, 1], [1, 3]], "dropout": 0.0},
    ],
)
def test_architecture_options_run_forward_and_backward(options):
    config = StageCConfig.tiny()
    for key, value in options.items():
        setattr(config, key, value)
    model = config.build().train()
    x = torch.randn(2, 16, 7, 5)
    out = model(x, torch.rand(2), torch.randn(2, 77, 24), torch.randn(2, 24), torch.zeros(2, 12))
    assert out.shape == x.shape
    out.sum().backward()
    assert model.clf[1].weight.grad is not None and torch.count_nonzero(model.clf[1].weight.grad) > 0
