"""kohya prompt files and the optimizers / learning-rate schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cascade_lab.training.config import ConfigError
from cascade_lab.training.optim import (
    Adafactor,
    build_optimizer,
    clip_grad_norm,
    optimizer_step,
    parse_optimizer_args,
)
from cascade_lab.training.sampling import SamplePrompt, load_prompts, parse_prompt_line
from cascade_lab.training.schedules import lr_lambda


def test_prompt_line_grammar() -> None:
    line = "zxc toy on a beach at sunset --n blurry, lowres --w 1024 --H 1200 --d 42 --l 4.5 --s 30"
    assert parse_prompt_line(line) == SamplePrompt("zxc toy on a beach at sunset", "blurry, lowres", 1024, 1200,
                                                   42, 4.5, 30)
    assert parse_prompt_line("a cat --W 801 --s 5000") == SamplePrompt("a cat", width=800, steps=1000)
    assert parse_prompt_line("# a comment --w 512") is None and parse_prompt_line("   ") is None
    with pytest.warns(UserWarning, match="--q"):
        assert parse_prompt_line("a dog --q 3").prompt == "a dog"
    with pytest.raises(ConfigError, match="--d"):
        parse_prompt_line("a dog --d many")


def test_prompt_files_txt_toml_json(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# previews\nred circle --w 256 --h 256\n\nblue square --n green\n")
    assert [p.prompt for p in load_prompts(tmp_path / "p.txt")] == ["red circle", "blue square"]
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 512\nscale = 3\n[[prompt.subset]]\nprompt = "a"\n'
                                     '[[prompt.subset]]\nprompt = "b"\nwidth = 256\nsample_steps = 8\n')
    assert load_prompts(tmp_path / "p.toml") == [SamplePrompt("a", width=512, scale=3.0),
                                                 SamplePrompt("b", width=256, scale=3.0, steps=8)]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "c", "seed": 7, "negative_prompt": "x"}]))
    assert load_prompts(tmp_path / "p.json") == [SamplePrompt("c", "x", seed=7)]
    assert load_prompts(["d --d 3", "# no"]) == [SamplePrompt("d", seed=3)]


def test_optimizer_args_in_kohya_syntax() -> None:
    args = parse_optimizer_args(["scale_parameter=False", "relative_step=False", "warmup_init=False",
                                 "weight_decay=0.01", "betas=(0.9,0.99)"])
    assert args == {"scale_parameter": False, "relative_step": False, "warmup_init": False, "weight_decay": 0.01,
                    "betas": (0.9, 0.99)}
    with pytest.raises(ConfigError, match="key=value"):
        parse_optimizer_args(["oops"])


def _fit(optimizer_factory, steps: int = 200) -> float:
    torch.manual_seed(0)
    target = torch.randn(8, 6)
    w = torch.nn.Parameter(torch.zeros(8, 6))
    b = torch.nn.Parameter(torch.zeros(6))
    opt = optimizer_factory([w, b])
    for _ in range(steps):
        loss = ((w - target) ** 2).mean() + ((b - 1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((w - target) ** 2).mean() + ((b - 1) ** 2).mean())


def test_adafactor_with_the_readme_arguments_uses_the_learning_rate() -> None:
    readme = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
    start = _fit(lambda p: build_optimizer("Adafactor", p, 1e-2, readme), steps=0)
    assert _fit(lambda p: build_optimizer("Adafactor", p, 3e-2, readme)) < 0.05 * start
    # the step is lr-sized: with a tiny lr almost nothing moves
    assert _fit(lambda p: build_optimizer("Adafactor", p, 1e-6, readme)) > 0.99 * start
    with pytest.warns(UserWarning, match="ignores learning_rate"):
        relative = build_optimizer("adafactor", [torch.nn.Parameter(torch.zeros(2, 2))], 1.0, [])
    assert isinstance(relative, Adafactor) and relative.param_groups[0]["lr"] is None


def test_adafactor_factors_matrices_and_keeps_state_dict() -> None:
    w = torch.nn.Parameter(torch.randn(4, 5, 1, 1))
    opt = Adafactor([w], lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert state["row"].shape == (4, 5, 1) and state["col"].shape == (4, 5, 1) and state["step"] == 1
    clone = Adafactor([torch.nn.Parameter(w.detach().clone())], lr=1e-2, relative_step=False,
                      scale_parameter=False, beta1=0.9, weight_decay=0.1)
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(next(iter(clone.state.values()))["row"], state["row"])


def _adafactor_reference(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float | None, eps1: float,
                         eps2: float, clip: float, decay: float, beta1: float | None, wd: float, scale_parameter: bool,
                         relative_step: bool) -> list[torch.Tensor]:
    """Shazeer & Stern's Adafactor written out plainly (grad² + eps1 materialised, the r ⊗ c outer product)."""
    params = [p.detach().clone().double() for p in params]
    state: list[dict] = [{} for _ in params]
    for t, step_grads in enumerate(grads, start=1):
        for p, g, st in zip(params, step_grads, state, strict=True):
            g = g.double()
            step_lr = min(1e-2, 1 / math.sqrt(t)) if relative_step else lr
            if scale_parameter:
                step_lr *= max(eps2, float(p.norm() / math.sqrt(p.numel())))
            beta2 = 1 - t ** decay
            sq = g * g + eps1
            if g.dim() >= 2:
                st["row"] = st.get("row", torch.zeros(g.shape[:-1], dtype=g.dtype)) * beta2 + (1 - beta2) * sq.mean(-1)
                st["col"] = (st.get("col", torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=g.dtype)) * beta2
                             + (1 - beta2) * sq.mean(-2))
                r = (st["row"] / st["row"].mean(-1, keepdim=True)).rsqrt().unsqueeze(-1)
                u = r * st["col"].rsqrt().unsqueeze(-2) * g
            else:
                st["sq"] = st.get("sq", torch.zeros_like(g)) * beta2 + (1 - beta2) * sq
                u = st["sq"].rsqrt() * g
            u = u / max(1.0, float(u.norm() / math.sqrt(u.numel())) / clip) * step_lr
            if beta1 is not None:
                st["avg"] = st.get("avg", torch.zeros_like(g)) * beta1 + (1 - beta1) * u
                u = st["avg"]
            if wd:
                p.mul_(1 - wd * step_lr)
            p.sub_(u)
    return params


