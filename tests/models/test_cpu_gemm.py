"""float32 CPU products through oneDNN where it is faster than MKL (`cascade_lab.models.gemm`): the kernel choice,
and the same values and gradients as torch's own linear wherever the models and the LoRA trainer use it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture

from cascade_lab.models import gemm
from cascade_lab.models.common import Linear, MultiheadAttention
from cascade_lab.models.stage_c import StageC

pytestmark = pytest.mark.skipif(not gemm._available(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """oneDNN chosen for every float32 CPU product, however small; yields a list that counts its calls."""
    calls: list[int] = []
    original = gemm._onednn

    def counted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        return original(x, weight, bias)

    monkeypatch.setattr(gemm, "_onednn", counted)
    monkeypatch.setattr(gemm, "MIN_MACS", 0)
    gemm.set_cpu_gemm("onednn")
    yield calls
    gemm.set_cpu_gemm(None)


@pytest.mark.parametrize(("vendor", "machine", "expected"), [
    ("AuthenticAMD", "x86_64", "onednn"), ("HygonGenuine", "x86_64", "onednn"), ("GenuineIntel", "x86_64", "mkl"),
    ("", "x86_64", "mkl"), ("AuthenticAMD", "aarch64", "mkl"),
])
def test_the_kernel_follows_the_cpu_vendor(monkeypatch, vendor, machine, expected):
    monkeypatch.delenv(gemm.ENV, raising=False)
    monkeypatch.setattr(gemm, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(gemm.platform, "machine", lambda: machine)
    try:
        gemm.set_cpu_gemm(None)
        assert gemm.cpu_gemm() == expected
    finally:
        gemm.set_cpu_gemm(None)


def test_the_environment_overrides_the_vendor_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setattr(gemm, "_cpu_vendor", lambda: "AuthenticAMD")
    try:
        for value, expected in (("mkl", "mkl"), ("oneDNN", "onednn"), (" auto ", "onednn")):
            monkeypatch.setenv(gemm.ENV, value)
            gemm.set_cpu_gemm(None)
            assert gemm.cpu_gemm() == expected
        monkeypatch.setenv(gemm.ENV, "openblas")
        gemm.set_cpu_gemm(None)
        with pytest.raises(ValueError, match="CASCADE_LAB_CPU_GEMM='openblas': use mkl, onednn or auto"):
            gemm.cpu_gemm()
        with pytest.raises(ValueError, match="'blis'"):
            gemm.set_cpu_gemm("blis")
    finally:
        gemm.set_cpu_gemm(None)


def test_small_products_bf16_and_autocast_stay_on_torchs_path(monkeypatch):
    gemm.set_cpu_gemm("onednn")
    try:
        calls: list[int] = []
        original = gemm._onednn
        monkeypatch.setattr(gemm, "_onednn", lambda *a: calls.append(1) or original(*a))
        w = torch.randn(64, 32)
        assert gemm.linear(torch.randn(4, 32), w) is None  # 8 k multiply-adds: MKL's fixed cost is lower
        big_x, big_w = torch.randn(256, 256), torch.randn(256, 256)
        assert gemm.linear(big_x.bfloat16(), big_w.bfloat16()) is None  # torch's bf16 matmul is oneDNN already
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert gemm.linear(big_x, big_w) is None  # autocast casts: F.linear's path
        assert gemm.linear(big_x, big_w) is not None and calls == [1]
        gemm.set_cpu_gemm("mkl")
        assert gemm.linear(big_x, big_w) is None and calls == [1]
    finally:
        gemm.set_cpu_gemm(None)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["all", "input", "weight"])
def test_linear_values_and_gradients_are_torchs(onednn, bias, needs):
    """Against float64: outputs and the input, weight and bias gradients, for a non-contiguous 3-D input."""
    torch.manual_seed(0)
    x64 = torch.randn(6, 2, 40, dtype=torch.float64).transpose(0, 1)  # [2, 6, 40], not contiguous
    w64, b64 = torch.randn(24, 40, dtype=torch.float64), torch.randn(24, dtype=torch.float64) if bias else None
    g64 = torch.randn(2, 6, 24, dtype=torch.float64)

    def run(dtype: torch.dtype, fn) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        x, w = x64.to(dtype).requires_grad_(needs != "weight"), w64.to(dtype).requires_grad_(needs != "input")
        b = None if b64 is None else b64.to(dtype).requires_grad_(needs != "input")
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        y = fn(x, w, b)
        return y, list(torch.autograd.grad(y, leaves, g64.to(dtype)))

    y, grads = run(torch.float32, gemm.linear)
    assert len(onednn) == (1 if needs == "weight" else 2)  # y, and x's gradient when it is needed
    y_ref, grads_ref = run(torch.float64, F.linear)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no autograd: the op itself, N-D
        torch.testing.assert_close(gemm.linear(x64.float(), w64.float()).double(), F.linear(x64, w64),
                                   rtol=1e-5, atol=1e-5)


def test_linear_nt_and_mm_nn_are_the_products(onednn):
    x, w, b, g = torch.randn(7, 30), torch.randn(20, 30), torch.randn(20), torch.randn(7, 20)
    torch.testing.assert_close(gemm.linear_nt(x, w, b), torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemm.mm_nn(g, w), g @ w, rtol=1e-5, atol=1e-5)
    assert len(onednn) == 2


def test_models_linears_and_in_proj_take_it_and_keep_their_values(onednn):
    torch.manual_seed(0)
    layer, attn = Linear(32, 48), MultiheadAttention(32, 4)
    for p in [*layer.parameters(), *attn.parameters()]:  # (cascade_lab's Linear skips initialisation)
        torch.nn.init.normal_(p, std=0.2)
    x, cond = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert len(onednn) == 1
        attn(x, cond)  # in_proj of x (all rows), of cond (k/v rows) and out_proj
        assert len(onednn) == 4


def _stage_c_step(model: StageC, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_stage_c_training_step_through_onednn_is_the_mkl_one(onednn):
    """The official tiny Stage C: forward (against the official output) and a full backward with oneDNN's
    products give the loss and every gradient of torch's own path to float32 rounding."""
    cfg, weights, io = load_fixture("stage_c_tiny")
    model = StageC(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    inputs = {k: io[k] for k in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs), io["out_default"], atol=cfg["tolerance"]["atol"],
                                   rtol=cfg["tolerance"]["rtol"])
    used = len(onednn)
    assert used > 0
    loss_o, grads_o = _stage_c_step(model, inputs)
    assert len(onednn) > 2 * used  # the training forward and the input gradients
    gemm.set_cpu_gemm("mkl")
    loss_m, grads_m = _stage_c_step(model, inputs)
    torch.testing.assert_close(loss_o, loss_m, rtol=1e-5, atol=0)
    assert grads_o.keys() == grads_m.keys() and len(grads_m) == len(list(model.parameters()))
    for name, grad in grads_m.items():
        torch.testing.assert_close(grads_o[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()) + 1e-12,
                                   msg=name)


