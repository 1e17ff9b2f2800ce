"""Issue 8 speed-ups keep the outputs: conditioning cache (bit-exact, computed once per conditioning),
the inference GRN path, compile_denoiser, and Lazy stages in the pipeline (loaded on use, released after)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from conftest import load_fixture

from cascade_lab.models.common import GlobalResponseNorm
from cascade_lab.models.stage_b import StageB
from cascade_lab.models.stage_c import StageC, StageCConfig
from cascade_lab.params import GenerationParams
from cascade_lab.pipeline import Lazy, Pipeline

STAGE_C_INPUTS = ("x", "r", "clip_text", "clip_text_pooled", "clip_img")
STAGE_B_INPUTS = ("x", "r", "effnet", "clip")


def fixture_model(name: str, cls: type) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict]:
    cfg, weights, io = load_fixture(name)
    model = cls(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    return model.eval(), io, cfg


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(obj, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


@pytest.mark.reference
@pytest.mark.parametrize(("fixture", "cls", "names", "mapper"), [
    ("stage_c_tiny", StageC, STAGE_C_INPUTS, "clip_txt_mapper"),
    ("stage_b_tiny", StageB, STAGE_B_INPUTS, "effnet_mapper"),
])
def test_conditioning_cache_is_bit_exact_and_maps_the_conditioning_once(monkeypatch, fixture, cls, names, mapper):
    model, io, cfg = fixture_model(fixture, cls)
    inputs = {k: io[k] for k in names}
    with torch.inference_mode():
        plain = model(**inputs)
        mapped = count_calls(monkeypatch, getattr(model, mapper), "forward")
        kv = count_calls(monkeypatch, model.down_blocks[-1][2].kv_mapper, "forward")
        with model.conditioning_cache():
            steps = [model(**inputs | {"x": inputs["x"] * s, "r": inputs["r"] * s}) for s in (1.0, 0.9, 0.8)]
            assert len(mapped) == 1 and len(kv) == 1  # once for three steps
            other = {k: v.clone() for k, v in inputs.items()}  # new conditioning tensors: mapped again
            torch.testing.assert_close(model(**other), plain, atol=0, rtol=0)
            assert len(mapped) == 2
        model(**inputs)  # outside the block nothing is kept
        assert len(mapped) == 3
    torch.testing.assert_close(steps[0], plain, atol=0, rtol=0)
    tol = {"atol": cfg["tolerance"]["atol"], "rtol": cfg["tolerance"]["rtol"]}
    torch.testing.assert_close(steps[0], io["out_default"], **tol)
    with torch.inference_mode():
        torch.testing.assert_close(steps[2], model(**inputs | {"x": inputs["x"] * 0.8, "r": inputs["r"] * 0.8}),
                                   atol=0, rtol=0)


@pytest.mark.reference
def test_conditioning_cache_is_off_while_autograd_records(monkeypatch):
    model, io, _ = fixture_model("stage_c_tiny", StageC)
    inputs = {k: io[k] for k in STAGE_C_INPUTS}
    mapped = count_calls(monkeypatch, model.clip_txt_mapper, "forward")
    with model.conditioning_cache():
        model(**inputs).sum().backward()
        model(**inputs).sum().backward()
    assert len(mapped) == 2 and model.clip_txt_mapper.weight.grad is not None


def test_grn_inference_path_matches_the_autograd_path():
    grn = GlobalResponseNorm(24)
    with torch.no_grad():
        grn.gamma.normal_(0, 0.3), grn.beta.normal_(0, 0.1)
    x = torch.randn(2, 5, 7, 24)
    with torch.inference_mode():
        fast = grn(x)
    slow = grn(x.clone().requires_grad_(True))
    reference = grn.gamma * (x * (x.norm(p=2, dim=(1, 2), keepdim=True) / (
        x.norm(p=2, dim=(1, 2), keepdim=True).mean(-1, keepdim=True) + 1e-6))) + grn.beta + x
    torch.testing.assert_close(fast, reference.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(slow.detach(), reference.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grn_chunked_sum_of_squares_on_a_wide_map(dtype):
    """Stage B's widest maps are summed in row chunks (no squared copy): float32 partial sums, one result."""
    from cascade_lab.models.common import _sum_of_squares

    x = torch.randn(2, 1000, 320).to(dtype)  # 1000 rows > 4 chunks of 204 rows: the chunked path
    with torch.inference_mode():
        chunked = _sum_of_squares(x)
    assert chunked.dtype == dtype
    expected = x.square().sum(dim=1)
    if dtype == torch.float32:
        torch.testing.assert_close(chunked, expected, atol=0, rtol=2e-6)
    else:  # float32 accumulation in both: the same bfloat16 values
        torch.testing.assert_close(chunked.float(), expected.float(), atol=0, rtol=8e-3)


