"""full_bf16 (kohya --full_bf16): bf16 weights and gradients, updates rounded stochastically (or to the nearest)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_run

from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.training import ConfigError, TrainConfig, train
from cascade_lab.training.bf16_weights import Rounding, stochastic_round
from cascade_lab.training.kohya_args import parse_kohya
from cascade_lab.training.optim import build_optimizer

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")

ADAFACTOR = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]


def test_stochastic_rounding_is_unbiased() -> None:
    """Values spread over one bf16 step round to its two ends with the mean kept; nearest moves the mean."""
    values = 1 + torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2**-7  # bf16 step at 1: 2^-7
    values = torch.cat([values, -values])
    rounded = stochastic_round(values, torch.Generator().manual_seed(1)).float()
    ends = {1.0, 1 + 2**-7, -1.0, -1 - 2**-7}
    assert set(rounded.unique().tolist()) <= ends
    half = len(values) // 2
    for part in (slice(0, half), slice(half, None)):
        exact, got = values[part].double().mean(), rounded[part].double().mean()
        assert abs(got - exact) < 2e-3 * 2**-7, (got, exact)  # within 0.2 % of a step (std ~0.1 %)
    constant = torch.full((100_000,), 1 + 2**-9)  # a quarter step above 1: up with p = 1/4
    mean = float(stochastic_round(constant, torch.Generator().manual_seed(2)).float().mean())
    assert abs(mean - (1 + 2**-9)) < 5e-5  # the std of this mean: 1.1e-5
    assert torch.equal(constant.to(torch.bfloat16).float(), torch.ones(100_000))  # nearest: always down


def _tiny_updates(optimizer: str, rounding: str | None, steps: int = 64) -> tuple[float, float]:
    """Mean of a matrix and a vector of weights at 1 after `steps` updates of lr = 2^-10 each (a constant gradient:
    Adafactor's and AdamW's normalised update is the learning rate), a quarter of the bf16 step below 1."""
    dtype = torch.float32 if rounding is None else torch.bfloat16
    params = [torch.nn.Parameter(torch.ones(64, 96, dtype=dtype)), torch.nn.Parameter(torch.ones(512, dtype=dtype))]
    args = ADAFACTOR if optimizer == "adafactor" else ["weight_decay=0"]
    rounder = None if rounding is None else Rounding(rounding, seed=3)
    opt = build_optimizer(optimizer, params, 2**-10, args, rounder)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(p.dtype == dtype for p in params)
    return float(params[0].detach().double().mean()), float(params[1].detach().double().mean())


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_tiny_updates_move_bf16_weights_as_fp32_would(optimizer: str) -> None:
    """The usual complaint about full_bf16: updates below half a bf16 step vanish when rounded to the nearest.
    Stochastic rounding moves the mean as fp32 weights move."""
    fp32 = _tiny_updates(optimizer, None)
    assert all(abs(m - (1 - 64 * 2**-10)) < 2e-3 for m in fp32)  # moved by 1/16
    stochastic = _tiny_updates(optimizer, "stochastic")
    assert all(abs(s - f) < 2e-3 for s, f in zip(stochastic, fp32, strict=True)), (stochastic, fp32)
    assert _tiny_updates(optimizer, "nearest") == (1.0, 1.0)  # kohya: not one update landed


def test_bf16_adamw_keeps_fp32_moments_and_nearest_is_kohyas_adamw() -> None:
    for rounding, moments in (("stochastic", torch.float32), ("nearest", torch.bfloat16)):
        p = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.bfloat16))
        opt = build_optimizer("adamw", [p], 1e-3, [], Rounding(rounding))
        p.grad = torch.ones_like(p)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == moments
        assert (type(opt) is torch.optim.AdamW) == (rounding == "nearest")


def test_other_optimizers_under_full_bf16_say_they_round_to_the_nearest() -> None:
    """Lion, SGD, ... update the bf16 weights themselves: stochastic rounding cannot reach them, so the run says so
    (and with bf16_rounding='nearest', which is what they do, it says nothing)."""
    for name in ("Lion", "SGDNesterov", "RAdam"):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        with pytest.warns(UserWarning, match=f"optimizer_type='{name}'.*nearest"):
            build_optimizer(name, [p], 1e-3, [], Rounding("stochastic"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = build_optimizer("Lion", [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))], 1e-3, [],
                              Rounding("nearest"))
    assert type(opt).__name__ == "Lion"


def bf16_run(shapes_dir, cache, out, **changes):
    return tiny_run(shapes_dir, cache, out, mode="full", mixed_precision="bf16", full_bf16=True,
                    optimizer_type="Adafactor", optimizer_args=ADAFACTOR) | changes


def test_full_bf16_stage_c_learns_with_bf16_weights_and_gradients(shapes_dir, shared_cache, tmp_path) -> None:
    model = StageCConfig.tiny().build()
    grad_dtypes: set[torch.dtype] = set()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: grad_dtypes.add(p.grad.dtype))
    weight_dtypes: set[torch.dtype] = set()

    def watch(event):
        if event.kind == "step":
            weight_dtypes.update(p.dtype for p in event.run.stage_c.parameters())

    run = train(**bf16_run(shapes_dir, shared_cache, tmp_path, max_train_steps=150, val_every_n_steps=150),
                stage_c=model, callback=watch)
    assert run.status == "finished" and weight_dtypes == {torch.bfloat16} and grad_dtypes == {torch.bfloat16}
    before, after = run.val_losses[0]["val_loss"], run.val_losses[-1]["val_loss"]
    assert after < 0.6 * before, (before, after)
    assert run.metadata["cascade_lab.full_bf16"] == "True (stochastic rounding)"
    tensors = load_file(str(run.output_file))  # save_precision fp32: the bf16 weights, exactly
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert all(torch.equal(tensors[k], v.float()) for k, v in run.stage_c.state_dict().items())
    assert not (run.last_checkpoint / "trainable.safetensors").exists()  # the exported file is the trainable one


def test_full_bf16_saves_bf16_files_that_resume(shapes_dir, shared_cache, tmp_path) -> None:
    run = train(**bf16_run(shapes_dir, shared_cache, tmp_path, max_train_steps=2, save_precision="bf16"))
    tensors = load_file(str(run.output_file))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not (run.last_checkpoint / "trainable.safetensors").exists()  # bf16 holds bf16 weights exactly
    more = train(**bf16_run(shapes_dir, shared_cache, tmp_path, max_train_steps=3, save_precision="bf16",
                            resume="auto"))
    assert more.status == "finished" and more.step == 3


@pytest.mark.parametrize("optimizer,args,rounding", [
    ("Adafactor", [*ADAFACTOR, "beta1=0.9", "weight_decay=0.01"], "stochastic"),
    ("AdamW", [], "stochastic"),
    ("AdamW", [], "nearest"),
])
def test_full_bf16_resume_is_bit_identical(shapes_dir, shared_cache, tmp_path, optimizer, args, rounding) -> None:
    """The rounding generator and the fp32 moments of bf16 weights come back from the checkpoint as they were."""
    def settings(out, **changes):
        return bf16_run(shapes_dir, shared_cache, out, max_train_steps=8, train_batch_size=4, learning_rate=3e-3,
                        optimizer_type=optimizer, optimizer_args=args, bf16_rounding=rounding,
                        gradient_accumulation_steps=2) | changes

    whole = train(**settings(tmp_path / "whole"))

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            event.run.stop()

    first = train(**settings(tmp_path / "split"), callback=stop_at_3)
    assert first.status == "stopped" and first.step == 3
    second = train(**settings(tmp_path / "split", resume="auto"))
    assert second.status == "finished" and second.step == 8
    expected, got = load_file(str(whole.output_file)), load_file(str(second.output_file))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["loss"] for r in second.losses] == [r["loss"] for r in whole.losses]


def test_full_bf16_lora_trains_a_bf16_network(shapes_dir, shared_cache, tmp_path) -> None:
    """kohya's network script casts the LoRA to bf16 with --full_bf16; so does cascade_lab."""
    dtypes: set[torch.dtype] = set()

    def watch(event):
        if event.kind == "step":
            dtypes.update(p.dtype for p in event.run.network.parameters())

    run = train(**bf16_run(shapes_dir, shared_cache, tmp_path, mode="lora", max_train_steps=30, learning_rate=1e-2,
                           val_every_n_steps=30), callback=watch)
    assert run.status == "finished" and dtypes == {torch.bfloat16}
    assert run.val_losses[-1]["val_loss"] < run.val_losses[0]["val_loss"]
    assert all(t.dtype == torch.float32 for t in load_file(str(run.output_file)).values())  # save_precision fp32


