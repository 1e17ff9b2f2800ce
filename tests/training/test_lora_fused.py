"""The fused frozen-layer + LoRA function gives the plain autograd result: outputs and every gradient."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from training_helpers import LORA_C, LORA_OUT, TinyLoraModel

from cascade_lab.training import lora_train
from cascade_lab.training.lora_train import LoraNetwork, lora_targets

Tensor = torch.Tensor
C, OUT = LORA_C, LORA_OUT  # widths; rank 4


@pytest.fixture(autouse=True, params=["bias in the branch", "bias by addmm"])
def fold_bias(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways the function adds the bias (in the branch's matmul from some rows on, else by addmm)."""
    monkeypatch.setattr(lora_train, "_FOLD_BIAS_ROWS", 1 if request.param == "bias in the branch" else 10**9)


def attached(target_filter: Callable[[str], bool] = lambda name: True, dtype: torch.dtype = torch.float32,
             scale_alpha: float = 3.0) -> tuple[TinyLoraModel, LoraNetwork]:
    torch.manual_seed(0)
    model = TinyLoraModel()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.to(dtype).requires_grad_(False)
    targets = [t for t in lora_targets(model, "all_linear") if target_filter(t.name)]
    network = LoraNetwork(targets, rank=4, alpha=scale_alpha, seed=1)
    with torch.no_grad():
        for pair in network.pairs.values():
            pair.lora_up.normal_()  # a trained-looking pair (zero at the start would hide the up gradient)
    network.attach(model)
    return model, network


def reference(x: Tensor, weight: Tensor, bias: Tensor, blocks: list[tuple[int, Tensor, Tensor]],
              scale: float) -> Tensor:
    """x W^T + b + scale · (x D^T) U^T on each pair's output columns, in plain autograd ops."""
    y = F.linear(x, weight, bias)
    extra = [torch.zeros_like(y)]
    for start, down, up in blocks:
        branch = scale * F.linear(F.linear(x, down), up)
        pad = (start, y.shape[-1] - start - up.shape[0])
        extra.append(F.pad(branch, pad))
    return y + sum(extra)


def check(got: Tensor, want: Tensor, tol: float = 1e-6) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    diff, size = (got.double() - want.double()).abs().max(), want.double().abs().max()
    err = diff / size if size > 0 else diff  # an all-zero gradient (zero inputs) must come out zero
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def run_both(model: TinyLoraModel, network: LoraNetwork, call: Callable[[Tensor], Tensor],
             ref: Callable[[Tensor, dict[str, tuple[Tensor, Tensor]]], Tensor], x: Tensor,
             tol: float = 1e-6, autocast: bool = False) -> None:
    """Forward and backward through the attached model and through `ref` on copies of the pairs."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    copies = {n: (network.pair(n).lora_down.detach().clone().requires_grad_(True),
                  network.pair(n).lora_up.detach().clone().requires_grad_(True)) for n in network.targets}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, want = call(x1), ref(x2, copies)
    g = torch.randn_like(want, dtype=torch.float32).to(want.dtype)
    got.backward(g)
    want.backward(g)
    check(got, want, tol)
    assert x1.grad is not None and x2.grad is not None
    check(x1.grad, x2.grad, tol)
    for n, (down, up) in copies.items():
        pair = network.pair(n)
        assert pair.lora_down.grad is not None and pair.lora_up.grad is not None and down.grad is not None
        check(pair.lora_down.grad, down.grad, tol)
        check(pair.lora_up.grad, up.grad, tol)  # type: ignore[arg-type]


def count_fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[n]: how many times `_FrozenLinearLora` has run a forward since (it keeps running as before)."""
    calls = [0]
    real = lora_train._FrozenLinearLora.apply

    def counted(*args: object) -> Tensor:
        calls[0] += 1
        return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(lora_train._FrozenLinearLora, "apply", counted)
    return calls