@pytest.mark.reference
def test_compile_denoiser_keeps_the_output():
    model, io, _ = fixture_model("stage_c_tiny", StageC)
    inputs = {k: io[k] for k in STAGE_C_INPUTS}
    with torch.inference_mode():
        expected = model(**inputs)
        model.compile_denoiser(backend="eager")  # the dynamo trace without a C++ toolchain: fast
        compiled = model._compiled_denoise
        model.compile_denoiser(backend="eager")
        assert model._compiled_denoise is compiled  # the same options again: kept
        with model.conditioning_cache():
            torch.testing.assert_close(model(**inputs), expected, atol=0, rtol=0)


def test_lazy_stages_are_loaded_for_their_use_and_released_after(monkeypatch):
    from cascade_lab import pipeline as pipeline_module
    from cascade_lab.models.tiny import build_tiny

    trims: list[int] = []
    release = pipeline_module.release_freed_memory
    monkeypatch.setattr(pipeline_module, "release_freed_memory", lambda: trims.append(len(loads)) or release())

    eager = build_tiny()
    params = GenerationParams("a red circle", seed=3, width=128, height=128, steps_c=2, steps_b=2)
    expected = Pipeline(eager).run(params)
    loads: list[str] = []
    alive: list[weakref.ref] = []

    def loader(name: str) -> Callable[[], object]:
        def load() -> object:
            loads.append(name)
            model = copy.deepcopy(getattr(eager, name))
            alive.append(weakref.ref(model))
            return model
        return load

    lazy = dataclasses.replace(eager, **{name: Lazy(loader(name), StageCConfig.tiny() if name == "stage_c" else None)
                                         for name in ("text_encoder", "stage_c", "stage_b", "stage_a")})
    pipeline = Pipeline(lazy)
    out = pipeline.run(params)
    assert loads == ["text_encoder", "stage_c", "stage_b", "stage_a"]
    assert trims == [0, 1, 2, 3]  # freed memory handed back before each lazy stage is loaded
    lazy.previewer = Lazy(loader("previewer"))
    torch.testing.assert_close(pipeline.preview_c(out.latent_c), Pipeline(eager).preview_c(out.latent_c))
    gc.collect()
    assert all(ref() is None for ref in alive)  # nothing kept after the run
    assert torch.equal(out.images, expected.images) and torch.equal(out.latent_b, expected.latent_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_mlp_fused_path_matches_the_modules(dtype):
    from cascade_lab.models.common import ResBlock, channel_mlp

    block = ResBlock(16, dropout=0.0).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    block = block.to(dtype)
    h = torch.randn(2, 5, 6, 16, dtype=dtype)
    with torch.inference_mode():
        fused, plain = channel_mlp(block.channelwise, h), block.channelwise(h)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-2, "rtol": 2e-2}
    torch.testing.assert_close(fused, plain, **tol)
    seen: list[int] = []
    block.channelwise[1].register_forward_hook(lambda *_: seen.append(1))
    block.channelwise[0].weight.requires_grad_(True)
    with torch.enable_grad():
        channel_mlp(block.channelwise, h)  # autograd on: the modules run, hooks fire
    assert seen == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grn_folded_into_the_last_linear_on_wide_levels(dtype, monkeypatch):
    from cascade_lab.models import common
    from cascade_lab.models.common import ResBlock, channel_mlp

    block = ResBlock(8, dropout=0.0).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    reference_block = copy.deepcopy(block)
    block = block.to(dtype)
    h = torch.randn(2, 6, 7, 8)  # H*W = 42 > 2 * c = 16: the fold applies
    folded: list[int] = []
    original = common._grn_into_linear
    monkeypatch.setattr(common, "_grn_into_linear", lambda *a: folded.append(1) or original(*a))
    with torch.inference_mode():
        reference = reference_block.channelwise(h)  # fp32 modules, one after the other
        fast, plain = channel_mlp(block.channelwise, h.to(dtype)), block.channelwise(h.to(dtype))
    assert folded == [1]
    if dtype == torch.float32:
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    else:  # no further from the fp32 result than bf16 modules run one by one
        assert (fast.float() - reference).abs().max() <= 1.5 * (plain.float() - reference).abs().max() + 1e-3
    block.channelwise[4].register_forward_hook(lambda *_: folded.append(2))  # as a LoRA or a probe would
    with torch.inference_mode():
        hooked = channel_mlp(block.channelwise, h.to(dtype))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-2, "rtol": 2e-2}
    torch.testing.assert_close(hooked, plain, **tol)
    assert folded == [1, 2]  # the hooked layer ran as a module; no fold
    with torch.inference_mode():
        channel_mlp(block.channelwise, h[:, :2, :2].to(dtype))  # H*W = 4: GRN runs as a module
    assert folded == [1, 2, 2]