def test_full_bf16_needs_bf16_compute_and_is_refused_with_fsdp(tmp_path) -> None:
    base = {"train_data_dir": str(tmp_path), "full_bf16": True}
    with pytest.raises(ConfigError, match="full_bf16=true with mixed_precision='no'.*set mixed_precision='bf16'"):
        TrainConfig(**base).validate()
    with pytest.raises(ConfigError, match="full_bf16=true with strategy='fsdp'.*strategy='ddp'"):
        TrainConfig(**base, mixed_precision="bf16", mode="full", strategy="fsdp").validate()
    with pytest.raises(ConfigError, match="bf16_rounding='up'"):
        TrainConfig(**base, mixed_precision="bf16", bf16_rounding="up").validate()


def test_kohyas_full_bf16_flag() -> None:
    base = ["stable_cascade_train_stage_c.py", "--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e",
            "--output_dir", "o", "--train_data_dir", "d", "--seed", "0", "--full_bf16"]
    with pytest.raises(ConfigError, match="--full_bf16 with --mixed_precision no.*add --mixed_precision bf16"):
        parse_kohya(base, environ={})
    fields, notices, _ = parse_kohya([*base, "--mixed_precision", "bf16"], environ={})
    assert fields["full_bf16"] is True and fields["bf16_rounding"] == "stochastic"
    assert any(n.startswith("--full_bf16: weights and gradients in bf16") for n in notices)
    assert not any("full_bf16" in n and "ignored" in n for n in notices)
    fields, notices, _ = parse_kohya([*base, "--mixed_precision", "bf16", "--bf16_rounding", "nearest"], environ={})
    assert fields["bf16_rounding"] == "nearest" and not any(n.startswith("--full_bf16") for n in notices)
    fields, _, _ = parse_kohya(base[:-1], environ={})
    assert fields["full_bf16"] is False