def linear_ref(model: TinyLoraModel, scale: float) -> Callable[[Tensor, dict[str, tuple[Tensor, Tensor]]], Tensor]:
    def ref(x: Tensor, copies: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        down, up = copies["lora_unet_proj"]
        return reference(x, model.proj.weight, model.proj.bias, [(0, down, up)], scale)
    return ref


@pytest.mark.parametrize("use_checkpoint", [None, False, True])  # no checkpoint, non-reentrant, reentrant
def test_linear_matches_autograd_2d_4d_and_strided(use_checkpoint: bool | None) -> None:
    model, network = attached(lambda n: n == "lora_unet_proj")
    assert "forward" in model.proj.__dict__ and not model.proj._forward_hooks  # routed through the function

    def call(x: Tensor) -> Tensor:
        if use_checkpoint is None:
            return model.proj(x)  # type: ignore[no-any-return]
        return checkpoint(model.proj, x, use_reentrant=use_checkpoint)  # type: ignore[no-any-return]

    ref = linear_ref(model, network.scale)
    run_both(model, network, call, ref, torch.randn(6, C))
    for pair in network.pairs.values():
        pair.zero_grad()
    run_both(model, network, call, ref, torch.randn(2, 3, 5, C))
    for pair in network.pairs.values():
        pair.zero_grad()
    # a non-contiguous input (NCHW permuted to NHWC) and a non-contiguous gradient (the output transposed)
    run_both(model, network, lambda x: call(x.permute(0, 2, 3, 1)).transpose(1, 2),
             lambda x, c: ref(x.permute(0, 2, 3, 1), c).transpose(1, 2), torch.randn(2, C, 3, 5))


def test_conv_1x1_matches_autograd() -> None:
    model, network = attached(lambda n: n == "lora_unet_conv")

    def ref(x: Tensor, copies: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        down, up = copies["lora_unet_conv"]
        y = reference(x.permute(0, 2, 3, 1), model.conv.weight.flatten(1), model.conv.bias, [(0, down, up)],
                      network.scale)
        return y.permute(0, 3, 1, 2)

    run_both(model, network, model.conv, ref, torch.randn(2, C, 3, 5))


@pytest.mark.parametrize("letters", ["qkv", "qv"])  # "qv": the k rows have no pair
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_in_proj_matches_autograd(letters: str, use_checkpoint: bool) -> None:
    model, network = attached(lambda n: n.startswith("lora_unet_attn_to_") and n[-1] in letters)
    attn, scale = model.attn, network.scale

    def both(t: Tensor) -> Tensor:  # self-attention rows q, k, v of x and the conditioning's k, v
        return torch.cat([attn.in_proj(t, 0, 3 * C).flatten(), attn.in_proj(t[:, :2], C, 3 * C).flatten()])

    def call(x: Tensor) -> Tensor:
        return checkpoint(both, x, use_reentrant=use_checkpoint) if use_checkpoint else both(x)  # type: ignore

    def ref(x: Tensor, copies: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        def rows(t: Tensor, start: int, stop: int) -> Tensor:
            blocks = [(i * C - start, *copies[f"lora_unet_attn_to_{q}"]) for i, q in enumerate("qkv")
                      if q in letters and start <= i * C < stop]
            return reference(t, attn.in_proj_weight[start:stop], attn.in_proj_bias[start:stop], blocks, scale)
        return torch.cat([rows(x, 0, 3 * C).flatten(), rows(x[:, :2], C, 3 * C).flatten()])

    run_both(model, network, call, ref, torch.randn(2, 7, C))


def test_bf16_autocast_matches_the_autocast_reference_and_its_dtypes() -> None:
    # a bf16 run: frozen base in bf16, fp32 pairs, autocast
    model, network = attached(lambda n: n == "lora_unet_proj" or "_to_" in n, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    scale = network.scale
    x = torch.randn(2, 3, 5, C)

    def ref(x: Tensor, copies: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        down, up = copies["lora_unet_proj"]
        y = F.linear(x, model.proj.weight, model.proj.bias) + scale * F.linear(F.linear(x, down), up)
        blocks = [(i * C, *copies[f"lora_unet_attn_to_{q}"]) for i, q in enumerate("qkv")]
        qkv = reference(x.flatten(1, 2), model.attn.in_proj_weight, model.attn.in_proj_bias, blocks, scale)
        return torch.cat([y.flatten(), qkv.flatten()])

    def call(x: Tensor) -> Tensor:
        return torch.cat([model.proj(x).flatten(), model.attn.in_proj(x.flatten(1, 2), 0, 3 * C).flatten()])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert call(x).dtype == ref(x, {n: (p.lora_down, p.lora_up) for n, p in network.pairs.items()}).dtype \
            == torch.bfloat16
    run_both(model, network, call, ref, x, tol=2e-2, autocast=True)  # also checks the gradients' dtypes (fp32)
    for p in network.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


@pytest.mark.parametrize("rows", [3, 40])  # thin products in fp32 (few rows) / in bf16
def test_bf16_autocast_against_float64(rows: int) -> None:
    """Few rows: the pairs' gradients as precise as fp32 math; more rows: within bf16's rounding. The outputs
    and x's gradient (bf16) within bf16's rounding either way."""
    model, network = attached(lambda n: n == "lora_unet_proj" or "_to_" in n, dtype=torch.bfloat16)
    x = torch.randn(rows, C).to(torch.bfloat16).requires_grad_(True)

    def both(t: Tensor, proj: Callable[[Tensor], Tensor], in_proj: Callable[[Tensor], Tensor]) -> Tensor:
        return torch.cat([proj(t).flatten(), in_proj(t).flatten()])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = both(x, model.proj, lambda t: model.attn.in_proj(t, 0, 3 * C))
    g = torch.randn_like(got, dtype=torch.float32).to(torch.bfloat16)
    got.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    copies = {n: (p.lora_down.detach().double().requires_grad_(True), p.lora_up.detach().double().requires_grad_(True))
              for n, p in network.pairs.items()}
    blocks = [(i * C, *copies[f"lora_unet_attn_to_{q}"]) for i, q in enumerate("qkv")]
    want = both(x64, lambda t: reference(t, model.proj.weight.double(), model.proj.bias.double(),
                                         [(0, *copies["lora_unet_proj"])], network.scale),
                lambda t: reference(t, model.attn.in_proj_weight.double(), model.attn.in_proj_bias.double(), blocks,
                                    network.scale))
    want.backward(g.double())
    assert x.grad is not None and x64.grad is not None
    check(got.double(), want.detach(), 1e-2)
    check(x.grad.double(), x64.grad, 1e-2)
    tol = 1e-5 if rows <= lora_train._FP32_THIN_ROWS else 2e-2
    for n, (down, up) in copies.items():
        pair = network.pair(n)
        assert pair.lora_down.grad is not None and pair.lora_up.grad is not None and pair.lora_up.grad.dtype == \
            torch.float32
        check(pair.lora_down.grad.double(), down.grad, tol)  # type: ignore[arg-type]
        check(pair.lora_up.grad.double(), up.grad, tol)  # type: ignore[arg-type]


def test_trained_base_weight_gets_its_gradient() -> None:
    model, network = attached(lambda n: n in ("lora_unet_proj", "lora_unet_attn_to_k"))
    model.proj.weight.requires_grad_(True)
    model.attn.in_proj_weight.requires_grad_(True)
    x = torch.randn(3, 4, C)
    y = model.proj(x).sum() + model.attn.in_proj(x, 0, 3 * C).square().sum()
    y.backward()
    w1, w2 = model.proj.weight.detach().clone().requires_grad_(True), \
        model.attn.in_proj_weight.detach().clone().requires_grad_(True)
    p1, p2 = network.pair("lora_unet_proj"), network.pair("lora_unet_attn_to_k")
    s = network.scale
    want = reference(x, w1, model.proj.bias, [(0, p1.lora_down, p1.lora_up)], s).sum() \
        + reference(x, w2, model.attn.in_proj_bias, [(C, p2.lora_down, p2.lora_up)], s).square().sum()
    want.backward()
    assert model.proj.weight.grad is not None and model.attn.in_proj_weight.grad is not None
    check(model.proj.weight.grad, w1.grad)  # type: ignore[arg-type]
    check(model.attn.in_proj_weight.grad, w2.grad)  # type: ignore[arg-type]


def test_detach_restores_the_forward() -> None:
    torch.manual_seed(0)
    model, network = attached()
    x = torch.randn(2, 5, C)
    with_lora = model.proj(x), model.attn.in_proj(x, 0, 3 * C)
    network.detach()
    assert "forward" not in model.proj.__dict__ and model.attn.in_proj_adapter is None
    assert not model.proj._forward_hooks and not model.conv._forward_hooks
    plain = model.proj(x), model.attn.in_proj(x, 0, 3 * C)
    assert torch.equal(plain[0], F.linear(x, model.proj.weight, model.proj.bias))
    assert torch.equal(plain[1], F.linear(x, model.attn.in_proj_weight, model.attn.in_proj_bias))
    assert not torch.allclose(with_lora[0], plain[0]) and not torch.allclose(with_lora[1], plain[1])
    assert set(model.state_dict()) == set(TinyLoraModel().state_dict())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_whole_stage_c_gradients_match_the_hook_path(checkpointing: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny Stage C with an all_linear LoRA: every pair's gradient as with the function switched off."""
    from training_helpers import stage_c_inputs

    from cascade_lab.models.stage_c import StageCConfig

    torch.manual_seed(3)
    model = StageCConfig.tiny().build().requires_grad_(False).train()
    with torch.no_grad():
        model.clf[1].weight.normal_(0, 0.05)
    model.enable_gradient_checkpointing(checkpointing)
    network = LoraNetwork.for_model(model, rank=4, alpha=1, target="all_linear").attach(model)
    with torch.no_grad():
        for pair in network.pairs.values():
            pair.lora_up.normal_(0, 0.1)
    inputs = stage_c_inputs()

    def grads() -> tuple[Tensor, dict[str, Tensor]]:
        network.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}

    calls = count_fused_calls(monkeypatch)
    fused_out, fused = grads()
    assert calls[0] > len(network.targets) // 2  # the Linears and the in_proj went through the function
    monkeypatch.setattr(lora_train, "_lora_linear", lambda *a: None)  # every layer on the hook / autograd path
    plain_out, plain = grads()
    check(fused_out, plain_out)
    assert set(fused) == set(plain) and len(fused) >= len(network.pairs)  # clip_img's pair: zero inputs, still a grad
    for name, g in plain.items():
        check(fused[name], g, 2e-6)


@pytest.mark.parametrize("which", ["all", "some"])  # "some": mapper_sca has no pair (frozen W only)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timestep_block_mappers_in_one_call_match_autograd(which: str, dtype: torch.dtype,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A TimestepBlock's three mappers (on t's three chunks) as one fused call: the block's output and every
    gradient as the per-mapper autograd reference; detach takes the adapter off."""
    from cascade_lab.models.common import TimestepBlock

    torch.manual_seed(0)
    block = TimestepBlock(C, 8, conds=("sca", "crp"))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    block.to(dtype).requires_grad_(False)
    targets = [t for t in lora_targets(block, "all_linear") if which == "all" or not t.name.endswith("mapper_sca")]
    network = LoraNetwork(targets, rank=4, alpha=3.0, seed=1)
    with torch.no_grad():
        for pair in network.pairs.values():
            pair.lora_up.normal_()
    network.attach(block)
    assert block.mapper_adapter is not None
    calls = count_fused_calls(monkeypatch)
    x = torch.randn(2, C, 3, 5).to(dtype)
    scale = network.scale

    def call(t: Tensor) -> Tensor:
        return block(x, t)  # type: ignore[no-any-return]

    def ref(t: Tensor, copies: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        out = None
        for i, name in enumerate(["mapper", "mapper_sca", "mapper_crp"]):
            layer = getattr(block, name)
            pairs = [(0, *copies[n]) for n in copies if n == f"lora_unet_{name}"]
            part = reference(t[:, 8 * i:8 * (i + 1)], layer.weight, layer.bias, pairs, scale)
            out = part if out is None else out + part
        assert out is not None
        a, b = out[:, :, None, None].chunk(2, dim=1)
        return torch.addcmul(b, x, 1 + a)

    autocast = dtype == torch.bfloat16
    run_both(block, network, call, ref, torch.randn(2, 24), tol=2e-2 if autocast else 1e-6,  # type: ignore[arg-type]
             autocast=autocast)
    assert calls[0] == 1  # forward: one call for the three mappers
    network.detach()
    assert block.mapper_adapter is None and not any("forward" in m.__dict__ for m in block.mappers())