@pytest.mark.parametrize("options", [
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "warmup_init": False},  # kohya's README
    {"lr": 1e-2, "relative_step": False, "scale_parameter": True, "beta1": 0.9, "weight_decay": 0.1},
    {"relative_step": True, "scale_parameter": True, "clip_threshold": 0.5},
])
def test_adafactor_update_is_the_textbook_one(options: dict) -> None:
    """The optimiser's fewer-pass arithmetic gives the plain algorithm's parameters (float64 reference) over
    several steps, for matrices, a 4-D conv weight and vectors, with clipping active."""
    torch.manual_seed(0)
    shapes = [(48, 32), (600, 256), (2100, 256), (8, 4, 3, 3), (32,)]  # matrices: one or several row blocks
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (1 + 4 * (t % 2)) for s in shapes] for t in range(5)]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    opt = Adafactor(params, **options)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()
    expected = _adafactor_reference(start, grads, options.get("lr"), 1e-30, 1e-3, options.get("clip_threshold", 1.0),
                                    -0.8, options.get("beta1"), options.get("weight_decay", 0.0),
                                    options["scale_parameter"], options["relative_step"])
    for p, ref, s in zip(params, expected, start, strict=True):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), s)


def test_adamw_defaults_to_the_official_weight_decay() -> None:
    opt = build_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], 1e-4, [])
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_adamw_on_the_cpu_is_the_fused_kernel_with_the_same_update() -> None:
    """CPU AdamW runs torch's fused kernel (one pass) unless fused/foreach is chosen; the update is AdamW's."""
    torch.manual_seed(0)
    start, grads = torch.randn(64, 32), [torch.randn(64, 32) for _ in range(3)]
    params = {}
    for args in ([], ["fused=False"]):
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer("AdamW", [p], 1e-2, args)
        assert opt.param_groups[0]["fused"] is (not args)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        params[bool(args)] = p.detach()
    torch.testing.assert_close(params[False], params[True], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(params[False], start)


@pytest.mark.parametrize("max_norm", [0.5, 1e3, math.inf])
def test_clipping_folded_into_the_fused_step_gives_torchs_clip_and_norm(max_norm: float) -> None:
    """The fused AdamW takes the clip factor as its grad scale (no pass over the gradients); the norm returned,
    the updates and the gradients left for nobody match clip_grad_norm_ + the unfused step; the scale is
    dropped after each step, also after a step skipped for a non-finite norm."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (8, 8, 3, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * 3 for s in shapes] for _ in range(3)]
    results = {}
    for args in ([], ["fused=False"]):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient: left out of the norm, not updated
        opt = build_optimizer("AdamW", params, 1e-2, args)
        norms = []
        for step in grads:
            for p, g in zip(params[:-1], step, strict=True):
                p.grad = g.clone()
            norm = clip_grad_norm(opt, params, max_norm)
            assert (getattr(opt, "grad_scale", None) is not None) == (not args and math.isfinite(max_norm))
            norms.append(float(norm))
            optimizer_step(opt)
            assert getattr(opt, "grad_scale", None) is None
            opt.zero_grad(set_to_none=True)
        results[bool(args)] = ([p.detach().clone() for p in params], norms)
    (fused, fused_norms), (plain, plain_norms) = results[False], results[True]
    assert fused_norms == pytest.approx(plain_norms, rel=1e-6)
    if max_norm == 0.5:
        assert min(plain_norms) > 0.5  # the clip is active
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a non-finite gradient: the caller skips the step; the next clip replaces the stale scale
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer("AdamW", [p], 1e-2, [])
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    assert not math.isfinite(float(clip_grad_norm(opt, [p], 1.0)))
    p.grad = torch.tensor([0.1, 0.0, 0.0])
    assert float(clip_grad_norm(opt, [p], 1.0)) == pytest.approx(0.1)
    assert float(opt.grad_scale) == 1.0
    optimizer_step(opt)
    assert torch.isfinite(p).all() and p[0] < 1


def test_schedules() -> None:
    assert [lr_lambda("constant", 10, 100)(s) for s in (0, 50)] == [1.0, 1.0]
    warm = lr_lambda("constant_with_warmup", 4, 100)
    assert [warm(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # kohya's and the official warm-up
    cosine = lr_lambda("cosine_with_warmup", 10, 110)
    assert cosine(10) == 1.0 and math.isclose(cosine(60), 0.5) and cosine(110) < 1e-9
    assert lr_lambda("linear", 0, 100)(50) == 0.5


def test_warmup_as_a_fraction_of_the_run() -> None:
    """Newer kohya takes `--lr_warmup_steps 0.05` as 5 % of the optimizer steps; whole numbers stay steps."""
    from cascade_lab.training.config import TrainConfig
    from cascade_lab.training.kohya_args import parse_kohya
    from cascade_lab.training.schedules import build_scheduler, warmup_steps

    settings, _, _ = parse_kohya(["--model", "tiny", "--train_data_dir", "d", "--output_dir", "o",
                                  "--lr_warmup_steps", "0.05", "--lr_scheduler", "constant_with_warmup"])
    assert settings["lr_warmup_steps"] == 0.05
    assert warmup_steps(0.05, 200) == 10 and warmup_steps(30, 200) == 30 and warmup_steps(30.0, 200) == 30
    opt = build_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], 1.0, [])
    sched = build_scheduler(opt, "constant_with_warmup", 0.05, 200)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[9] == pytest.approx(9 / 10) and lrs[10] == lrs[11] == 1.0
    TrainConfig(train_data_dir="d", lr_warmup_steps=0.05).validate()
    for bad in (-1, 1.5, float("nan"), "10"):
        with pytest.raises(ConfigError, match="lr_warmup_steps="):
            TrainConfig(train_data_dir="d", lr_warmup_steps=bad).validate()  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        parse_kohya(["--model", "tiny", "--train_data_dir", "d", "--lr_warmup_steps", "ten"])
