"""kohya's --optimizer_type names beyond AdamW and Adafactor: the class each builds, kohya's added defaults and
warnings, the generic torch.optim / dotted-path form, the old alias flags, and errors that say what to do."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from cascade_lab.training.config import ConfigError, TrainConfig
from cascade_lab.training.kohya_args import parse_kohya
from cascade_lab.training.lion import Lion
from cascade_lab.training.optim import build_optimizer, clip_grad_norm, optimizer_step, parse_optimizer_args
from cascade_lab.training.optimizers import label

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache

BASE = ["--model", "tiny", "--train_data_dir", "d", "--output_dir", "o", "--seed", "1"]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]


def _steps(opt, params, n: int = 5, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def lion_by_hand(params, grads, lr, betas, wd):
    """Lion written out (Chen et al. 2023, lion-pytorch's order): decay, signed interpolation, then momentum."""
    ms = [torch.zeros_like(p) for p in params]
    for step in grads:
        for p, m, g in zip(params, ms, step, strict=True):
            p.mul_(1 - lr * wd)
            p.sub_(lr * torch.sign(betas[0] * m + (1 - betas[0]) * g))
            m.copy_(betas[1] * m + (1 - betas[1]) * g)
    return params


def test_lion_is_the_written_out_rule() -> None:
    params = _params()
    start = [p.detach().clone() for p in params]
    got = _steps(Lion(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1), params)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(5)]
    want = lion_by_hand(start, grads, 1e-2, (0.8, 0.95), 0.1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want, strict=True))
    assert not torch.equal(got[0], _params()[0])
    # decoupled weight decay is divided by the starting learning rate, as lion-pytorch does
    params = _params()
    decoupled = _steps(Lion(params, lr=1e-2, weight_decay=1e-3, decoupled_weight_decay=True), params)
    plain = _params()
    assert torch.allclose(decoupled[0], _steps(Lion(plain, lr=1e-2, weight_decay=0.1), plain)[0])


def test_lion_matches_lion_pytorch() -> None:
    import lion_pytorch  # the test extra installs it
    for kwargs in ({}, {"betas": (0.5, 0.9), "weight_decay": 0.05}, {"weight_decay": 1e-4,
                                                                    "decoupled_weight_decay": True}):
        ours, theirs = _params(), _params()
        a = _steps(Lion(ours, lr=3e-3, **kwargs), ours, n=7)
        b = _steps(lion_pytorch.Lion(theirs, lr=3e-3, **kwargs), theirs, n=7)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), kwargs
    # the state has the package's key, so a checkpoint of one resumes in the other
    ours, theirs = _params(), _params()
    own = Lion(ours, lr=3e-3)
    _steps(own, ours, n=2)
    other = lion_pytorch.Lion(theirs, lr=3e-3)
    other.load_state_dict(own.state_dict())
    assert torch.equal(other.state[theirs[0]]["exp_avg"], own.state[ours[0]]["exp_avg"])


def test_lion_name_builds_the_package_or_cascade_labs_own(monkeypatch) -> None:
    opt = build_optimizer("LION", _params(), 1e-4, ["betas=0.9,0.99"])
    assert type(opt).__module__.startswith("lion_pytorch") and opt.defaults["betas"] == (0.9, 0.99)  # test extra
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # not installed
    opt = build_optimizer("Lion", _params(), 1e-4, ["weight_decay=0.01"])
    assert isinstance(opt, Lion) and opt.defaults["weight_decay"] == 0.01


def test_lion_with_clipping_and_the_loop_step() -> None:
    params = _params()
    opt = build_optimizer("Lion", params, 1e-2, [])
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    norm = clip_grad_norm(opt, params, 1.0)
    assert float(norm) > 1 and float(torch.nn.utils.get_total_norm([p.grad for p in params])) <= 1.0 + 1e-5
    before = params[0].detach().clone()
    optimizer_step(opt)
    assert torch.allclose(before - params[0], torch.full_like(before, 1e-2))  # a signed step of exactly lr


def test_sgd_nesterov_gets_kohyas_momentum() -> None:
    opt = build_optimizer("SGDNesterov", _params(), 1e-3, [])
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert label(opt, "SGDNesterov", {}) == "torch.optim.sgd.SGD(momentum=0.9)"
    opt = build_optimizer("sgdnesterov", _params(), 1e-3, ["momentum=0.5", "weight_decay=1e-4"])
    assert opt.defaults["momentum"] == 0.5 and opt.defaults["weight_decay"] == 1e-4
    with pytest.raises(ConfigError, match="nesterov"):
        build_optimizer("SGDNesterov", _params(), 1e-3, ["nesterov=False"])


