"""kohya's ``--optimizer_type`` names beyond AdamW and Adafactor (train_util.get_optimizer), resolved to the class
kohya builds, with kohya's added defaults and warnings; any other name is a ``torch.optim`` class or a dotted
``package.module.Class``, built as ``Class(params, lr=lr, **optimizer_args)``. No torch import at module level:
`check_name` runs in `TrainConfig.validate`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .config import OPTIMIZERS, ConfigError


@dataclass(frozen=True)
class Kind:
    """One of kohya's names: the module and class it builds, kohya's extra keyword arguments, a note."""

    module: str
    cls: str
    fixed: dict[str, Any] = field(default_factory=dict)  # passed besides optimizer_args (SGD's nesterov=True)
    package: str = ""  # the pip name when the module is not torch's
    bnb: str = ""  # bitsandbytes: what it would have done
    near: str = ""  # bitsandbytes: the nearest optimizer without it
    momentum: bool = False  # kohya sets momentum=0.9 when optimizer_args leaves it out


_ADAM8 = ("AdamW with both moments stored in 8 bits (block-wise quantised; ~2 bytes of state per parameter "
          "instead of 8)", "AdamW")
_PAGED = "; paged: the states live in CUDA unified memory and move to the CPU when the GPU runs short"
_BNB = {
    "adamw8bit": ("AdamW8bit", *_ADAM8),
    "pagedadamw8bit": ("PagedAdamW8bit", _ADAM8[0] + _PAGED, "AdamW"),
    "pagedadamw": ("PagedAdamW", "AdamW with 32-bit states" + _PAGED, "AdamW"),
    "pagedadamw32bit": ("PagedAdamW32bit", "AdamW with 32-bit states" + _PAGED, "AdamW"),
    "lion8bit": ("Lion8bit", "Lion with its momentum stored in 8 bits", "Lion"),
    "pagedlion8bit": ("PagedLion8bit", "Lion with its momentum stored in 8 bits" + _PAGED, "Lion"),
    "sgdnesterov8bit": ("SGD8bit", "SGD with Nesterov momentum stored in 8 bits", "SGDNesterov"),
}
KINDS: dict[str, Kind] = {
    "sgdnesterov": Kind("torch.optim", "SGD", {"nesterov": True}, momentum=True),
    "lion": Kind("lion_pytorch", "Lion", package="lion-pytorch"),
    "dadaptation": Kind("dadaptation.experimental", "DAdaptAdamPreprint", package="dadaptation"),
    "dadaptadampreprint": Kind("dadaptation.experimental", "DAdaptAdamPreprint", package="dadaptation"),
    "dadaptadagrad": Kind("dadaptation", "DAdaptAdaGrad", package="dadaptation"),
    "dadaptadam": Kind("dadaptation", "DAdaptAdam", package="dadaptation"),
    "dadaptadan": Kind("dadaptation", "DAdaptAdan", package="dadaptation"),
    "dadaptadanip": Kind("dadaptation.experimental", "DAdaptAdanIP", package="dadaptation"),
    "dadaptlion": Kind("dadaptation", "DAdaptLion", package="dadaptation"),
    "dadaptsgd": Kind("dadaptation", "DAdaptSGD", package="dadaptation"),
    "prodigy": Kind("prodigyopt", "Prodigy", package="prodigyopt"),
    **{name: Kind("bitsandbytes.optim", cls, {"nesterov": True} if name == "sgdnesterov8bit" else {},
                  package="bitsandbytes", bnb=what, near=near, momentum=name == "sgdnesterov8bit")
       for name, (cls, what, near) in _BNB.items()},
}  # fmt: skip
OWN = OPTIMIZERS  # optim.build_optimizer's own: AdamW, Adafactor
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


# Parameter-sized state tensors of each optimizer, in the parameter's dtype (measured on the installed packages:
# tests/training/test_kohya_optimizers.py); bitsandbytes' 8-bit states are 1 byte a parameter each plus an fp32
# absmax per block of 256 (its blockwise layout; not measured here, it needs CUDA). Prodigy copies a tensor's start
# (p0) only when it is not all zero (a LoRA's up weights are): counted for every tensor, an upper bound
_COPIES = {"sgdnesterov": 1, "lion": 1, "prodigy": 4, "dadaptation": 3, "dadaptadampreprint": 3,
           "dadaptadagrad": 3, "dadaptadam": 3, "dadaptadan": 5, "dadaptadanip": 5, "dadaptlion": 2, "dadaptsgd": 3,
           "pagedadamw": 2, "pagedadamw32bit": 2,
           "adam": 2, "adamw": 2, "radam": 2, "nadam": 2, "adamax": 2, "adagrad": 1, "rmsprop": 1, "sgd": 0}
_EIGHT_BIT = {"adamw8bit": 2, "pagedadamw8bit": 2, "lion8bit": 1, "pagedlion8bit": 1, "sgdnesterov8bit": 1}


_STEP_SCALARS = {"adam": 1, "adamw": 1, "radam": 1, "nadam": 2, "adamax": 1, "adagrad": 1, "rmsprop": 1}


def state_bytes(name: str, kwargs: dict[str, Any], param_bytes: int) -> tuple[float, int] | None:
    """(bytes a trained parameter, bytes a trained tensor) of optimizer state under kohya's `name` with `kwargs`
    (optimizer_args), for parameters of `param_bytes` bytes; None for a class whose states are not known. The
    per-tensor part is torch's step counters (a float32 scalar each; NAdam adds its mu product)."""
    kind = name.lower()
    if kind.startswith("torch.optim."):
        kind = kind.rpartition(".")[2]
    if kind in _EIGHT_BIT:
        return _EIGHT_BIT[kind] * (1 + 4 / 256), 0
    copies = _COPIES.get(kind)
    if copies is None:
        return None
    if kind in ("adam", "adamw", "pagedadamw", "pagedadamw32bit") and kwargs.get("amsgrad"):
        copies += 1  # max_exp_avg_sq
    if kind == "sgd" and kwargs.get("momentum"):
        copies += 1  # momentum_buffer
    if kind == "rmsprop":
        copies += bool(kwargs.get("momentum")) + bool(kwargs.get("centered"))  # momentum_buffer, grad_avg
    if kind in ("pagedadamw", "pagedadamw32bit"):
        return copies * 4.0, 0  # 32-bit states whatever the parameters
    return float(copies * param_bytes), 4 * _STEP_SCALARS.get(kind, 0)


