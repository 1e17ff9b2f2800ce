"""One generation session per kernel, shared by the ``%%cascade`` magic and the ipywidgets panels.

It keeps the loaded `Cascade` objects (one per variant, device and dtype), runs one job at a time
(a generation or a training run), owns the cancel token of the running job, remembers the defaults and
the last results. A panel's Cancel/Stop button and ``%cascade cancel`` both call `Session.cancel`.
Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

Key = tuple[str, "str | None", "str | None"]  # (variant, device, dtype) of a cached Cascade


@dataclass
class Defaults:
    """What a job uses for every option it does not give (official Stable Cascade values)."""

    variant: str = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: the device's best (bf16 on recent GPUs, fp32 on the CPU)
    width: int = 1024
    height: int = 1024
    steps_c: int = 20
    steps_b: int = 10
    cfg_c: float = 4.0
    cfg_b: float = 1.1
    sampler: str = "ddpm"  # both stages
    scheduler: str = "cosine"  # both stages
    compat: str = "official"  # "comfyui": ComfyUI's seeding, sizes, samplers (unset sampler/scheduler: ComfyUI's)
    preview: bool = True  # live Stage C previews while a job runs
    preview_interval: float = 0.5  # seconds between two preview updates
    keep_trajectory: bool = True  # keep each step's latent for the latent inspector


class JobRunning(RuntimeError):
    """A job was started while another one runs; the session runs one at a time."""


class LoraUnavailable(RuntimeError):
    """This version's `Cascade` cannot apply LoRA files."""


@dataclass(frozen=True)
class JobInfo:
    """The running job: a short label and when it started (``time.monotonic``)."""

    label: str
    started: float