def test_release_freed_memory_where_it_can(monkeypatch):
    import sys

    from cascade_lab.pipeline import release_freed_memory

    assert isinstance(release_freed_memory(), bool)  # glibc: whether pages went back; elsewhere False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert release_freed_memory() is False


def _gelu_grn_reference(u: torch.Tensor, grn: GlobalResponseNorm) -> torch.Tensor:
    """The official modules' arithmetic (nn.GELU, then GRN with torch.norm), differentiated by autograd."""
    x = torch.nn.functional.gelu(u)
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    return grn.gamma * (x * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6))) + grn.beta + x


@pytest.mark.parametrize("shape", [(2, 5, 7, 24), (2, 40, 40, 64)])  # the second sums in row chunks
def test_gelu_grn_training_path_has_the_official_values_and_gradients(shape):
    """Training runs GELU + GRN as one function with a hand-written backward: values and gradients of u, gamma
    and beta are those of autograd through the official modules (float64 exactly, float32 to rounding),
    including a channel that GELU zeroes everywhere (norm 0: torch.norm's gradient there is 0)."""
    from cascade_lab.models.common import _GeluGRN, gelu_grn

    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        grn = GlobalResponseNorm(shape[-1]).to(dtype)
        with torch.no_grad():
            grn.gamma.normal_(0, 0.5), grn.beta.normal_(0, 0.1)
        u = torch.randn(shape, dtype=dtype)
        u[..., 0] = -40.0  # GELU(-40) == 0: a dead channel
        u.requires_grad_(True)
        g = torch.randn(shape, dtype=dtype)
        ref = _gelu_grn_reference(u, grn)
        ref_grads = torch.autograd.grad(ref, [u, grn.gamma, grn.beta], g)
        out = gelu_grn(u, grn)
        grads = torch.autograd.grad(out, [u, grn.gamma, grn.beta], g)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
        assert float(grads[0][..., 0].abs().max()) == 0.0
    small = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(1, 1, 1, 5, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(1, 1, 1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GeluGRN.apply, (small, gamma, beta))


def test_gelu_grn_in_bf16_under_autocast_and_frozen_parameters():
    """A bf16 LoRA (bf16 weights) and an autocast full fine-tune (fp32 gamma/beta, bf16 activations): outputs
    and gradients in the activations' dtype, within bf16 rounding of the float32 reference; frozen gamma/beta
    get no gradient."""
    from cascade_lab.models.common import gelu_grn

    torch.manual_seed(1)
    grn = GlobalResponseNorm(48)
    with torch.no_grad():
        grn.gamma.normal_(0, 0.5), grn.beta.normal_(0, 0.1)
    u32 = torch.randn(2, 6, 6, 48, requires_grad=True)
    g32 = torch.randn(2, 6, 6, 48)
    ref = _gelu_grn_reference(u32, grn)
    ref_du, ref_dgamma = torch.autograd.grad(ref, [u32, grn.gamma], g32)
    u = u32.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gelu_grn(u, grn)
    du, dgamma = torch.autograd.grad(out, [u, grn.gamma], g32.bfloat16())
    assert out.dtype == du.dtype == torch.bfloat16 and dgamma.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(du.float(), ref_du, rtol=5e-2, atol=5e-2 * float(ref_du.abs().max()))
    torch.testing.assert_close(dgamma, ref_dgamma, rtol=5e-2, atol=5e-2 * float(ref_dgamma.abs().max()))
    frozen = GlobalResponseNorm(48).bfloat16().requires_grad_(False)
    out = gelu_grn(u, frozen)
    (du,) = torch.autograd.grad(out.sum(), [u])
    assert du.dtype == torch.bfloat16 and frozen.gamma.grad is None


@pytest.mark.reference
def test_stage_c_training_step_through_the_fused_gelu_grn_matches_the_modules(monkeypatch):
    """A whole Stage C forward and backward with grad enabled takes the fused GELU + GRN in every block; its
    loss and every parameter gradient equal those of the plain modules (official arithmetic)."""
    import cascade_lab.models.common as common

    model, io, _ = fixture_model("stage_c_tiny", StageC)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GlobalResponseNorm):
                module.gamma.normal_(0, 0.5), module.beta.normal_(0, 0.1)
    inputs = {k: io[k] for k in STAGE_C_INPUTS}
    used = count_calls(monkeypatch, common._GeluGRN, "apply")
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(common, "gelu_grn", _gelu_grn_reference)
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    blocks = sum(isinstance(m, GlobalResponseNorm) for m in model.modules())
    assert len(used) == blocks > 0
    (loss_f, grads_f), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    assert grads_f.keys() == grads_r.keys() and any(".gamma" in n for n in grads_f)
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4,
                                   atol=1e-5 * float(grads_r[name].abs().max()) + 1e-12, msg=name)