@pytest.mark.parametrize("name, module, cls", [
    ("Prodigy", "prodigyopt", "Prodigy"), ("DAdaptation", "dadaptation", "DAdaptAdamPreprint"),
    ("DAdaptAdamPreprint", "dadaptation", "DAdaptAdamPreprint"), ("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad"),
    ("DAdaptAdam", "dadaptation", "DAdaptAdam"), ("DAdaptAdan", "dadaptation", "DAdaptAdan"),
    ("DAdaptAdanIP", "dadaptation", "DAdaptAdanIP"), ("DAdaptLion", "dadaptation", "DAdaptLion"),
    ("DAdaptSGD", "dadaptation", "DAdaptSGD")])
def test_learning_rate_free_optimizers(name, module, cls, monkeypatch) -> None:
    assert importlib.util.find_spec(module), f"{module} is in the test extra: pip install -e '.[test]'"
    with pytest.warns(UserWarning, match=r"learning_rate=0.0001 is low .*around 1.0"):
        opt = build_optimizer(name, _params(), 1e-4, [])
    assert type(opt).__name__ == cls and type(opt).__module__.startswith(module)
    params = _params()
    opt = build_optimizer(name.lower(), params, 1.0, ["weight_decay=0.01"])  # 1.0: no warning (filterwarnings)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    moved = _steps(opt, params, n=3)
    assert not torch.equal(moved[0], _params()[0])
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=f"pip install {module}"):
        build_optimizer(name, _params(), 1.0, [])
    with pytest.raises(ConfigError, match=f"optimizer_type='{name}'.*pip install {module}"):
        TrainConfig(train_data_dir="d", optimizer_type=name).validate()


@pytest.mark.parametrize("name, near", [("AdamW8bit", "AdamW"), ("PagedAdamW8bit", "AdamW"), ("PagedAdamW", "AdamW"),
                                        ("PagedAdamW32bit", "AdamW"), ("Lion8bit", "Lion"),
                                        ("PagedLion8bit", "Lion"), ("SGDNesterov8bit", "SGDNesterov")])