def test_full_bf16_stage_b_learns_with_bf16_weights(shapes_dir, shared_cache, tmp_path) -> None:
    dtypes: set[torch.dtype] = set()

    def watch(event):
        if event.kind == "step":
            dtypes.update(p.dtype for p in event.run.stage_b.parameters())

    run = train(**bf16_run(shapes_dir, shared_cache, tmp_path, stage="b", learning_rate=3e-3, max_train_steps=30,
                           save_precision="bf16"), callback=watch)
    before, after = run.val_losses[0]["val_loss"], run.val_losses[-1]["val_loss"]
    assert run.status == "finished" and dtypes == {torch.bfloat16} and after < 0.85 * before, (before, after)
    exported = load_file(str(run.output_file))
    assert all(torch.equal(exported[k], v) for k, v in run.stage_b.state_dict().items())  # bf16 file, exact


def test_resume_refuses_another_full_bf16_setting(shapes_dir, shared_cache, tmp_path) -> None:
    train(**bf16_run(shapes_dir, shared_cache, tmp_path, max_train_steps=1))
    with pytest.raises(ValueError, match="full_bf16: True → False"):
        train(**bf16_run(shapes_dir, shared_cache, tmp_path, max_train_steps=2, full_bf16=False, resume="auto"))
    with pytest.raises(ValueError, match="bf16_rounding: 'stochastic' → 'nearest'"):
        train(**bf16_run(shapes_dir, shared_cache, tmp_path, max_train_steps=2, bf16_rounding="nearest",
                         resume="auto"))


def test_nearest_rounding_adafactor_is_kohyas_transformers_adafactor_on_bf16_weights() -> None:
    """kohya's Adafactor is transformers': fp32 arithmetic on a bf16 weight, the new weight copied back (to the
    nearest). bf16_rounding="nearest" gives the same bf16 weights over several steps, but for a few elements where
    the fp32 sums differ in their last bits and land across a rounding boundary (measured: 44 of 690 k, <= 4 ulps)."""
    from transformers.optimization import Adafactor as hf_adafactor  # kohya's Adafactor (a dependency)
    torch.manual_seed(0)
    shapes = [(48, 32), (600, 256), (2100, 256), (8, 4, 3, 3), (32,)]
    start = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    grads = [[(torch.randn(s) * (1 + 4 * (t % 2))).to(torch.bfloat16) for s in shapes] for t in range(5)]

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        return torch.cat([p.detach().flatten() for p in params])

    kohya = run(lambda ps: hf_adafactor(ps, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False,
                                        weight_decay=0.01))
    ours = run(lambda ps: build_optimizer("adafactor", ps, 1e-2, [*ADAFACTOR, "weight_decay=0.01"],
                                          Rounding("nearest")))
    ulps = (kohya.view(torch.int16).int() - ours.view(torch.int16).int()).abs()
    assert (ulps > 0).float().mean() < 1e-3 and int(ulps.max()) <= 8
    assert (kohya != torch.cat([t.flatten() for t in start])).float().mean() > 0.8  # the weights did move