def check_default(name: str, value: Any) -> Any:
    """``value`` for the default ``name``, converted and checked; ValueError naming both otherwise."""
    from .. import plugins

    fields = {f.name: f for f in dataclasses.fields(Defaults)}
    if name not in fields:
        raise ValueError(f"unknown default {name!r}; known: {', '.join(fields)}")
    try:
        if name in ("device", "dtype"):
            value = None if value in (None, "", "auto", "None") else str(value)
            if name == "dtype" and value not in (None, "float32", "bfloat16"):
                raise ValueError("use float32 or bfloat16 (Stage C is never run in float16)")
        elif name in ("width", "height", "steps_c", "steps_b"):
            value = int(value)
            if value < (128 if name in ("width", "height") else 1) or (name in ("width", "height") and value % 8):
                raise ValueError("use a positive whole number (sizes: ≥ 128, multiples of 8)")
        elif name in ("cfg_c", "cfg_b", "preview_interval"):
            value = float(value)
            if value < 0:
                raise ValueError("use a number ≥ 0")
        elif name in ("preview", "keep_trajectory"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                    raise ValueError("use true or false")
                value = value.lower() in ("true", "1", "on", "yes")
            value = bool(value)
        else:
            value = str(value)
            if name == "compat":
                if value not in plugins.COMPATS:
                    raise ValueError(f"use one of {', '.join(plugins.COMPATS)}")
            elif name == "variant":
                if value != "auto":
                    plugins.get_variant(value)
            elif name in ("sampler", "scheduler"):
                known_name(name, value)
    except KeyError as exc:  # an unknown registered name: the message lists the available ones
        raise ValueError(f"{name}={value!r}: {str(exc).strip(chr(39))}") from None
    except ValueError as exc:
        raise ValueError(f"{name}={value!r}: {exc}") from None
    return value


def known_name(kind: str, name: str, compat: str | None = None) -> None:
    """Raise the registry's KeyError (listing the names) unless ``name`` is a sampler / scheduler in ``compat``
    (None: in either mode, i.e. a registered name or one of ComfyUI's plain names)."""
    from .. import plugins

    getter = plugins.get_sampler if kind == "sampler" else plugins.get_scheduler
    if compat is not None:
        getter(name, compat)
        return
    try:
        getter(name, "official")
    except KeyError:
        getter(name, "comfyui")


def free_memory() -> None:
    """Collect garbage and hand cached GPU memory back (after a cancelled or interrupted job)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Session:
    """Loaded cascades, one job at a time, the cancel token, defaults and recent results."""

    def __init__(self, defaults: Defaults | None = None, *, max_loaded: int = 1, keep_results: int = 8) -> None:
        self.defaults = defaults or Defaults()
        self.max_loaded = max_loaded  # loaded variants kept at once (each holds its models in memory)
        self.results: deque[Any] = deque(maxlen=keep_results)  # newest last
        self.listeners: list[Callable[[Any], Any]] = []  # called with each new Result
        self._cascades: OrderedDict[Key, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._running: JobInfo | None = None
        self._token: Any = None
        self._training: tuple[Any, threading.Thread] | None = None  # (TrainingRun, the thread holding the job)

    # -- defaults --------------------------------------------------------------------------------------
    def configure(self, **changes: Any) -> Defaults:
        """Change defaults (checked first: nothing changes when one value is wrong)."""
        checked = {name: check_default(name, value) for name, value in changes.items()}
        self.defaults = dataclasses.replace(self.defaults, **checked)
        return self.defaults

    # -- cascades --------------------------------------------------------------------------------------
    def key(self, variant: str | None = None, device: str | None = None, dtype: str | None = None) -> Key:
        d = self.defaults
        return (variant or d.variant, device or d.device, dtype or d.dtype)

    def cascade(self, variant: str | None = None, device: str | None = None, dtype: str | None = None) -> Any:
        """The `Cascade` for (variant, device, dtype), defaults filling the gaps; models load on first use.

        At most ``max_loaded`` are kept: the least recently used one is dropped (and its memory freed).
        """
        key = self.key(variant, device, dtype)
        if key in self._cascades:
            self._cascades.move_to_end(key)
            return self._cascades[key]
        from ..api import Cascade

        return self.use(Cascade(key[0], device=key[1], dtype=key[2]))

    def use(self, cascade: Any) -> Any:
        """Adopt a `Cascade` built elsewhere (custom weight paths, say) under its (variant, device, dtype)."""
        key = (cascade.variant, cascade.device, cascade.dtype)
        self._cascades[key] = cascade
        self._cascades.move_to_end(key)
        evicted = False
        while len(self._cascades) > max(1, self.max_loaded):
            self._cascades.popitem(last=False)
            evicted = True
        if evicted:
            free_memory()
        return cascade

    @property
    def loaded(self) -> list[Key]:
        return list(self._cascades)

    def unload(self) -> None:
        """Drop every loaded cascade and free its memory (refused while a job runs)."""
        with self.job("unload"):
            self._cascades.clear()
        free_memory()

    # -- jobs ------------------------------------------------------------------------------------------
    @property
    def token(self) -> Any:
        """The `CancelToken` the running (or next) job polls between steps."""
        if self._token is None:
            from ..pipeline import CancelToken

            self._token = CancelToken()
        return self._token

    @property
    def running(self) -> JobInfo | None:
        return self._running

    @property
    def busy(self) -> bool:
        return self._running is not None

    @contextmanager
    def job(self, label: str) -> Iterator[JobInfo]:
        """Hold the session for one job; `JobRunning` at once if another job holds it."""
        if not self._lock.acquire(blocking=False):
            running = self._running
            what = f"{running.label} (started {time.monotonic() - running.started:.0f} s ago)" if running else label
            raise JobRunning(f"a cascade_lab job is already running: {what}; wait for it to finish or cancel "
                             "it (%cascade cancel, or the panel's Cancel button)")
        try:
            self.token.reset()
            self._running = info = JobInfo(label, time.monotonic())
            yield info
        finally:
            self._running = None
            self._lock.release()

    def cancel(self) -> bool:
        """Ask the running job to stop before its next step; False when no job runs.

        A training run stops after the step under way and saves a resumable checkpoint first.
        """
        if self._running is None:
            return False
        self.token.cancel()
        if self._training is not None:
            self._training[0].stop()
        return True

    # -- training --------------------------------------------------------------------------------------
    def train(self, config: Any = None, *, callback: Callable[[Any], Any] | None = None, background: bool = False,
              **kwargs: Any) -> Any:
        """`cascade_lab.training.train` as a session job: no generation can start until the run has ended.

        Arguments as `training.train`; the config is checked here, so a mistake raises at once, and so does
        `JobRunning`. Returns the `TrainingRun`: when it ends, or at once with ``background`` (then
        `wait_training` blocks until the run has ended *and* freed the session). `cancel` (the panel's Stop,
        ``%cascade cancel``) or Ctrl-C in the foreground stops it after the current step, with a checkpoint.
        """
        from ..training import TrainConfig
        from ..training import train as run_training

        models = {k: kwargs.pop(k) for k in ("stages", "stage_c", "stage_b", "text_encoder", "effnet") if k in kwargs}
        cfg = TrainConfig.coerce(config, **kwargs).validate()
        started, box = threading.Event(), {}  # box: the run, or what stopped it from starting

        def hold() -> None:
            try:
                with self.job(f"training {cfg.name!r} ({cfg.mode}, into {cfg.output_dir})"):
                    run = run_training(cfg, callback=callback, stop=self.token, background=True, **models)
                    box["run"], self._training = run, (run, threading.current_thread())
                    started.set()
                    run.wait()
            except BaseException as exc:  # JobRunning or a config the run refused: raised in the caller
                box["error"] = exc
            finally:
                if self._training is not None and self._training[1] is threading.current_thread():
                    self._training = None  # after the job is released: `wait_training` returns on a free session
                started.set()

        threading.Thread(target=hold, daemon=True, name=f"cascade_lab session train {cfg.name}").start()
        started.wait()
        if "run" not in box:
            raise box["error"]
        run = box["run"]
        if not background:
            try:
                self.wait_training()
            except KeyboardInterrupt:  # the run stops after this step and saves; a second Ctrl-C stops waiting
                run.stop()
                self.wait_training()
        return run

    @property
    def training(self) -> Any:
        """The `TrainingRun` holding the session, or None."""
        return self._training[0] if self._training is not None else None

    def wait_training(self, timeout: float | None = None) -> Any:
        """Block until the session's training run has ended and freed the session; that run (None if none)."""
        held = self._training
        if held is None:
            return None
        held[1].join(timeout)
        return held[0]

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 variant: str | None = None,
                 device: str | None = None, dtype: str | None = None, loras: Sequence[tuple[str, float]] | None = None,
                 callback: Callable[[Any], Any] | None = None, keep_trajectory: bool | None = None,
                 **options: Any) -> Any:
        """`Cascade.generate` on the session's cascade, with the defaults for every option not given.

        ``options`` are `Cascade.generate`'s keywords (``width``, ``seed``, ``steps_c``, ``image``, ...).
        ``loras`` [(file, strength)]: the Stage C LoRAs of this job, loaded, re-weighted or unloaded on the
        cached cascade to match (None leaves loaded LoRAs as they are). Raises `JobRunning`, `LoraUnavailable`,
        or `Cancelled` when `cancel` was called; after a cancel or a KeyboardInterrupt call `free_memory()`
        once the exception is handled.
        """
        d = self.defaults
        compat = options.get("compat", d.compat)
        kwargs: dict[str, Any] = {"width": d.width, "height": d.height, "steps_c": d.steps_c, "steps_b": d.steps_b,
                                  "cfg_c": d.cfg_c, "cfg_b": d.cfg_b, "compat": compat}
        official = Defaults()
        if compat == "comfyui":  # ComfyUI's sampler, scheduler and (with an image) sizes, unless set here
            if "image" in options and (d.width, d.height) == (official.width, official.height):
                del kwargs["width"], kwargs["height"]
            if d.sampler != official.sampler:
                kwargs["sampler_c"] = kwargs["sampler_b"] = d.sampler
            if d.scheduler != official.scheduler:
                kwargs["scheduler_c"] = kwargs["scheduler_b"] = d.scheduler
        else:
            kwargs.update(sampler_c=d.sampler, sampler_b=d.sampler, scheduler_c=d.scheduler, scheduler_b=d.scheduler)
        kwargs.update(options)
        first = prompt if isinstance(prompt, str) else prompt[0]
        label = "generate " + repr(first if len(first) <= 40 else first[:39] + "…")
        with self.job(label):
            cascade = self.cascade(variant, device, dtype)
            self._apply_loras(cascade, loras)
            result = cascade.generate(prompt, negative_prompt, callback=callback, cancel=self.token,
                                      keep_trajectory=d.keep_trajectory if keep_trajectory is None
                                      else keep_trajectory, **kwargs)
        self.results.append(result)
        for listener in list(self.listeners):
            try:
                listener(result)
            except Exception as exc:  # a broken panel must not lose the result
                warnings.warn(f"cascade_lab session listener {listener!r} failed: {exc}", stacklevel=2)
        return result

    @staticmethod
    def _apply_loras(cascade: Any, loras: Sequence[tuple[str, float]] | None) -> None:
        """Make the cascade carry exactly ``loras`` (None: leave whatever is loaded)."""
        if loras is None:
            return
        if not hasattr(cascade, "load_lora"):
            if loras:
                raise LoraUnavailable("LoRA not available in this version")
            return
        wanted = {str(path): float(strength) for path, strength in loras}
        for path, _, _ in list(cascade.loras):
            if path not in wanted:
                cascade.unload_lora(path)
        loaded = {path: strength for path, strength, _ in cascade.loras}
        for path, strength in wanted.items():
            if path not in loaded:
                cascade.load_lora(path, strength)
            elif loaded[path] != strength:
                cascade.set_lora_strength(path, strength)

    @property
    def last_result(self) -> Any:
        return self.results[-1] if self.results else None


_session: Session | None = None


def get_session() -> Session:
    """The kernel's shared session (created on first use)."""
    global _session
    if _session is None:
        _session = Session()
    return _session


__all__ = ["Defaults", "JobInfo", "JobRunning", "LoraUnavailable", "Session", "check_default", "free_memory",
           "get_session"]