@pytest.mark.parametrize("self_attn", [True, False])
def test_joint_in_proj_is_the_two_linears(self_attn, monkeypatch):
    """Training's packed in_proj of the queries and of the conditioning tokens as one node: float64 gradcheck,
    and fp32 outputs and weight/bias/input gradients equal to the two-linear path (weight and its slice)."""
    from cascade_lab.models.common import MultiheadAttention, _JointInProj

    c = 8
    stop = 3 * c if self_attn else c
    args = (torch.randn(5, c, dtype=torch.float64, requires_grad=True),
            torch.randn(3, c, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * c, c, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * c, dtype=torch.float64, requires_grad=True), stop)
    assert torch.autograd.gradcheck(_JointInProj.apply, args)

    torch.manual_seed(0)
    attn = MultiheadAttention(32, 4)
    for p in attn.parameters():  # (cascade_lab's Linear skips initialisation)
        torch.nn.init.normal_(p, std=0.2)
    x, cond = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 3, 32, requires_grad=True)
    g = torch.randn(2, 6, 32)
    calls = count_calls(monkeypatch, _JointInProj, "apply")
    results = []
    for joint in (True, False):
        if not joint:
            monkeypatch.setattr(attn, "_joint", lambda *a: None)
        out = attn(x, cond, self_attn=self_attn)
        grads = torch.autograd.grad(out, [x, cond, attn.in_proj_weight, attn.in_proj_bias], g)
        results.append((out, grads))
    assert len(calls) == 1  # the joint node in the first pass only
    (out_j, grads_j), (out_p, grads_p) = results
    torch.testing.assert_close(out_j, out_p, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_j, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_joint_in_proj_under_bf16_autocast_and_where_it_does_not_apply():
    """Under bf16 autocast (fp32 master weights) the joint path gives the two linears' bf16 outputs and their
    fp32 gradients (each product rounded to bf16, summed in fp32); a frozen or LoRA-adapted weight and no-grad
    calls keep the plain path."""
    from cascade_lab.models.common import MultiheadAttention

    torch.manual_seed(1)
    attn = MultiheadAttention(32, 4)
    for p in attn.parameters():  # (cascade_lab's Linear skips initialisation)
        torch.nn.init.normal_(p, std=0.2)
    x, cond = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    results = []
    for joint in (True, False):
        if not joint:
            attn._joint = lambda *a: None  # type: ignore[method-assign]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, cond)
        grads = torch.autograd.grad(out.float().square().sum(), [attn.in_proj_weight, attn.in_proj_bias])
        results.append((out, grads))
        attn.__dict__.pop("_joint", None)
    (out_j, grads_j), (out_p, grads_p) = results
    assert out_j.dtype == torch.bfloat16 and all(gr.dtype == torch.float32 for gr in grads_j)
    torch.testing.assert_close(out_j, out_p, rtol=0, atol=0)
    for a, b in zip(grads_j, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()))
    assert attn._joint(x, cond, 96) is not None
    with torch.no_grad():
        assert attn._joint(x, cond, 96) is None
    attn.in_proj_weight.requires_grad_(False)
    assert attn._joint(x, cond, 96) is None
    attn.in_proj_weight.requires_grad_(True)
    attn.in_proj_adapter = lambda *a: None
    assert attn._joint(x, cond, 96) is None