def check_name(name: str) -> None:
    """Raise ConfigError for an optimizer name that cannot work (checked without importing torch or the class)."""
    kind = name.lower()
    if kind in OWN:
        return
    if kind in KINDS:
        spec = KINDS[kind]
        if spec.package and spec.package != "lion-pytorch" and importlib.util.find_spec(spec.module.split(".")[0]) \
                is None:
            raise missing(name, spec)
        return
    if not _DOTTED.fullmatch(name):
        raise ConfigError(f"optimizer_type={name!r}: use one of kohya's names (AdamW, Adafactor, Lion, SGDNesterov, "
                          "Prodigy, DAdaptAdam, AdamW8bit, ...), a torch.optim class (e.g. 'RAdam') or a dotted "
                          "'package.module.Class' (e.g. 'prodigyopt.Prodigy')")
    if kind.startswith("dadapt"):  # kohya: ValueError("Unknown optimizer type")
        raise ConfigError(f"optimizer_type={name!r}: kohya's D-Adaptation names are DAdaptation, DAdaptAdamPreprint, "
                          "DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD")
    if kind.endswith("8bit"):  # kohya: UnboundLocalError
        raise ConfigError(f"optimizer_type={name!r}: kohya's 8-bit names are "
                          f"{', '.join(KINDS[k].cls if k != 'sgdnesterov8bit' else 'SGDNesterov8bit' for k in _BNB)}")


def missing(name: str, spec: Kind, why: str = "is not installed") -> ConfigError:
    """The error for a kohya optimizer whose package cannot be used here."""
    if spec.bnb:
        return ConfigError(f"optimizer_type={name!r}: kohya builds bitsandbytes.optim.{spec.cls} ({spec.bnb}); "
                           f"bitsandbytes {why} (pip install bitsandbytes; its 8-bit and paged optimizers need a "
                           f"CUDA GPU); the nearest optimizer without it is optimizer_type='{spec.near}' (the same "
                           "update with 32-bit states in GPU memory)")
    return ConfigError(f"optimizer_type={name!r}: kohya builds {spec.module}.{spec.cls}; {spec.package} {why}: "
                       f"pip install {spec.package}")


