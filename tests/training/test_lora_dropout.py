"""kohya's LoRA options in training: neuron / rank / module dropout and the max-norm of --scale_weight_norms."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from training_helpers import LORA_C, LORA_OUT, TinyLoraModel, stage_c_inputs, tiny_run, torchrun_cli

from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.training import train
from cascade_lab.training.lora_train import LoraDropout, LoraNetwork, lora_targets

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")

Tensor = torch.Tensor
C, OUT, RANK = LORA_C, LORA_OUT, 4


def attached(dropout: LoraDropout | None, alpha: float = 2.0) -> tuple[TinyLoraModel, LoraNetwork]:
    torch.manual_seed(0)
    model = TinyLoraModel()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.requires_grad_(False)
    network = LoraNetwork(lora_targets(model, "all_linear"), rank=RANK, alpha=alpha, seed=1, dropout=dropout)
    with torch.no_grad():
        for pair in network.pairs.values():
            pair.lora_up.normal_()
    network.attach(model).train()
    return model, network


def kohya_branch(x: Tensor, down: Tensor, up: Tensor, scale: float, drop: LoraDropout, conv: bool = False) -> Tensor:
    """kohya's LoRAModule.forward minus the frozen layer, written out: its draws in its order from the global RNG
    (module dropout, neuron dropout of down's output, the rank mask). Its rank mask [B, r] goes over the rank for
    every layer here (kohya's unsqueeze for 4-D inputs fits only convs)."""
    if drop.module and torch.rand(1) < drop.module:
        return torch.zeros(())
    h = F.conv2d(x, down[:, :, None, None]) if conv else x @ down.t()
    if drop.neuron:
        h = F.dropout(h, p=drop.neuron)
    if drop.rank:
        mask = torch.rand(x.shape[0], down.shape[0]) > drop.rank
        h = h * (mask[:, :, None, None] if conv else mask.view(x.shape[0], *[1] * (h.dim() - 2), -1))
        scale = scale / (1 - drop.rank)
    return F.conv2d(h, up[:, :, None, None]) * scale if conv else (h @ up.t()) * scale


def test_zero_dropout_is_the_plain_network_bit_for_bit(monkeypatch) -> None:
    """p = 0 everywhere: the fused paths, no random draw, the same bits and gradients as no dropout at all."""
    from cascade_lab.training import lora_train

    def dropout_path(*args: object, **kwargs: object) -> None:
        raise AssertionError("p = 0 took the dropout path")

    monkeypatch.setattr(lora_train, "dropped_low_rank", dropout_path)  # zero dropout must stay on the fused paths
    model = StageCConfig.tiny().build().requires_grad_(False).train()
    results = []
    for dropout in (None, LoraDropout(0.0, 0.0, 0.0)):
        torch.manual_seed(3)
        network = LoraNetwork.for_model(model, rank=4, target="all_linear", dropout=dropout).attach(model)
        with torch.no_grad():
            for pair in network.pairs.values():
                pair.lora_up.normal_(0, 0.1)
        rng = torch.get_rng_state()
        out = model(**stage_c_inputs())
        out.square().mean().backward()
        assert torch.equal(torch.get_rng_state(), rng)
        results.append((out.detach(), [p.grad for p in network.parameters()]))
        network.detach()
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


@pytest.mark.parametrize("drop", [LoraDropout(neuron=0.3), LoraDropout(rank=0.4), LoraDropout(module=0.5),
                                  LoraDropout(0.2, 0.3, 0.25)], ids=["neuron", "rank", "module", "all"])
@pytest.mark.parametrize("layer", ["linear_3d", "linear_nhwc", "conv"])
def test_branch_matches_kohyas_formula_with_the_same_draws(drop: LoraDropout, layer: str) -> None:
    model, network = attached(drop)
    name = {"conv": "lora_unet_conv"}.get(layer, "lora_unet_proj")
    module, pair = getattr(model, name.removeprefix("lora_unet_")), network.pair(name)
    shape = {"linear_3d": (3, 5, C), "linear_nhwc": (3, 6, 6, C), "conv": (3, C, 6, 6)}[layer]
    for trial in range(6):
        x = torch.randn(*shape)
        torch.manual_seed(100 + trial)
        got = module(x)
        if got.requires_grad:  # else module dropout skipped the branch
            got.square().sum().backward()
        grads = pair.lora_down.grad, pair.lora_up.grad
        pair.zero_grad(set_to_none=True)
        down, up = pair.lora_down.detach().requires_grad_(), pair.lora_up.detach().requires_grad_()
        torch.manual_seed(100 + trial)
        frozen = (F.conv2d(x, module.weight, module.bias) if layer == "conv" else F.linear(x, module.weight,
                                                                                           module.bias))
        want = frozen + kohya_branch(x, down, up, network.scale, drop, conv=layer == "conv")
        if want.requires_grad:
            want.square().sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads, (down.grad, up.grad), strict=True):
            if ref is None:  # the branch was skipped: no gradient at all, as in kohya
                assert g is None
            else:
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4)