def test_a_lora_on_stage_c_uses_the_fused_layer_and_onednn(onednn, monkeypatch):
    """cascade_lab's Linear (with its own forward) still gets the fused LoRA layer; its products go through
    oneDNN and the LoRA gradients equal those of the MKL path."""
    from cascade_lab.training import lora_train

    cfg, weights, io = load_fixture("stage_c_tiny")
    model = StageC(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    model.requires_grad_(False)
    lora = lora_train.LoraNetwork.for_model(model, rank=2, alpha=1.0, target="all_linear")
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.1)
    fused: list[int] = []
    original = lora_train._FrozenLinearLora.apply
    monkeypatch.setattr(lora_train._FrozenLinearLora, "apply", lambda *a: fused.append(1) or original(*a))
    inputs = {k: io[k] for k in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")}
    results = []
    for kernel in ("onednn", "mkl"):
        gemm.set_cpu_gemm(kernel)
        lora.attach(model)
        try:
            lora.zero_grad(set_to_none=True)
            loss = model(**inputs).square().mean()
            loss.backward()
        finally:
            lora.detach()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in lora.named_parameters()}))
        if kernel == "onednn":
            assert fused and onednn
    (loss_o, grads_o), (loss_m, grads_m) = results
    torch.testing.assert_close(loss_o, loss_m, rtol=1e-5, atol=0)
    for name, grad in grads_m.items():
        torch.testing.assert_close(grads_o[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()) + 1e-12,
                                   msg=name)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_new_lora_is_still_the_identity_with_onednn(onednn, frozen):
    """A LoRA whose ups are zero leaves the tiny Stage C's output bit for bit (as with MKL, tests/training/
    test_lora_training.py), through the fused layer (frozen base) or the hook path (trained base): both compute
    the frozen product as the plain Linear does."""
    from cascade_lab.models.stage_c import StageCConfig
    from cascade_lab.training.lora_train import LoraNetwork

    torch.manual_seed(3)
    model = StageCConfig.tiny().build()
    with torch.no_grad():
        model.clf[1].weight.normal_(0, 0.05)  # the official zero init would hide every difference upstream
    model.requires_grad_(not frozen)
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(2, 16, 4, 4, generator=g), "r": torch.rand(2, generator=g),
              "clip_text": torch.randn(2, 77, 24, generator=g), "clip_text_pooled": torch.randn(2, 1, 24, generator=g),
              "clip_img": torch.zeros(2, 1, 12)}
    network = LoraNetwork.for_model(model, rank=2, alpha=1.0, target="all_linear")
    with torch.no_grad():
        plain = model(**inputs)
        network.attach(model)
        try:
            assert torch.equal(model(**inputs), plain)
        finally:
            network.detach()
    assert onednn


def test_matvec_gives_the_same_bits_wherever_the_weight_lies():
    """A weight mapped from a safetensors file sits at an 8-byte offset; MKL's gemv sums in an order that depends
    on that, so `_grn_into_linear`'s bias differed between a lean-loaded and a copied Stage B (AMD EPYC)."""
    torch.manual_seed(0)
    w, v, b = torch.randn(64, 256), torch.randn(256), torch.randn(64)
    expected = gemm.matvec(w, v, b)
    torch.testing.assert_close(expected, torch.addmv(b, w, v), rtol=1e-5, atol=1e-5)
    for offset in range(1, 16):
        buffer = torch.empty(w.numel() + offset)
        moved = buffer[offset:].view_as(w)
        moved.copy_(w)
        assert torch.equal(gemm.matvec(moved, v, b), expected), offset
