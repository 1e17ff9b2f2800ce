"""`TrainingPanel`: fine-tune Stage C or Stage B from an ipywidgets form, with a live loss plot and sample images.

Start checks the form into a `TrainConfig` (a mistake goes to the panel's error box) and starts the run as a
job of the kernel's shared `Session` (`Session.train`, in the background): no generation can overlap it, and
a generation already running refuses it with the session's message. The run calls back from its own thread
after every step; the callback only sets widget values (progress, status, a throttled loss plot, samples).
Stop asks the run to end after the current step: it saves a resumable checkpoint, whose path the panel shows,
and ticks "resume" so the next Start continues it. ``loss_figure`` draws with a bare matplotlib `Figure`
(no pyplot state), so it works in any thread and in tests.
"""

from __future__ import annotations

import html
import io
import math
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..training import TrainConfig
from .panel import png_bytes
from .session import get_session

MODEL_KEYS = ("stages", "stage_c", "stage_b", "text_encoder", "effnet")  # objects passed through to `training.train`
EMA_BETA = 0.9
LABEL = {"style": {"description_width": "110px"}}


def ema(values: Sequence[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments); non-finite values are skipped."""
    out, avg, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            avg, weight = beta * avg + (1 - beta) * value, beta * weight + (1 - beta)
        out.append(avg / weight if weight else math.nan)
    return out


def loss_figure(run: Any, *, ema_beta: float = EMA_BETA, size: tuple[float, float] = (7.0, 3.2)) -> Any:
    """A matplotlib `Figure` of a `TrainingRun`: raw and weighted loss per step, the EMA of the weighted loss
    and the validation points. Skipped (non-finite) steps are gaps. Uses the Agg canvas, never pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    losses, vals = list(run.losses), list(run.val_losses)  # snapshots: the run may still be appending
    steps = [r["step"] for r in losses]
    weighted = [float(r["loss"]) for r in losses]
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, [float(r["raw_loss"]) for r in losses], color="tab:gray", lw=0.8, alpha=0.6, label="raw loss")
    ax.plot(steps, weighted, color="tab:blue", lw=0.8, alpha=0.6, label="weighted loss")
    ax.plot(steps, ema(weighted, ema_beta), color="tab:blue", lw=2, label=f"EMA (weighted, β={ema_beta:g})")
    ax.plot([v["step"] for v in vals], [float(v["val_loss"]) for v in vals], "o--", color="tab:orange",
            label="validation (raw)")
    ax.set_xlim(0, max(run.total_steps, run.step, 1))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(f"{run.config.name}: step {run.step}/{run.total_steps} ({run.status})", fontsize="medium")
    return fig


def figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