def test_expected_value_is_kohyas() -> None:
    """Neuron and rank dropout are inverted dropouts (the mean branch is the trained one); kohya's module dropout
    does not rescale, so its mean is (1 - p) times it."""
    x = torch.randn(4, 7, C)
    model, network = attached(None)
    with torch.no_grad():
        full = model.proj(x) - F.linear(x, model.proj.weight, model.proj.bias)
    torch.manual_seed(0)
    for drop, factor in ((LoraDropout(neuron=0.3), 1.0), (LoraDropout(rank=0.5), 1.0),
                         (LoraDropout(module=0.25), 0.75)):
        network.dropout = drop
        with torch.enable_grad():
            mean = sum(model.proj(x).detach() for _ in range(4000)) / 4000
        branch = mean - F.linear(x, model.proj.weight, model.proj.bias)
        err = (branch - factor * full).norm() / full.norm()
        assert err < 0.04, (drop, float(err))
        assert (branch - full).norm() / full.norm() > 0.1 if factor != 1 else True


def test_no_dropout_outside_training() -> None:
    """Validation (eval mode) and sampling (no gradients) see the whole LoRA, drawing nothing."""
    x = torch.randn(2, 5, C)
    plain_model, _ = attached(None)
    want = plain_model.proj(x)
    model, network = attached(LoraDropout(0.5, 0.5, 0.5))
    rng = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(model.proj(x), want)
    network.eval()
    assert torch.equal(model.proj(x), want)
    assert torch.equal(torch.get_rng_state(), rng)


def test_attention_keys_and_values_drop_once_for_x_and_the_conditioning() -> None:
    """kohya's to_k / to_v see x's tokens and the conditioning's as one input, so module dropout skips a pair for
    both or neither; here the two projections are two calls that share the pair's draws."""
    model, network = attached(LoraDropout(module=0.5))
    attn, c = model.attn, C
    x, cond = torch.randn(2, 5, C), torch.randn(2, 3, C)
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    seen = set()
    for _ in range(40):
        kv_c = attn.in_proj(cond, c, 3 * c) - F.linear(cond, weight[c:], bias[c:])  # the branches only
        kv_x = attn.in_proj(x, 0, 3 * c)[..., c:] - F.linear(x, weight[c:], bias[c:])
        for block in (slice(0, c), slice(c, 2 * c)):  # k, v
            on = bool(kv_c[..., block].abs().max() > 1e-6), bool(kv_x[..., block].abs().max() > 1e-6)
            assert on[0] == on[1]
            seen.add(on[0])
    assert seen == {True, False}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_whole_stage_c_with_dropout_recomputes_the_same_masks(checkpointing: bool) -> None:
    """Gradient checkpointing recomputes each block with the RNG state it had: the same masks, the same gradients
    as without it (for every layer type: attention, mappers, channelwise Linears, 1x1 convs)."""
    torch.manual_seed(3)
    model = StageCConfig.tiny().build().requires_grad_(False).train()
    network = LoraNetwork.for_model(model, rank=4, target="all_linear",
                                    dropout=LoraDropout(0.2, 0.3, 0.2)).attach(model)
    with torch.no_grad():
        for pair in network.pairs.values():
            pair.lora_up.normal_(0, 0.1)
    results = []
    for on in (False, checkpointing):
        model.enable_gradient_checkpointing(on)
        network.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = model(**stage_c_inputs())
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in network.named_parameters()}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and any(g is None for g in ga.values())  # module dropout skipped some pairs
    for name, g in ga.items():
        assert (g is None) == (gb[name] is None), name
        if g is not None:
            torch.testing.assert_close(g, gb[name], rtol=1e-5, atol=1e-7)