def resolve(name: str) -> tuple[Any, dict[str, Any], Kind | None]:
    """(the class, kohya's fixed keyword arguments, the kohya name's Kind or None) for a name not in OWN."""
    check_name(name)
    spec = KINDS.get(name.lower())
    if spec is not None:
        if spec.module == "lion_pytorch" and importlib.util.find_spec("lion_pytorch") is None:
            from .lion import Lion  # the package's update rule with torch ops

            return Lion, {}, spec
        try:
            module = importlib.import_module(spec.module)
        except Exception as exc:  # bitsandbytes without a usable CUDA set-up fails at import
            raise missing(name, spec, f"cannot be imported ({type(exc).__name__}: {exc})") from None
        cls = getattr(module, spec.cls, None)
        if cls is None:
            raise missing(name, spec, f"has no {spec.cls} (an old version): upgrade it")
        return cls, dict(spec.fixed), spec
    path, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(path or "torch.optim")
    except ImportError as exc:
        raise ConfigError(f"optimizer_type={name!r}: module {path!r} cannot be imported ({exc}); give a torch.optim "
                          "class name (e.g. 'RAdam') or an installed 'package.module.Class'") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        where = path or "torch.optim"
        raise ConfigError(f"optimizer_type={name!r}: {where} has no optimizer class {attr!r}; kohya's names are "
                          "AdamW, Adafactor, Lion, SGDNesterov, Prodigy, DAdapt*, *8bit, or give a torch.optim class "
                          "(e.g. 'RAdam') or 'package.module.Class'")
    return cls, {}, None


def with_kohya_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with what kohya adds for `name`: momentum 0.9 for the Nesterov SGDs, relative_step=True for
    Adafactor (its default, and kohya's correction when warmup_init=True comes with relative_step=False)."""
    kind = name.lower()
    spec = KINDS.get(kind)
    out = dict(kwargs)
    if spec is not None and spec.momentum and "momentum" not in out:
        out["momentum"] = 0.9  # kohya: "SGD with Nesterov must be with momentum, set momentum to 0.9"
    if kind == "adafactor":
        out.setdefault("relative_step", True)
        if out.get("warmup_init"):
            out["relative_step"] = True  # warm-up init only exists for the relative step
    return out


def build(name: str, params: Any, lr: float, kwargs: dict[str, Any]) -> Any:
    """kohya's optimizer `name` (not AdamW/Adafactor) on `params`: ``Class(params, lr=lr, **fixed, **kwargs)``."""
    cls, fixed, _ = resolve(name)
    kwargs = with_kohya_defaults(name, kwargs)
    kind = name.lower()
    if (kind.startswith("dadapt") or kind == "prodigy") and lr <= 0.1:
        warnings.warn(f"learning_rate={lr:g} is low for {name}: D-Adaptation and Prodigy estimate the step size "
                      "themselves and multiply it by the learning rate; kohya recommends learning_rate around 1.0",
                      stacklevel=3)
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ConfigError(f"optimizer_args {', '.join(clash)}: kohya's {name} sets {fixed} itself; leave it out")
    try:
        return cls(params, lr=lr, **fixed, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"optimizer_args {kwargs!r} do not fit {cls.__module__}.{cls.__name__} "
                          f"(optimizer_type={name!r}): {exc}") from None
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"optimizer_type={name!r} ({cls.__module__}.{cls.__name__}) refused learning_rate={lr} / "
                          f"optimizer_args {kwargs!r}: {exc}") from None


def label(optimizer: Any, name: str, kwargs: dict[str, Any]) -> str:
    """kohya's ``ss_optimizer``: ``module.Class`` of the optimizer built, then ``(k=v,...)`` of its arguments as
    given, with kohya's additions (`with_kohya_defaults`)."""
    shown = with_kohya_defaults(name, kwargs)
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in shown.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


__all__ = ["KINDS", "OWN", "build", "check_name", "label", "resolve", "state_bytes"]