def test_bitsandbytes_names_without_it_say_what_they_would_do(name, near, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for check in (lambda: build_optimizer(name, _params(), 1e-4, []),
                  lambda: TrainConfig(train_data_dir="d", optimizer_type=name).validate()):
        with pytest.raises(ConfigError, match=rf"bitsandbytes\.optim\..*pip install bitsandbytes.*"
                                              rf"optimizer_type='{near}'"):
            check()


def test_any_torch_optim_class_or_dotted_path() -> None:
    opt = build_optimizer("RAdam", _params(), 1e-3, ["betas=(0.8,0.9)"])
    assert type(opt) is torch.optim.RAdam and opt.defaults["betas"] == (0.8, 0.9)
    assert label(opt, "RAdam", {"betas": (0.8, 0.9)}) == "torch.optim.radam.RAdam(betas=(0.8, 0.9))"
    opt = build_optimizer("torch.optim.SGD", _params(), 1e-3, ["momentum=0.7"])
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.7 and not opt.defaults["nesterov"]
    assert label(build_optimizer("AdamW", _params(), 1e-3, []), "adamw", {}) == "torch.optim.adamw.AdamW"
    assert type(build_optimizer("prodigyopt.Prodigy", _params(), 1.0, [])).__name__ == "Prodigy"  # the test extra
    for name, words in (("NoSuchOptim", "torch.optim has no optimizer class 'NoSuchOptim'"),
                        ("no_such_pkg.Opt", "module 'no_such_pkg' cannot be imported"),
                        ("torch.optim.Nope", "torch.optim has no optimizer class 'Nope'")):
        with pytest.raises(ConfigError, match=f"optimizer_type='{name}': {words}"):
            build_optimizer(name, _params(), 1e-3, [])
    with pytest.raises(ConfigError, match="do not fit torch.optim.sgd.SGD"):
        build_optimizer("SGD", _params(), 1e-3, ["betas=0.9,0.99"])
    for bad, words in (("Ad-am", "a torch.optim class"), ("DAdaptFoo", "D-Adaptation names"),
                       ("AdamX8bit", "8-bit names are AdamW8bit")):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(train_data_dir="d", optimizer_type=bad).validate()


def test_optimizer_args_read_as_kohya_reads_them() -> None:
    assert parse_optimizer_args(["betas=0.9,0.99", "d_coef=2", "decouple=True", "eps=1e-8", "name='x'",
                                 "relative_step=false", "beta3=None", "betas2=[0.1, 0.2]"]) == {
        "betas": (0.9, 0.99), "d_coef": 2, "decouple": True, "eps": 1e-8, "name": "x", "relative_step": False,
        "beta3": None, "betas2": (0.1, 0.2)}


def test_old_alias_flags() -> None:
    fields, _, _ = parse_kohya([*BASE, "--use_8bit_adam"])
    assert fields["optimizer_type"] == "adamw8bit"
    fields, _, _ = parse_kohya([*BASE, "--use_lion_optimizer", "--optimizer_args", "weight_decay=0.1"])
    assert fields["optimizer_type"] == "lion" and fields["optimizer_args"] == ["weight_decay=0.1"]
    fields, _, _ = parse_kohya([*BASE, "--optimizer_type", "torch.optim.RAdam"])
    assert fields["optimizer_type"] == "torch.optim.RAdam"  # a class path keeps its case
    fields, _, _ = parse_kohya([*BASE, "--optimizer_type", "PagedAdamW8bit"])
    assert fields["optimizer_type"] == "pagedadamw8bit"
    with pytest.raises(ConfigError, match="--use_8bit_adam and --use_lion_optimizer both given"):
        parse_kohya([*BASE, "--use_8bit_adam", "--use_lion_optimizer"])
    for flag in ("--use_8bit_adam", "--use_lion_optimizer"):
        with pytest.raises(ConfigError, match=f"{flag} and --optimizer_type AdamW both given"):
            parse_kohya([*BASE, flag, "--optimizer_type", "AdamW"])


def test_learning_rate_free_runs_log_d_times_lr(shapes_dir, shared_cache, tmp_path) -> None:
    """kohya logs lr/d*lr for D-Adaptation and Prodigy: the step size they found times the learning rate; each
    step's log has it as d_lr (and AdamW's has none)."""
    import warnings

    from training_helpers import tiny_run

    from cascade_lab.training import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "prodigy", mode="full", optimizer_type="Prodigy",
                               learning_rate=0.5, max_train_steps=5, save_every_n_steps=1, lr_scheduler="linear"))
    folder = tmp_path / "prodigy" / "checkpoints"
    held = [float(torch.load(str(folder / f"step-0000000{s}" / "state.pt"), map_location="cpu",
                             weights_only=True)["optimizer"]["param_groups"][0]["d"]) for s in (4, 5)]
    assert held[1] > held[0]  # d grew in step 5 (so the figure tells which d it took)
    # step 5 used the d Prodigy held after step 4 and step 5's decayed learning rate
    lr = run.losses[4]["lr"]
    assert lr < 0.5 and run.losses[4]["d_lr"] == pytest.approx(held[0] * lr, rel=1e-12)
    d = [r["d_lr"] / r["lr"] for r in run.losses]
    assert d[0] == pytest.approx(1e-6) and d == sorted(d)  # the first step uses d0 = 1e-6; d never shrinks
    lora = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "lora", mode="lora", optimizer_type="Prodigy",
                            learning_rate=0.5, max_train_steps=1, scale_weight_norms=1.0))
    assert {"d_lr", "keys_scaled"} <= set(lora.losses[0])  # beside the max-norm's figures
    plain = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "adamw", mode="lora", max_train_steps=1))
    assert "d_lr" not in plain.losses[0]


@pytest.mark.filterwarnings("ignore:Adafactor with relative_step=True ignores learning_rate")
def test_adafactor_warmup_init_turns_the_relative_step_on_as_kohya_does() -> None:
    """kohya: "set relative_step to True because warmup_init is True"; the learning rate is then ignored and the
    step size is 1e-6 * t at first (warm-up init)."""
    p = torch.nn.Parameter(torch.ones(4, 4))
    with pytest.warns(UserWarning, match="relative_step is turned on, as kohya does"):
        opt = build_optimizer("Adafactor", [p], 1e-2, ["relative_step=False", "warmup_init=True",
                                                         "scale_parameter=False"])
    assert opt.param_groups[0]["lr"] is None and opt.param_groups[0]["relative_step"]
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4, 4), 1 - 1e-6), atol=1e-9)  # step 1: 1e-6 * 1, unit update
    given = parse_optimizer_args(["relative_step=False", "warmup_init=True", "scale_parameter=False"])
    assert "relative_step=True" in label(opt, "Adafactor", given)  # ss_optimizer says what ran, as kohya's does
