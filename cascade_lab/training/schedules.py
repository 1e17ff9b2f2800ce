"""Learning-rate schedules as kohya builds them (train_util.get_scheduler_fix): diffusers' named schedules
with a warm-up from 0, a ``torch.optim.lr_scheduler`` class or dotted path (``--lr_scheduler_type``), or
none for an optimizer that sets its own step size (Adafactor's relative step). Stepped once per optimizer step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .config import ConfigError
from .optim import parse_optimizer_args

# extra keyword arguments each diffusers schedule takes from kohya's --lr_scheduler_args, with their defaults
SCHEDULE_ARGS: dict[str, dict[str, Any]] = {
    "constant": {}, "constant_with_warmup": {}, "linear": {}, "cosine": {"num_cycles": 0.5},
    "cosine_with_warmup": {"num_cycles": 0.5}, "cosine_with_restarts": {}, "polynomial": {"lr_end": 1e-7},
    "piecewise_constant": {"step_rules": None},
}


def step_rules(text: Any) -> Any:
    """diffusers' piecewise_constant rules "1:10,0.1:20,0.01" (factor 1 below step 10, 0.1 below 20, then 0.01)
    → the factor at optimizer step s."""
    rules: list[tuple[int, float]] = []
    try:
        *pairs, last = str(text).split(",")
        for pair in pairs:
            value, until = pair.split(":")
            rules.append((int(until), float(value)))
        final = float(last)
    except ValueError:
        raise ConfigError(f"lr_scheduler_args step_rules={text!r}: write factor:until_step pairs and a last factor, "
                          "e.g. step_rules='1:100,0.1:200,0.01' (quoted for kohya's literal_eval)") from None
    rules.sort()

    def factor(step: int) -> float:
        return next((f for until, f in rules if step < until), final)
    return factor


def lr_lambda(name: str, warmup: int, total: int, *, num_cycles: int = 1, power: float = 1.0, base_lr: float = 1.0,
              options: dict[str, Any] | None = None) -> Any:
    """Multiplier of the base learning rate at optimizer step s (0-based): diffusers' schedules as kohya builds
    them (get_scheduler), warm-up s / warmup from 0, so the first step runs at learning rate 0 (kohya; the official
    trainer's GradualWarmupScheduler too). `num_cycles`: cosine_with_restarts' cycles, `power`: polynomial's
    exponent (kohya's --lr_scheduler_num_cycles / --lr_scheduler_power), `options`: SCHEDULE_ARGS (cosine's
    num_cycles, polynomial's lr_end, piecewise_constant's step_rules)."""
    options = {**SCHEDULE_ARGS[name], **(options or {})}
    if name == "piecewise_constant":
        return step_rules(options["step_rules"])
    lr_end = float(options.get("lr_end", 0.0))
    if name == "polynomial" and not base_lr > lr_end:
        raise ConfigError(f"lr_scheduler='polynomial' decays to lr_end={lr_end:g}, which must be below "
                          f"learning_rate={base_lr:g}; raise learning_rate or give --lr_scheduler_args lr_end=...")

    def factor(step: int) -> float:
        if step < warmup and name != "constant":
            return step / max(1, warmup)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name in ("cosine", "cosine_with_warmup"):
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * float(options["num_cycles"]) * progress)))
        if name == "cosine_with_restarts":
            return 0.0 if progress >= 1 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1))))
        if name == "polynomial":
            if step > total:
                return lr_end / base_lr
            return ((base_lr - lr_end) * (1 - progress) ** power + lr_end) / base_lr
        return max(0.0, (total - step) / max(1, total - warmup))  # linear decay to 0
    return factor


class _OptimizerOwnSteps:
    """The schedule of an optimizer that sets its own step size (Adafactor relative_step): nothing to do."""

    def step(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def warmup_steps(warmup: int | float, total: int) -> int:
    """Warm-up in optimizer steps: a whole number as is, a fraction in [0, 1) of the run's steps (newer kohya)."""
    if isinstance(warmup, float) and not warmup.is_integer():
        return int(warmup * total)  # kohya: int(ratio * max_train_steps)
    return int(warmup)


def build_scheduler(optimizer: Any, name: str, warmup: int | float, total: int, *, num_cycles: int = 1,
                    power: float = 1.0, scheduler_type: str = "", scheduler_args: Sequence[str] = ()) -> Any:
    """kohya's get_scheduler_fix: `scheduler_type` (a torch.optim.lr_scheduler class or 'package.module.Class')
    built with `scheduler_args`, else the schedule `name` (`lr_lambda`; ``adafactor[:LR]`` for an Adafactor that
    sets its own step size). Stepped once per optimizer step over `total` steps."""
    kwargs = parse_optimizer_args(list(scheduler_args), "lr_scheduler_args")
    warm = warmup_steps(warmup, total)
    own = any(group["lr"] is None for group in optimizer.param_groups)
    if scheduler_type:
        if warm:  # kohya: "<name> does not require `num_warmup_steps`. Set None or 0."
            raise ConfigError(f"lr_scheduler_type={scheduler_type!r} does not take a warm-up (kohya refuses it too): "
                              f"leave lr_warmup_steps={warmup!r} out, or warm up inside the class's own arguments")
        return _scheduler_class(optimizer, scheduler_type, kwargs)
    if name.split(":")[0] == "adafactor" or own:
        if not own:
            raise ConfigError(f"lr_scheduler={name!r} goes with optimizer_type='Adafactor' and relative_step=True, "
                              "which sets its own step size; this optimizer uses learning_rate: choose another "
                              "lr_scheduler (kohya suggests constant_with_warmup for Adafactor with "
                              "relative_step=False)")
        if warm:
            raise ConfigError(f"lr_warmup_steps={warmup!r} with Adafactor's relative_step=True: its step size is "
                              "its own (kohya: 'adafactor does not require num_warmup_steps'); leave the warm-up out, "
                              "or use warmup_init=True in optimizer_args")
        if name.split(":")[0] not in ("adafactor", "constant"):
            warnings.warn(f"lr_scheduler={name!r} has no effect: Adafactor with relative_step=True sets its own step "
                          "size (kohya switches to its adafactor scheduler too)", stacklevel=2)
        return _OptimizerOwnSteps()
    extra = dict(kwargs)
    unknown = sorted(set(extra) - set(SCHEDULE_ARGS[name]))
    if unknown:
        allowed = ", ".join(SCHEDULE_ARGS[name]) or "none"
        raise ConfigError(f"lr_scheduler_args {', '.join(unknown)}: lr_scheduler={name!r} takes {allowed} (its "
                          "cycles and power come from lr_scheduler_num_cycles / lr_scheduler_power)")
    if name == "piecewise_constant" and extra.get("step_rules") is None:
        raise ConfigError("lr_scheduler='piecewise_constant' needs its rules: lr_scheduler_args "
                          "step_rules='1:100,0.1:200,0.01' (factor 1 below step 100, 0.1 below 200, then 0.01)")
    if warm and name in ("constant", "piecewise_constant"):
        warnings.warn(f"lr_warmup_steps={warmup!r} with lr_scheduler={name!r}: no warm-up (kohya stops for "
                      "'constant' and ignores it for 'piecewise_constant'); use constant_with_warmup for one",
                      stacklevel=2)
    base_lr = float(optimizer.defaults["lr"])  # diffusers' polynomial decays from the optimizer's default
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warm, total, num_cycles=num_cycles,
                                                                  power=power, base_lr=base_lr, options=extra))


