"""kohya's learning-rate schedules: the factors of every --lr_scheduler name step by step against diffusers'
get_scheduler (what kohya builds), warm-up included; --lr_scheduler_type classes; Adafactor's own step size;
resuming continues the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import optimization  # what kohya builds (the test extra installs it)

from cascade_lab.training.config import ConfigError, TrainConfig
from cascade_lab.training.kohya_args import parse_kohya
from cascade_lab.training.optim import build_optimizer
from cascade_lab.training.schedules import build_scheduler

get_scheduler = optimization.get_scheduler
get_cosine_schedule_with_warmup = optimization.get_cosine_schedule_with_warmup
get_polynomial_decay_schedule_with_warmup = optimization.get_polynomial_decay_schedule_with_warmup
BASE = ["--model", "tiny", "--train_data_dir", "d", "--output_dir", "o", "--seed", "1"]
TOTAL = 23


def _optimizer(lr: float = 1e-3):
    return build_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], lr, [])


def _lrs(opt, sched, steps: int = TOTAL) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


CASES = [("constant", 0, {}), ("constant_with_warmup", 5, {}), ("linear", 0, {}), ("linear", 5, {}),
         ("cosine", 0, {}), ("cosine", 5, {}), ("cosine_with_restarts", 5, {"num_cycles": 1}),
         ("cosine_with_restarts", 4, {"num_cycles": 3}), ("cosine_with_restarts", 0, {"num_cycles": 2}),
         ("polynomial", 5, {"power": 1.0}), ("polynomial", 3, {"power": 2.0}), ("polynomial", 0, {"power": 0.5})]


@pytest.mark.parametrize("name, warmup, extra", CASES)
def test_every_schedule_is_diffusers_step_by_step(name, warmup, extra) -> None:
    ours = _optimizer()
    got = _lrs(ours, build_scheduler(ours, name, warmup, TOTAL, **extra))
    theirs = _optimizer()
    want = _lrs(theirs, get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=TOTAL, **extra))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if warmup:
        assert got[0] == 0.0 and got[1] == pytest.approx(1e-3 / warmup)  # the first step runs at learning rate 0


def test_cascade_labs_cosine_with_warmup_is_diffusers_cosine() -> None:
    ours = _optimizer()
    got = _lrs(ours, build_scheduler(ours, "cosine_with_warmup", 4, TOTAL))
    theirs = _optimizer()
    assert got == pytest.approx(_lrs(theirs, get_scheduler("cosine", theirs, num_warmup_steps=4,
                                                           num_training_steps=TOTAL)))


def test_lr_scheduler_args_of_diffusers_schedules() -> None:
    ours = _optimizer()
    got = _lrs(ours, build_scheduler(ours, "cosine", 2, TOTAL, scheduler_args=["num_cycles=1.5"]))
    theirs = _optimizer()
    assert got == pytest.approx(_lrs(theirs, get_cosine_schedule_with_warmup(theirs, 2, TOTAL, num_cycles=1.5)))
    ours = _optimizer()
    got = _lrs(ours, build_scheduler(ours, "polynomial", 2, TOTAL, power=3.0, scheduler_args=["lr_end=1e-4"]))
    theirs = _optimizer()
    want = _lrs(theirs, get_polynomial_decay_schedule_with_warmup(theirs, 2, TOTAL, lr_end=1e-4, power=3.0))
    assert got == pytest.approx(want)
    rules = "1:5,0.5:10,0.1"
    ours = _optimizer()
    got = _lrs(ours, build_scheduler(ours, "piecewise_constant", 0, TOTAL, scheduler_args=[f"step_rules='{rules}'"]))
    theirs = _optimizer()
    assert got == _lrs(theirs, get_scheduler("piecewise_constant", theirs, step_rules=rules))
    assert got[4] == 1e-3 and got[5] == 5e-4 and got[10] == pytest.approx(1e-4)
    unquoted = _optimizer()  # kohya's literal_eval stops at 1:5,...; read as text here
    assert _lrs(unquoted, build_scheduler(unquoted, "piecewise_constant", 0, TOTAL,
                                          scheduler_args=[f"step_rules={rules}"])) == got
    with pytest.raises(ConfigError, match="'cosine_with_restarts' takes none"):
        build_scheduler(_optimizer(), "cosine_with_restarts", 0, TOTAL, scheduler_args=["num_cycles=2"])
    with pytest.raises(ConfigError, match="piecewise_constant' needs its rules"):
        build_scheduler(_optimizer(), "piecewise_constant", 0, TOTAL)
    with pytest.raises(ConfigError, match="step_rules='1:x'"):
        build_scheduler(_optimizer(), "piecewise_constant", 0, TOTAL, scheduler_args=["step_rules='1:x'"])
    with pytest.raises(ConfigError, match="lr_end=0.01, which must be below learning_rate=0.001"):
        build_scheduler(_optimizer(), "polynomial", 0, TOTAL, scheduler_args=["lr_end=1e-2"])


def test_warmup_with_constant_is_dropped_with_a_warning() -> None:
    opt = _optimizer()
    with pytest.warns(UserWarning, match="no warm-up .*kohya stops for 'constant'"):
        sched = build_scheduler(opt, "constant", 5, TOTAL)
    assert _lrs(opt, sched, 3) == [1e-3] * 3


def test_scheduler_classes() -> None:
    ours = _optimizer()
    got = _lrs(ours, build_scheduler(ours, "constant", 0, TOTAL, scheduler_type="CosineAnnealingLR",
                                     scheduler_args=["T_max=10", "eta_min=1e-5"]))
    theirs = _optimizer()
    assert got == _lrs(theirs, torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=10, eta_min=1e-5))
    opt = _optimizer()
    sched = build_scheduler(opt, "cosine", 0, TOTAL, scheduler_type="torch.optim.lr_scheduler.StepLR",
                            scheduler_args=["step_size=3", "gamma=0.5"])
    assert type(sched) is torch.optim.lr_scheduler.StepLR and _lrs(opt, sched, 7)[6] == pytest.approx(2.5e-4)
    with pytest.raises(ConfigError, match="does not take a warm-up .*lr_warmup_steps=3"):
        build_scheduler(_optimizer(), "constant", 3, TOTAL, scheduler_type="StepLR", scheduler_args=["step_size=2"])
    with pytest.raises(ConfigError, match="needs the loss at every step"):
        build_scheduler(_optimizer(), "constant", 0, TOTAL, scheduler_type="ReduceLROnPlateau")
    with pytest.raises(ConfigError, match="has no class 'Nope'"):
        build_scheduler(_optimizer(), "constant", 0, TOTAL, scheduler_type="Nope")
    with pytest.raises(ConfigError, match="module 'nowhere' cannot be imported"):
        build_scheduler(_optimizer(), "constant", 0, TOTAL, scheduler_type="nowhere.Sched")
    with pytest.raises(ConfigError, match=r"StepLR' with lr_scheduler_args \{\}"):
        build_scheduler(_optimizer(), "constant", 0, TOTAL, scheduler_type="StepLR")


def test_adafactor_schedule() -> None:
    with pytest.warns(UserWarning, match="ignores learning_rate"):
        relative = build_optimizer("Adafactor", [torch.nn.Parameter(torch.zeros(2, 2))], 1e-3, [])
    for name in ("adafactor", "adafactor:1e-3", "constant"):
        assert build_scheduler(relative, name, 0, TOTAL).state_dict() == {}
    with pytest.warns(UserWarning, match="lr_scheduler='cosine' has no effect"):
        build_scheduler(relative, "cosine", 0, TOTAL)
    with pytest.raises(ConfigError, match="lr_warmup_steps=5 with Adafactor's relative_step=True"):
        build_scheduler(relative, "adafactor", 5, TOTAL)
    with pytest.raises(ConfigError, match="'adafactor' goes with optimizer_type='Adafactor' and relative_step=True"):
        build_scheduler(_optimizer(), "adafactor", 0, TOTAL)
    TrainConfig(train_data_dir="d", lr_scheduler="adafactor:1e-3", optimizer_type="Adafactor").validate()
    with pytest.raises(ConfigError, match="lr_scheduler='adafactor' goes with optimizer_type='Adafactor'"):
        TrainConfig(train_data_dir="d", lr_scheduler="adafactor", optimizer_type="Lion").validate()
    for bad in ("adafactor:x", "adafactor:1:2", "cosine_restarts"):
        with pytest.raises(ConfigError, match=f"lr_scheduler='{bad}'"):
            TrainConfig(train_data_dir="d", lr_scheduler=bad).validate()


def test_settings_are_checked() -> None:
    for key, bad, words in (("lr_scheduler_num_cycles", 0, "1 or more"), ("lr_scheduler_power", -1.0, "positive"),
                            ("lr_scheduler_power", math.inf, "positive"), ("lr_scheduler_type", "a b", "class")):
        with pytest.raises(ConfigError, match=f"{key}="):
            TrainConfig(train_data_dir="d", **{key: bad}).validate()
        with pytest.raises(ConfigError, match=words):
            TrainConfig(train_data_dir="d", **{key: bad}).validate()
    cfg = TrainConfig.from_dict({"train_data_dir": "d", "lr_scheduler_type": "StepLR",
                                 "lr_scheduler_args": "step_size=3 gamma=0.5"}).validate()
    assert cfg.lr_scheduler_args == ["step_size=3", "gamma=0.5"]


def test_kohya_flags_reach_the_config() -> None:
    fields, notices, _ = parse_kohya([*BASE, "--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles",
                                      "3", "--lr_scheduler_power", "2", "--lr_warmup_steps", "10"])
    assert (fields["lr_scheduler"], fields["lr_scheduler_num_cycles"], fields["lr_scheduler_power"]) == \
        ("cosine_with_restarts", 3, 2.0)
    assert not any("lr_scheduler" in n for n in notices)
    fields, _, _ = parse_kohya([*BASE, "--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=5"])
    assert fields["lr_scheduler_type"] == "CosineAnnealingLR" and fields["lr_scheduler_args"] == ["T_max=5"]
    TrainConfig(**fields).validate()
    fields, _, _ = parse_kohya(BASE)
    assert (fields["lr_scheduler_num_cycles"], fields["lr_scheduler_power"], fields["lr_scheduler_args"]) == \
        (1, 1.0, [])  # kohya's defaults
    _, notices, _ = parse_kohya([*BASE, "--lr_warmup_steps", "8"], environ={"WORLD_SIZE": "4"})
    assert any("4 processes: kohya's schedule is stepped 4 times per optimizer step" in n for n in notices)
    _, notices, _ = parse_kohya([*BASE, "--lr_warmup_steps", "8"], environ={"WORLD_SIZE": "1"})
    assert not any("processes" in n for n in notices)


def test_resume_continues_the_schedule() -> None:
    for name, kwargs in (("cosine_with_restarts", {"num_cycles": 2}), ("polynomial", {"power": 2.0}),
                         ("constant", {"scheduler_type": "StepLR", "scheduler_args": ["step_size=4"]})):
        warm = 0 if "scheduler_type" in kwargs else 3
        whole_opt = _optimizer()
        whole = _lrs(whole_opt, build_scheduler(whole_opt, name, warm, TOTAL, **kwargs))
        first_opt = _optimizer()
        first_sched = build_scheduler(first_opt, name, warm, TOTAL, **kwargs)
        head = _lrs(first_opt, first_sched, 9)
        again = _optimizer()  # as run.py resumes: both built afresh, then the optimizer's state, then the schedule's
        sched = build_scheduler(again, name, warm, TOTAL, **kwargs)
        again.load_state_dict(first_opt.state_dict())
        sched.load_state_dict(first_sched.state_dict())
        assert head + _lrs(again, sched, TOTAL - 9) == whole, name