def kohya_max_norm(state: dict[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], int, float, float]:
    """kohya's apply_max_norm_regularization written out on a kohya state dict (float32, 1x1 convs 4-D)."""
    state = {k: v.clone() for k, v in state.items()}
    norms, scaled = [], 0
    for key in [k for k in state if k.endswith("lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        down, up, alpha = state[key], state[f"{stem}.lora_up.weight"], state[f"{stem}.alpha"]
        if down.dim() == 4:
            updown = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            updown = up @ down
        updown = updown * (alpha / down.shape[0])
        norm = updown.norm().clamp(min=max_norm / 2)
        ratio = torch.clamp(norm, max=max_norm) / norm
        if ratio != 1:
            scaled += 1
            state[f"{stem}.lora_up.weight"] *= ratio**0.5
            state[key] *= ratio**0.5
        norms.append((updown.norm() * ratio).item())
    return state, scaled, sum(norms) / len(norms), max(norms)


def test_max_norm_is_kohyas_formula() -> None:
    model, network = attached(None, alpha=3.0)
    with torch.no_grad():  # norms from far below to far above the limit
        for i, pair in enumerate(network.pairs.values()):
            pair.lora_up.mul_(0.05 * 4**i)
    before = network.kohya_state_dict()
    assert any(v.dim() == 4 for v in before.values())  # the 1x1 conv, stored as kohya stores it
    want, scaled, mean, top = kohya_max_norm(before, 2.0)
    got = network.apply_max_norm(2.0)
    assert got[0] == scaled and 0 < scaled < len(network.pairs)
    assert got[1] == pytest.approx(mean, rel=1e-5) and got[2] == pytest.approx(top, rel=1e-5) and top <= 2.0 + 1e-5
    after = network.kohya_state_dict()
    for key, value in want.items():
        torch.testing.assert_close(after[key], value, rtol=2e-6, atol=0)
    unscaled = [k for k in want if k.endswith("weight") and torch.equal(want[k], before[k])]
    assert unscaled and all(torch.equal(after[k], before[k]) for k in unscaled)  # untouched bit for bit


def test_a_run_with_max_norm_logs_kohyas_figures(shapes_dir, shared_cache, tmp_path) -> None:
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="lora", network_target="all_linear",
                           learning_rate=3e-2, max_train_steps=4, scale_weight_norms=0.05, network_dim=2,
                           network_alpha=2))
    logs = run.losses
    assert all({"keys_scaled", "average_key_norm", "max_key_norm"} <= log.keys() for log in logs)
    assert any(log["keys_scaled"] > 0 for log in logs) and all(log["max_key_norm"] <= 0.05 + 1e-6 for log in logs)
    assert json.loads((tmp_path / "run.json").read_text())["losses"][-1]["keys_scaled"] == logs[-1]["keys_scaled"]
    with safe_open(str(run.output_file), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_scale_weight_norms"] == "0.05" and meta["ss_network_dropout"] == "None"
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        delta = tensors[f"{stem}.lora_up.weight"].flatten(1) @ tensors[key].flatten(1)
        assert float(delta.norm()) * float(tensors[f"{stem}.alpha"]) / 2 <= 0.05 * (1 + 1e-5)


def test_a_lora_run_with_dropout_resumes_bit_identically(shapes_dir, shared_cache, tmp_path) -> None:
    """The masks come from the run's seeded global RNG, which every checkpoint stores: a stopped and resumed run
    draws what the whole run drew."""
    settings = dict(mode="lora", network_target="all_linear", max_train_steps=6, network_dropout=0.2,
                    rank_dropout=0.25, module_dropout=0.2, gradient_accumulation_steps=2, train_batch_size=4,
                    seed=4)
    whole = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "whole", **settings))

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            event.run.stop()

    train(**tiny_run(shapes_dir, shared_cache, tmp_path / "split", **settings), callback=stop_at_3)
    second = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "split", resume="auto", **settings))
    assert [r["loss"] for r in second.losses] == [r["loss"] for r in whole.losses]
    without = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "none", **settings | dict(
        network_dropout=None, rank_dropout=None, module_dropout=None)))
    assert [r["loss"] for r in without.losses][1:] != [r["loss"] for r in whole.losses][1:]
    with safe_open(str(whole.output_file), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dropout"] == "0.2"
    assert json.loads(meta["ss_network_args"]) == {"target": "all_linear", "rank_dropout": "0.25",
                                                   "module_dropout": "0.2"}
    with pytest.raises(ValueError, match="rank_dropout"):
        train(**tiny_run(shapes_dir, shared_cache, tmp_path / "split", resume="auto", **settings | dict(
            rank_dropout=0.5, max_train_steps=8)))


def test_kohyas_flags_set_the_options(tmp_path, capsys) -> None:
    from types import SimpleNamespace

    from cascade_lab.training.cli_entry import print_progress
    from cascade_lab.training.config import ConfigError, TrainConfig
    from cascade_lab.training.kohya_args import parse_kohya

    base = ["stable_cascade_train_c_network.py", "--network_module", "networks.lora", "--model", "tiny",
            "--output_dir", str(tmp_path), "--train_data_dir", str(tmp_path), "--seed", "0"]
    weights = tmp_path / "start.safetensors"
    weights.write_bytes(b"")
    fields, notices, _ = parse_kohya([*base, "--network_dropout", "0.1", "--network_args", "target=attention",
                                      "rank_dropout=0.2", "module_dropout=0.3", "--scale_weight_norms", "1",
                                      "--network_weights", str(weights), "--dim_from_weights"], environ={})
    assert (fields["network_dropout"], fields["rank_dropout"], fields["module_dropout"]) == (0.1, 0.2, 0.3)
    assert fields["scale_weight_norms"] == 1.0 and fields["network_target"] == "attention"
    assert fields["network_weights"] == str(weights) and fields["dim_from_weights"] is True
    text = "\n".join(notices)
    assert "--dim_from_weights with --network_dropout 0.1, rank_dropout=0.2, module_dropout=0.3: kohya builds the " \
           "network from the file without its dropouts" in text
    assert not any(f in text.replace("--dim_from_weights with", "") for f in ("scale_weight_norms", "network_weights",
                                                                            "dim_from_weights"))
    TrainConfig.from_dict(fields).validate()
    _, notices, _ = parse_kohya([*base, "--network_dropout", "0.1", "--network_weights", str(weights)], environ={})
    assert not any("dropout" in n or "network_weights" in n for n in notices)
    with pytest.raises(ConfigError, match="--network_args rank_dropout=lots: rank_dropout takes a probability"):
        parse_kohya([*base, "--network_args", "rank_dropout=lots"], environ={})
    fields, _, _ = parse_kohya([*base, "--network_dropout", "1"], environ={})
    with pytest.raises(ConfigError, match=r"network_dropout=1.0: use a probability in \[0, 1\)"):
        TrainConfig.from_dict(fields).validate()
    fields, _, _ = parse_kohya([base[0].replace("c_network", "stage_c"), *base[3:], "--scale_weight_norms", "1"],
                               environ={})
    with pytest.raises(ConfigError, match="scale_weight_norms: LoRA options, but mode='full'"):
        TrainConfig.from_dict(fields).validate()
    log = {"loss": 0.5, "raw_loss": 0.4, "lr": 1e-4, "keys_scaled": 3, "average_key_norm": 0.25, "max_key_norm": 1.0}
    print_progress(SimpleNamespace(kind="step", step=10, total_steps=10, data=log,
                                   run=SimpleNamespace(config=TrainConfig(log_every_n_steps=10))))
    assert "keys scaled 3  key norm avg 0.25 max 1" in capsys.readouterr().out


def test_module_dropout_under_ddp(shapes_dir, shared_cache, tmp_path) -> None:
    """Two processes skip different pairs in a step: DDP is told some parameters may get no gradient (without it,
    its reducer stops at the next step waiting for the skipped pairs)."""
    settings = tiny_run(shapes_dir, shared_cache, tmp_path / "two", mode="lora", network_target="all_linear",
                        module_dropout=0.5, max_train_steps=3, train_batch_size=4)
    assert torchrun_cli(settings, tmp_path / "train.toml")[0]["status"] == "finished"


def test_attention_projections_with_dropout_match_kohyas_formula() -> None:
    """The packed in_proj with every dropout, against kohya's forward written out for to_q / to_k / to_v: the
    conditioning's call draws k's and v's module and rank draws, x's call reuses them and draws q's; neuron
    dropout draws anew on each input."""
    drop = LoraDropout(0.3, 0.4, 0.3)
    model, network = attached(drop)
    attn, c = model.attn, C
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    pairs = {letter: network.pair(f"lora_unet_attn_to_{letter}") for letter in "qkv"}
    Draws = tuple[bool, Tensor | None]

    def branch(t: Tensor, letter: str, draws: Draws | None, kept: dict[str, Draws]) -> Tensor:
        keep = draws[0] if draws else not torch.rand(1) < drop.module
        pair = pairs[letter]
        if not keep:
            kept[letter] = (False, None)
            return torch.zeros(*t.shape[:-1], c)
        h = F.dropout(t @ pair.lora_down.t(), p=drop.neuron)
        mask = draws[1] if draws else torch.rand(t.shape[0], RANK) > drop.rank
        kept[letter] = (True, mask)
        return (h * mask[:, None, :]) @ pair.lora_up.t() * (network.scale / (1 - drop.rank))

    for trial in range(8):
        x, cond = torch.randn(2, 5, C), torch.randn(2, 3, C)
        torch.manual_seed(trial)
        got_c, got_x = attn.in_proj(cond, c, 3 * c), attn.in_proj(x, 0, 3 * c)
        torch.manual_seed(trial)
        kept: dict[str, Draws] = {}
        want_c = F.linear(cond, weight[c:], bias[c:]) + torch.cat([branch(cond, "k", None, kept),
                                                                   branch(cond, "v", None, kept)], dim=-1)
        want_x = F.linear(x, weight, bias) + torch.cat([branch(x, "q", None, {}), branch(x, "k", kept["k"], {}),
                                                        branch(x, "v", kept["v"], {})], dim=-1)
        torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)