def _scheduler_class(optimizer: Any, path: str, kwargs: dict[str, Any]) -> Any:
    """kohya's --lr_scheduler_type: a class of torch.optim.lr_scheduler or 'package.module.Class', built as
    ``Class(optimizer, **lr_scheduler_args)``."""
    import importlib

    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name or "torch.optim.lr_scheduler")
    except ImportError as exc:
        raise ConfigError(f"lr_scheduler_type={path!r}: module {module_name!r} cannot be imported ({exc}); give a "
                          "torch.optim.lr_scheduler class (e.g. 'CosineAnnealingLR') or 'package.module.Class'") \
            from None
    cls: Any = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(f"lr_scheduler_type={path!r}: {module_name or 'torch.optim.lr_scheduler'} has no class "
                          f"{attr!r} (e.g. 'CosineAnnealingLR', 'StepLR', 'OneCycleLR')")
    if issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(f"lr_scheduler_type={path!r} needs the loss at every step, which neither kohya nor "
                          "cascade_lab passes; use a schedule by step (e.g. 'CosineAnnealingLR')")
    factory: Any = cls  # any scheduler class: its own keywords
    try:
        return factory(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lr_scheduler_type={path!r} with lr_scheduler_args {kwargs!r}: {exc}") from None


__all__ = ["SCHEDULE_ARGS", "build_scheduler", "lr_lambda", "step_rules", "warmup_steps"]