class TrainingPanel:
    """Dataset and settings, Start/Stop, progress, live loss plot and sample images of one training run.

    The form starts from ``config`` (a TrainConfig, dict or TOML path) with ``settings`` (any TrainConfig
    fields, e.g. ``cache_dir`` or ``training_scale``, also those the form does not show) on top. ``stages``,
    ``stage_c``, ``stage_b``, ``text_encoder`` and ``effnet`` are handed to `training.train`. The stage choice
    (C or B) hides what applies to Stage C only (the training scale) and shows what a Stage B run does. The
    plot is redrawn at most every ``plot_interval`` seconds (a drawing takes ~0.15 s of the run's thread) and
    once at the end. Display
    it as the last expression of a cell; `start`, `stop` and `wait` drive it from code, `run` is the newest run.
    """

    def __init__(self, config: Any = None, *, session: Any = None, plot_interval: float = 5.0,
                 keep_samples: int = 24, **settings: Any) -> None:
        self.session = session if session is not None else get_session()
        self.models = {k: settings.pop(k) for k in MODEL_KEYS if k in settings}
        self.base = TrainConfig.coerce(config, **settings)  # checked at Start, when the form is complete
        self.plot_interval, self.keep_samples = plot_interval, keep_samples
        self.run: Any = None
        self.error: BaseException | None = None  # why the last Start failed, or the run's error
        self.display_error: BaseException | None = None  # a failure of the panel's own drawing (the run goes on)
        self._watcher: threading.Thread | None = None
        self._launching = False  # inside `start`, between the checks and the watcher thread
        self._plotted_at = -math.inf
        self._started_at = 0.0
        self._clock: tuple[float, int] | None = None  # (time, step) of this session's first step: the step rate
        self._stop_requested = False  # Stop pressed before `start` had the run object: the callback passes it on
        self._build()

    # -- widgets ---------------------------------------------------------------------------------------
    def _build(self) -> None:
        c, wide = self.base, widgets.Layout(width="99%")  # 100% plus the border spills past the cell
        data = c.train_data_dir or c.dataset_config or ""
        self.dataset = widgets.Text(data, description="dataset", layout=wide, **LABEL,
                                    placeholder="folder of images with caption files, or a kohya dataset TOML")
        self.stage = widgets.Dropdown(options=[("Stage C (prior)", "c"), ("Stage B (decoder)", "b")], value=c.stage,
                                      description="stage", **LABEL)
        self.mode = widgets.Dropdown(options=["lora", "full"], value=c.mode, description="mode", **LABEL)
        self.training_scale = widgets.Dropdown(options=["official", "kohya"], value=c.training_scale,
                                               description="training scale", **LABEL,
                                               tooltip="official: a 1024 px bucket -> 24x24 latents (0.75x); "
                                                       "kohya: EfficientNet sees the bucket as is (32x32)")
        self.stage_note = widgets.HTML(
            "<small>Stage B (official train_b recipe): target the Stage A latent of each image, condition its "
            "EfficientNet latent at a random 0.5-1x size (10 % dropped) and the pooled caption; samples go "
            "through the frozen Stage C, then the trained Stage B and Stage A.</small>", layout=wide)
        from ..plugins import registries

        models = [n for n in registries()["variant"].names() if n != "auto"]
        self.model = widgets.Dropdown(options=models if c.model in models else [*models, c.model], value=c.model,
                                      description="model", **LABEL)
        self.steps = widgets.BoundedIntText(c.max_train_steps, min=1, max=10**8, description="steps", **LABEL)
        self.learning_rate = widgets.FloatText(c.learning_rate, description="learning rate", **LABEL)
        self.batch_size = widgets.BoundedIntText(c.train_batch_size, min=1, max=4096, description="batch size",
                                                 **LABEL)
        self.rank = widgets.BoundedIntText(c.network_dim, min=1, max=1024, description="LoRA rank", **LABEL)
        self.alpha = widgets.FloatText(c.network_alpha, description="LoRA alpha", **LABEL)
        res = c.resolution if isinstance(c.resolution, int) else max(c.resolution)
        self.resolution = widgets.BoundedIntText(res, min=64, max=8192, step=32, description="resolution", **LABEL)
        self.output_dir = widgets.Text(c.output_dir, description="output dir", layout=wide, **LABEL)
        prompts = c.sample_prompts if isinstance(c.sample_prompts, str) else "\n".join(c.sample_prompts or [])
        self.sample_prompts = widgets.Textarea(prompts, description="sample prompts", rows=2, layout=wide, **LABEL,
                                               placeholder="one per line (kohya options: --w 512 --h 512 --s 20 "
                                               "--d SEED --l CFG --n NEGATIVE), or a prompt file")
        self.sample_every = widgets.BoundedIntText(c.sample_every_n_steps or 0, min=0, max=10**8, **LABEL,
                                                   description="sample every", tooltip="steps; 0: never")
        self.val_every = widgets.BoundedIntText(c.val_every_n_steps, min=0, max=10**8, description="validate every",
                                                tooltip="steps; 0: at the start and the end only", **LABEL)
        self.resume = widgets.Checkbox(bool(c.resume), description="resume from the latest checkpoint in output dir",
                                       indent=False, layout=widgets.Layout(width="auto"))
        self.mode.observe(lambda _: self._lora_fields(), "value")
        self._lora_fields()
        self.stage.observe(lambda _: self._stage_fields(), "value")
        self._stage_fields()

        self.start_button = widgets.Button(description="Start", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="warning", icon="stop", disabled=True,
                                          tooltip="end after the current step and save a resumable checkpoint")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = widgets.IntProgress(value=0, min=0, max=max(1, c.max_train_steps),
                                            layout=widgets.Layout(width="300px"))
        self.status = widgets.HTML("")
        self.checkpoint = widgets.HTML("")
        self.error_box = widgets.HTML("", layout=wide)
        self.plot = widgets.Image(format="png", layout=widgets.Layout(width="560px"))
        self.gallery = widgets.HBox([], layout=widgets.Layout(flex_flow="row wrap"))

        row = widgets.HBox
        self.widget = widgets.VBox([
            self.dataset, row([self.stage, self.training_scale]), self.stage_note, row([self.mode, self.model]),
            row([self.steps, self.learning_rate]),
            row([self.batch_size, self.resolution]), row([self.rank, self.alpha]), self.output_dir,
            self.sample_prompts, row([self.sample_every, self.val_every]), self.resume,
            row([self.start_button, self.stop_button, self.progress, self.status],  # the status wraps below
                layout=widgets.Layout(flex_flow="row wrap", align_items="center")), self.checkpoint,
            self.error_box, self.plot, self.gallery,
        ])

        from .display import guard_finite

        for box in (self.learning_rate, self.alpha):
            guard_finite(box, self._show_error)

    def _lora_fields(self) -> None:
        self.rank.disabled = self.alpha.disabled = self.mode.value != "lora"

    def _stage_fields(self) -> None:
        """Stage B: hide the Stage C training scale (Stage B trains on the image itself), show the recipe note."""
        b = self.stage.value == "b"
        self.training_scale.layout.display = "none" if b else None
        self.stage_note.layout.display = None if b else "none"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- reading the form ------------------------------------------------------------------------------
    def config(self) -> TrainConfig:
        """The form as a checked `TrainConfig` (raises ValueError / ConfigError naming a wrong value)."""
        base = self.base
        values: dict[str, Any] = {
            "stage": self.stage.value, "training_scale": self.training_scale.value,
            "mode": self.mode.value, "model": self.model.value, "max_train_steps": self.steps.value,
            "learning_rate": self.learning_rate.value, "train_batch_size": self.batch_size.value,
            "network_dim": self.rank.value, "network_alpha": self.alpha.value, "output_dir": self.output_dir.value,
            "val_every_n_steps": self.val_every.value, "sample_every_n_steps": self.sample_every.value or None,
            "resume": (base.resume or "auto") if self.resume.value else None,
        }  # fmt: skip
        if isinstance(base.resolution, int) or self.resolution.value != max(base.resolution):
            values["resolution"] = self.resolution.value  # a [w, h] from the config stays unless changed
        lines = [line.strip() for line in self.sample_prompts.value.splitlines() if line.strip()]
        single_file = len(lines) == 1 and Path(lines[0]).suffix in (".txt", ".toml", ".json")
        values["sample_prompts"] = lines[0] if single_file else (lines or None)
        if values["sample_prompts"] and not values["sample_every_n_steps"]:
            raise ValueError("sample prompts are set but 'sample every' is 0: give a number of steps (or clear the "
                             "prompts)")
        if not values["output_dir"].strip():
            raise ValueError("output dir is empty: name a folder for checkpoints, samples and the model file")
        text = self.dataset.value.strip()
        if text:
            path = Path(text).expanduser()
            if path.is_dir():
                values.update(train_data_dir=str(path), dataset_config=None, dataset=None)
            elif path.is_file() and path.suffix == ".toml":
                values.update(dataset_config=str(path), train_data_dir=None, dataset=None)
            elif path.exists():
                raise ValueError(f"dataset {text!r} is a file but not a .toml: give a folder of images with caption "
                                 "files, or a kohya dataset TOML")
            else:
                raise ValueError(f"dataset {text!r} does not exist: give a folder of images with caption files, "
                                 "or a kohya dataset TOML")
        elif not base.dataset:
            raise ValueError("no dataset: give a folder of images with caption files, or a kohya dataset TOML")
        return TrainConfig.coerce(base, **values).validate()

    # -- running ---------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._launching or (self._watcher is not None and self._watcher.is_alive())

    def start(self) -> bool:
        """Start a run from the form in the background; False (with the reason in the panel) if it cannot start."""
        if self.running:
            self._show_error("a training run is already running in this panel; wait for it or press Stop")
            return False
        self.error, self.display_error, self.error_box.value = None, None, ""
        self._launching = True
        try:
            cfg = self.config()
            self.progress.value, self.progress.max, self.progress.bar_style = 0, cfg.max_train_steps, ""
            self._set_running(True, "starting: models, latent and text caches…")
            self.checkpoint.value, self._plotted_at, self._started_at = "", -math.inf, time.monotonic()
            self._clock, self._stop_requested = None, False
            run = self.session.train(cfg, callback=self._on_event, background=True, **self.models)
        except Exception as exc:  # a wrong setting, or the session is busy with another job
            self.error = exc
            self._show_error(f"{type(exc).__name__}: {exc}")
            self._set_running(False, "not started")
            return False
        else:
            self.run = run
            self._watcher = threading.Thread(target=self._watch, args=(run,), daemon=True,
                                             name="cascade_lab-train-panel")
            self._watcher.start()
            return True
        finally:
            self._launching = False

    def stop(self) -> None:
        """End the run after the current step; it saves a checkpoint that a resumed run continues exactly."""
        if not self.running:
            return
        self._stop_requested = True
        if self.run is not None:
            self.run.stop()
        self.stop_button.disabled = True
        self.status.value = "stopping after the current step (then saving a checkpoint)…"

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the run has ended and freed the session; the `TrainingRun` (None before any Start)."""
        if self._watcher is not None:
            self._watcher.join(timeout)
            if self._watcher.is_alive():
                raise TimeoutError(f"the training run did not end within {timeout} s")
        return self.run

    def figure(self) -> Any:
        """The loss plot of the newest run now (a matplotlib Figure), or None before any Start."""
        return loss_figure(self.run) if self.run is not None else None

    def _watch(self, run: Any) -> None:
        run.wait()
        if self.session.training is run:
            self.session.wait_training()  # the session is free again when the panel says "finished"
        try:
            self._finish(run)
        except Exception as exc:
            self._display_failed(exc)
            self._set_running(False, run.status)

    def _on_event(self, event: Any) -> None:
        """The run's callback (its thread): progress, status, the plot (throttled), samples and checkpoints."""
        try:
            run = event.run
            if self._stop_requested and not run.stop_requested:
                run.stop()
            if event.kind == "step":
                d = event.data
                self.progress.max, self.progress.value = max(1, event.total_steps), event.step
                now, speed = time.monotonic(), ""
                if self._clock is None:
                    self._clock = (now, event.step)
                elif event.step > self._clock[1]:
                    rate = (now - self._clock[0]) / (event.step - self._clock[1])
                    speed = f"  ({rate:.2f} s/step, ~{(event.total_steps - event.step) * rate:.0f} s left)"
                if not run.stop_requested:
                    self.status.value = html.escape(f"step {event.step}/{event.total_steps}  loss {d['loss']:.4f}  "
                                                    f"raw {d['raw_loss']:.4f}  lr {d['lr']:.3g}{speed}")
                self._plot(run)
            elif event.kind == "val":
                self._plot(run)
            elif event.kind == "sample":
                items = [self._sample_item(s) for s in event.data["images"]]
                self.gallery.children = (*items, *self.gallery.children)[:self.keep_samples]
            elif event.kind == "checkpoint":
                folder, file = (html.escape(str(event.data[k])) for k in ("folder", "file"))
                self.checkpoint.value = (f"checkpoint after step {event.step}: <code>{folder}</code>; model file "
                                         f"<code>{file}</code>")
        except Exception as exc:  # a drawing failure must not end a training run
            self._display_failed(exc)

    def _plot(self, run: Any, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._plotted_at >= self.plot_interval:
            self._plotted_at = now
            self.plot.value = figure_png(loss_figure(run))

    def _finish(self, run: Any) -> None:
        self._plot(run, force=True)
        where = f"step {run.step}/{run.total_steps}" if run.total_steps else "set-up (before the first step)"
        if run.status == "finished":
            self.progress.bar_style = "success"
            message = f"finished at {where} in {time.monotonic() - self._started_at:.0f} s; model {run.output_file}"
        elif run.status == "stopped" and run.last_checkpoint is None:  # stopped before any step: nothing to keep
            self.progress.bar_style = "warning"
            message = f"stopped at {where}: no step was taken, so no checkpoint was written (Start begins anew)"
        elif run.status == "stopped":
            self.progress.bar_style = "warning"
            self.resume.value = True  # the next Start continues from the checkpoint
            message = f"stopped at {where}; resumable checkpoint {run.last_checkpoint} (Start resumes it)"
        else:
            self.progress.bar_style = "danger"
            message = f"{run.status} at {where}"
            if run.error is not None:
                self.error = run.error
                details = "".join(traceback.format_exception(type(run.error), run.error, run.error.__traceback__))
                self._show_error(f"{type(run.error).__name__}: {run.error}", details)
                run.error = run.error.with_traceback(None)  # the message stays; the frames (and tensors) go
        self._set_running(False, message)

    def _set_running(self, running: bool, message: str) -> None:
        self.start_button.disabled, self.stop_button.disabled = running, not running
        self.status.value = html.escape(message)

    def _show_error(self, message: str, details: str = "") -> None:
        self.status.value = ""  # a new error never sits beside an old status
        body = f"<b>{html.escape(message)}</b>"
        if details:
            body = f"<details><summary>{body}</summary><pre>{html.escape(details)}</pre></details>"
        self.error_box.value = f'<div style="color:#b00020">{body}</div>'

    def _display_failed(self, exc: Exception) -> None:
        self.display_error = exc
        self._show_error(f"the panel could not draw ({type(exc).__name__}: {exc}); the run goes on",
                         traceback.format_exc())

    @staticmethod
    def _sample_item(sample: Any) -> widgets.VBox:
        image = sample.image if sample.image is not None else sample.preview
        caption = f"step {sample.step}: {sample.prompt.prompt}"
        return widgets.VBox([widgets.Image(value=png_bytes(image), format="png", layout=widgets.Layout(width="160px")),
                             widgets.HTML(f"<small>{html.escape(caption)}</small>",
                                          layout=widgets.Layout(width="160px"))])


__all__ = ["TrainingPanel", "ema", "figure_png", "loss_figure"]
