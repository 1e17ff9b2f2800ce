"""`GenerationPanel`: an ipywidgets form for Stable Cascade with live preview, Cancel and a gallery.

Threading: Generate snapshots the form into a `GenerationParams` (checked at once; a mistake goes to the
panel's error box), then runs the job through the kernel's shared `Session` in one worker thread, so the
kernel stays free to handle the Cancel click. The pipeline calls back after every sampler step from that
thread; the callback only sets widget values (progress, status, preview) and, once Cancel was pressed,
cancels the session's token, which the sampler polls before its next step: a job stops within one step.
One job at a time: the button is disabled while the panel's job runs, and the session refuses a second
job (a ``%%cascade`` cell or another panel) with a message shown in the panel.
"""

from __future__ import annotations

import ast
import html
import io
import random
import shlex
import threading
import time
import traceback
from typing import Any

import ipywidgets as widgets

from ..params import GenerationParams
from .control_section import ControlSection
from .display import guard_finite, preview_jpeg
from .session import free_memory, get_session

# Stable Cascade was trained around one megapixel; these are the commonly used aspect ratios
SIZE_PRESETS: list[tuple[int, int]] = [
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
    (1536, 640), (640, 1536), (768, 768), (512, 512), (256, 256), (128, 128),
]
STAGE_FIELDS = ("steps", "cfg", "shift", "sampler", "scheduler")
# `GenerationParams` fields a panel job passes to `Session.generate` (besides prompt, negative and variant)
JOB_FIELDS = ("width", "height", "batch_size", "seed", "steps_c", "steps_b", "cfg_c", "cfg_b", "shift_c", "shift_b",
              "sampler_c", "sampler_b", "scheduler_c", "scheduler_b", "cfg_rho", "compression", "compat", "denoise",
              "seed_b")


def cascade_cell(params: GenerationParams) -> str:
    """The ``%%cascade`` cell that regenerates ``params``.

    Every option the session defaults could change is written out (seed, size, variant, steps, CFG, sampler,
    scheduler), the rest only when it differs from the official value; the negative prompt goes in the body
    after the separator line, so no quoting can break it.
    """
    from .options import NEGATIVE_SEPARATOR, NEXT_SEPARATOR

    def cfg(value: float | tuple[float, float]) -> str:
        return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"

    base = GenerationParams("")
    words = [f"--seed {params.seed}", f"--size {params.width}x{params.height}",
             f"--variant {params.variant}", f"--steps-c {params.steps_c}", f"--steps-b {params.steps_b}",
             f"--cfg-c {cfg(params.cfg_c)}", f"--cfg-b {cfg(params.cfg_b)}"]
    if params.compat != base.compat:
        words.append(f"--compat {params.compat}")
    if params.seed_b is not None:
        words.append(f"--seed-b {params.seed_b}")
    if params.denoise != base.denoise:
        words.append(f"--denoise {params.denoise:g}")
    if params.compression != base.compression:
        words.append(f"--compression {params.compression:g}")
    words += [f"--shift-{s} {getattr(params, f'shift_{s}'):g}" for s in ("c", "b")
              if getattr(params, f"shift_{s}") != getattr(base, f"shift_{s}")]
    for kind in ("sampler", "scheduler"):
        c, b = getattr(params, f"{kind}_c"), getattr(params, f"{kind}_b")
        words += [f"--{kind} {c}"] if c == b else [f"--{kind}-c {c}", f"--{kind}-b {b}"]
    if params.batch_size != 1 and isinstance(params.prompt, str):
        words.append(f"--batch {params.batch_size}")
    if params.cfg_rho != base.cfg_rho:
        words.append(f"--cfg-rescale {params.cfg_rho:g}")
    words += control_flags(params)

    def section(value: str | tuple[str, ...]) -> str:
        return value if isinstance(value, str) else f"\n{NEXT_SEPARATOR}\n".join(value)

    negative = params.negative_prompt
    if isinstance(negative, tuple) and len(set(negative)) == 1:
        negative = negative[0]
    body = section(params.prompt) + (f"\n{NEGATIVE_SEPARATOR}\n{section(negative)}" if any(negative) else "")
    return "%%cascade " + " ".join(words) + "\n" + body


def control_flags(params: GenerationParams) -> list[str]:
    """``--control KIND:IMAGE:STRENGTH`` per recorded control, ``--mask`` (boxes or a file) and ``--controlnet`` (when
    every control names its file, as the magic needs). Start/end have no flag: the magic applies a control on
    every step."""
    words = [f"--control {shlex.quote(f'{kind}:{image}:{strength:g}')}"
             for kind, image, strength, *_ in params.controls]
    masks = [mask for kind, _, _, _, _, mask, *_ in params.controls if kind == "inpainting" and mask]
    if masks:
        boxes = masks[0].startswith("[")  # a recorded list of (x0, y0, x1, y1)
        text = ";".join(",".join(str(v) for v in box) for box in ast.literal_eval(masks[0])) if boxes else masks[0]
        words.append(f"--mask {shlex.quote(text)}")
    files = [record[6] for record in params.controls]
    for flag, index in (("--mask-grow", 7), ("--mask-feather", 8)):
        value = next((r[index] for r in params.controls if r[0] == "inpainting" and r[index]), 0)
        if value:
            words.append(f"{flag} {value}")
    if files and all(files):
        words += [f"--controlnet {shlex.quote(file)}" for file in files]
    return words


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes (for `widgets.Image`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


ROW = dict(flex_flow="row wrap", align_items="center")  # rows wrap at a narrow window instead of spilling


def _slider(kind: type, value: float, low: float, high: float, step: float, label: str) -> Any:
    """A slider whose range always contains ``value`` (a default outside the usual range is kept, not clamped)."""
    return kind(value=value, min=min(low, value), max=max(high, value), step=step, description=label,
                continuous_update=False, style={"description_width": "70px"})


class GenerationPanel:
    """Prompt, sizes, per-stage settings, seed, sampler/scheduler/variant, a ControlNet (`ControlSection`),
    Generate/Cancel, preview, gallery.

    The form starts from the session's defaults (``%cascade config``); ``defaults`` are any `GenerationParams`
    fields (e.g. ``width=128, steps_c=4``) to start from instead. An uploaded control image or mask is written to
    ``upload_folder`` when a job starts, so the result's parameters name a file. Display it as the last
    expression of a cell; `generate`, `cancel` and `wait` drive it from code.
    """

    def __init__(self, variant: str | None = None, *, prompt: str = "", session: Any = None,
                 keep_trajectory: bool | None = None, keep_results: int = 12,
                 upload_folder: str = "cascade_inputs", **defaults: Any) -> None:
        self.session = session if session is not None else get_session()
        d = self.session.defaults
        start: dict[str, Any] = {"width": d.width, "height": d.height, "steps_c": d.steps_c, "steps_b": d.steps_b,
                                 "cfg_c": d.cfg_c, "cfg_b": d.cfg_b, "sampler_c": d.sampler, "sampler_b": d.sampler,
                                 "scheduler_c": d.scheduler, "scheduler_b": d.scheduler}
        self.base = GenerationParams(prompt, **(start | defaults)).validate()
        variant = variant or d.variant
        self.keep_trajectory = keep_trajectory  # None: the session's default at each run
        self.keep_results = keep_results  # the gallery (and `results`) keep the newest ones; each holds its latents
        self.results: list[Any] = []
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._cancel_requested = threading.Event()
        self._job_started, self._job_variant = False, variant
        self._preview_at: float | None = None
        self._seen_registries: Any = None
        self._steps_c = 0
        self._build(variant, upload_folder)
        self.refresh_options()

    # -- widgets ---------------------------------------------------------------------------------------
    def _build(self, variant: str, upload_folder: str) -> None:
        p, wide = self.base, widgets.Layout(width="99%")  # 100% plus the widget's border spills past the cell
        self.prompt = widgets.Textarea(p.prompt, placeholder="prompt", rows=2, layout=wide)
        self.negative = widgets.Textarea(p.negative_prompt, placeholder="negative prompt", rows=1, layout=wide)
        sizes = SIZE_PRESETS if (p.width, p.height) in SIZE_PRESETS else [*SIZE_PRESETS, (p.width, p.height)]
        self.size = widgets.Dropdown(options=[(f"{w} × {h}", (w, h)) for w, h in sizes] + [("custom", None)],
                                     value=(p.width, p.height), description="size")
        self.width = widgets.IntText(p.width, description="width", layout=widgets.Layout(width="160px"))
        self.height = widgets.IntText(p.height, description="height", layout=widgets.Layout(width="160px"))
        self.batch_size = widgets.BoundedIntText(p.batch_size, min=1, max=max(16, p.batch_size), description="batch",
                                                 layout=widgets.Layout(width="160px"))
        self.size.observe(self._on_preset, "value")
        self.width.observe(self._on_dimension, "value")
        self.height.observe(self._on_dimension, "value")

        self.stage: dict[str, dict[str, Any]] = {}
        # max steps (typed values above a slider's max are clamped by the browser: 1000 leaves room for any
        # schedule; ComfyUI's KSampler allows 10000), cfg, shift
        ranges = {"c": (1000, 20.0, 10.0), "b": (1000, 10.0, 10.0)}
        for s in ("c", "b"):
            max_steps, max_cfg, max_shift = ranges[s]
            self.stage[s] = {
                "steps": _slider(widgets.IntSlider, getattr(p, f"steps_{s}"), 1, max_steps, 1, "steps"),
                "cfg": _slider(widgets.FloatSlider, getattr(p, f"cfg_{s}"), 0.0, max_cfg, 0.05, "CFG"),
                "shift": _slider(widgets.FloatSlider, getattr(p, f"shift_{s}"), 0.1, max_shift, 0.1, "shift"),
                "sampler": widgets.Dropdown(options=[getattr(p, f"sampler_{s}")], description="sampler"),
                "scheduler": widgets.Dropdown(options=[getattr(p, f"scheduler_{s}")], description="scheduler"),
            }
        seed = p.seed if p.seed is not None else random.randrange(2**32)
        self.seed = widgets.IntText(seed, description="seed", layout=widgets.Layout(width="220px"))
        self.randomise = widgets.Button(icon="random", tooltip="draw a new random seed",
                                        layout=widgets.Layout(width="auto", min_width="40px"))
        self.new_seed_each_run = widgets.Checkbox(p.seed is None, description="new seed each run", indent=False)
        self.randomise.on_click(lambda _: self.randomise_seed())
        self._drawing_seed = False
        self.seed.observe(self._on_seed_typed, "value")
        self.variant = widgets.Dropdown(options=[variant], value=variant, description="variant")
        self.compat = widgets.Dropdown(options=[("official", "official"), ("ComfyUI", "comfyui")], value=p.compat,
                                       description="compat", tooltip="comfyui: ComfyUI's seeding, sizes, CFG and "
                                       "samplers: ComfyUI's image for ComfyUI's seed and settings")
        self.denoise = widgets.BoundedFloatText(p.denoise, min=0.01, max=1.0, step=0.05, description="denoise",
                                                layout=widgets.Layout(width="160px"))
        self.compat.observe(self._on_compat, "value")
        self.refresh = widgets.Button(icon="refresh", tooltip="reload the sampler, scheduler and variant lists "
                                      "(plugins registered since)", layout=widgets.Layout(width="auto",
                                                                                          min_width="40px"))
        self.refresh.on_click(lambda _: self.refresh_options())

        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", button_style="danger", icon="stop", disabled=True)
        self.generate_button.on_click(lambda _: self.generate())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="300px"))
        self.status = widgets.HTML("")
        self.error_box = widgets.HTML("", layout=wide)
        self.preview = widgets.Image(format="png", layout=widgets.Layout(width="192px"))
        self.gallery = widgets.VBox([])
        self.inspector_box = widgets.VBox([])
        self.copy_area = widgets.Textarea(rows=4, layout=widgets.Layout(width="100%", display="none"),
                                          description="", placeholder="%%cascade cell")
        # a ControlNet (collapsed): uploads and grown masks are written to upload_folder when a job starts
        self.control = ControlSection(lambda: (self.width.value, self.height.value), upload_folder=upload_folder)

        def column(s: str, title: str) -> widgets.VBox:
            return widgets.VBox([widgets.HTML(f"<b>{title}</b>"), *self.stage[s].values()])

        self.widget = widgets.VBox([
            self.prompt, self.negative,
            widgets.HBox([self.size, self.width, self.height, self.batch_size], layout=ROW),
            widgets.HBox([column("c", "Stage C (prior)"), column("b", "Stage B (decoder)")]),
            widgets.HBox([self.seed, self.randomise, self.new_seed_each_run, self.variant, self.refresh], layout=ROW),
            widgets.HBox([self.compat, self.denoise], layout=ROW), self.control.widget,
            widgets.HBox([self.generate_button, self.cancel_button, self.progress, self.status], layout=ROW),
            self.error_box, self.preview, self.copy_area, self.inspector_box, self.gallery,
        ])

        for box in (self.denoise, self.control.strength, *(self.stage[s][k] for s in "cb" for k in ("cfg", "shift"))):
            guard_finite(box, self._show_error)

    def _on_preset(self, change: dict[str, Any]) -> None:
        if change["new"] is not None and (self.width.value, self.height.value) != change["new"]:
            self.width.value, self.height.value = change["new"]

    def _on_dimension(self, change: dict[str, Any]) -> None:
        pair = (self.width.value, self.height.value)
        presets = [value for _, value in self.size.options]
        self.size.value = pair if pair in presets else None
        if self.control.active:  # the filters work at the generation size
            self.control.update_preview()

    def _on_compat(self, change: dict[str, Any]) -> None:
        """Switching compat swaps the samplers and schedulers still at one mode's defaults for the other's."""
        from ..params import COMFYUI_DEFAULTS

        official = GenerationParams("")
        pairs = [(getattr(official, f"{kind}_{s}"), COMFYUI_DEFAULTS[f"{kind}_{s}"])
                 for kind in ("sampler", "scheduler") for s in ("c", "b")]
        for (kind, s), (before, after) in zip([(k, s) for k in ("sampler", "scheduler") for s in ("c", "b")], pairs,
                                              strict=True):
            old, new = (before, after) if change["new"] == "comfyui" else (after, before)
            dropdown = self.stage[s][kind]
            if dropdown.value == old and new in [value for _, value in dropdown.options]:
                dropdown.value = new

    def refresh_options(self) -> None:
        """Fill the sampler, scheduler and variant lists from the plugin registries (picks up new plugins)."""
        from ..plugins import registries

        regs = registries()  # a new object after every register_plugin / unregister_plugin
        if regs is self._seen_registries:
            return
        self._seen_registries = regs
        for s in ("c", "b"):
            for kind in ("sampler", "scheduler"):
                labelled = [(f"{r.name} ({r.family})" if r.family else r.name, r.name) for r in regs[kind]]
                _set_options(self.stage[s][kind], labelled)
        _set_options(self.variant, ["auto", *regs["variant"].names()])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        self.refresh_options()
        return self.widget._repr_mimebundle_(**kwargs)

    # -- reading the form ------------------------------------------------------------------------------
    def params(self) -> GenerationParams:
        """The form as checked `GenerationParams` (raises ValueError naming a wrong value)."""
        values: dict[str, Any] = {
            "prompt": self.prompt.value, "negative_prompt": self.negative.value, "width": self.width.value,
            "height": self.height.value, "batch_size": self.batch_size.value, "seed": self.seed.value,
            "variant": self.variant.value, "compat": self.compat.value, "denoise": self.denoise.value,
        }
        for s in ("c", "b"):
            values.update({f"{name}_{s}": self.stage[s][name].value for name in STAGE_FIELDS})
        official = GenerationParams("")
        if values["compat"] == "comfyui":  # the form has no fields for these: ComfyUI's unless set otherwise
            from ..params import COMFYUI_DEFAULTS

            for key in ("compression", "cfg_rho"):
                if getattr(self.base, key) == getattr(official, key):
                    values[key] = COMFYUI_DEFAULTS[key]
        params = self.base.replace(**values).validate()
        from ..plugins import get_sampler, get_scheduler, get_variant

        for s in ("c", "b"):
            get_sampler(getattr(params, f"sampler_{s}"), params.compat)
            get_scheduler(getattr(params, f"scheduler_{s}"), params.compat)
        if params.variant != "auto":
            get_variant(params.variant)
        return params

    def randomise_seed(self) -> int:
        self._drawing_seed = True
        try:
            self.seed.value = random.randrange(2**32)
        finally:
            self._drawing_seed = False
        return int(self.seed.value)

    def _on_seed_typed(self, change: dict[str, Any]) -> None:
        """A seed the user typed is the one they want: untick "new seed each run" instead of replacing it."""
        if not self._drawing_seed and self.new_seed_each_run.value:
            self.new_seed_each_run.value = False

    # -- running ---------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def generate(self) -> bool:
        """Start a job from the form in a worker thread; False (with the reason in the panel) if it cannot start."""
        self.refresh_options()
        if self.running:
            self._show_error("a generation is already running in this panel; wait for it or press Cancel")
            return False
        self.error, self.error_box.value = None, ""
        try:
            if self.new_seed_each_run.value:
                self.randomise_seed()
            params = self.params()
            control = self.control.job_control((params.width, params.height))  # before any model runs
        except Exception as exc:
            self.error = exc
            self._show_error(f"{type(exc).__name__}: {exc}")
            return False
        self._cancel_requested.clear()
        self._job_started, self._job_variant = False, params.variant
        self.progress.value, self.progress.max = 0, params.steps_c + params.steps_b
        self.progress.bar_style, self._steps_c, self._preview_at = "", params.steps_c, None
        self._set_running(True, f"starting ({params.variant}, {params.width}×{params.height})…")
        self._thread = threading.Thread(target=self._work, args=(params, [control] if control else []), daemon=True,
                                        name="cascade_lab-panel")
        self._thread.start()
        return True

    def cancel(self) -> None:
        """Stop this panel's job before its next sampler step (at most the step under way finishes)."""
        if not self.running:
            return
        self._cancel_requested.set()  # seen by the step callback, so a cancel just before the job starts holds
        if self._job_started:  # a step of ours has run: the session's running job is this one
            self.session.cancel()
        self.status.value = "cancelling…"

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the running job ends (or ``timeout`` seconds); the newest result, or None."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the generation did not finish within {timeout} s")
        return self.results[-1] if self.results else None

    def _work(self, params: GenerationParams, controls: list[Any]) -> None:
        from ..diffusion import Cancelled

        started = time.perf_counter()
        options = {name: getattr(params, name) for name in JOB_FIELDS}
        try:
            if self._cancel_requested.is_set():
                raise Cancelled(0, None)
            result = self.session.generate(params.prompt, params.negative_prompt, variant=params.variant,
                                           callback=self._on_step, keep_trajectory=self.keep_trajectory,
                                           controls=controls, **options)
        except Cancelled as exc:
            stopped = f"cancelled ({exc})"
        except Exception as exc:  # the worker reports every failure in the panel, never only in a log
            self._show_error(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            self.error = exc.with_traceback(None)  # the message stays; the frames (and their tensors) go
            self.progress.bar_style = "danger"
            self._set_running(False, "failed")
            return
        else:
            self.results = [*self.results, result][-self.keep_results:]
            self.progress.value, self.progress.bar_style = self.progress.max, "success"
            self.preview.value = png_bytes(result.images[0])
            self.preview.format = "png"
            gallery = (self._gallery_item(result), *self.gallery.children)
            self.gallery.children = gallery[:self.keep_results]
            self._set_running(False, f"done in {time.perf_counter() - started:.1f} s, seed {result.params.seed}")
            return
        free_memory()  # outside the except block: the cancelled job's frames are gone
        self.progress.bar_style = "warning"
        self._set_running(False, stopped)

    def _on_step(self, event: Any) -> None:
        """Per-step callback (worker thread): cancel check, progress, status and a throttled Stage C preview."""
        self._job_started = True
        if self._cancel_requested.is_set():
            self.session.cancel()  # the sampler checks the session's token before the next step
        if event.stage == "c":
            self._steps_c = event.steps  # fewer than asked for img2img
        done = event.step + 1 if event.stage == "c" else self._steps_c + event.step + 1
        self.progress.value = min(done, self.progress.max)
        self.status.value = f"Stage {event.stage.upper()} step {event.step + 1}/{event.steps}"
        defaults = self.session.defaults
        now = time.monotonic()
        if event.stage == "c" and defaults.preview and (
                self._preview_at is None or now - self._preview_at >= defaults.preview_interval):
            self._preview_at = now
            try:
                rgb = self.session.cascade(self._job_variant).preview(event.x0)
                self.preview.format, self.preview.value = "jpeg", preview_jpeg(rgb)
            except ValueError:  # a variant without a previewer: no previews, the job goes on
                self._preview_at = float("inf")

    def _set_running(self, running: bool, message: str) -> None:
        self.generate_button.disabled, self.cancel_button.disabled = running, not running
        self.status.value = html.escape(message)

    def _show_error(self, message: str, details: str = "") -> None:
        self.status.value = ""  # a new error never sits beside an old "done in 0.2 s" or its green bar
        if not self.running:
            self.progress.value, self.progress.bar_style = 0, ""
        body = f"<b>{html.escape(message)}</b>"
        if details:
            body = f"<details><summary>{body}</summary><pre>{html.escape(details)}</pre></details>"
        self.error_box.value = f'<div style="color:#b00020">{body}</div>'

    # -- gallery ---------------------------------------------------------------------------------------
    def _gallery_item(self, result: Any) -> widgets.HBox:
        p = result.params
        thumbs = [widgets.Image(value=png_bytes(im), format="png", layout=widgets.Layout(width="160px"))
                  for im in result.images]
        summary = widgets.HTML(
            f"<b>{html.escape(p.prompt) or '<i>(no prompt)</i>'}</b><br>{p.width}×{p.height}, seed {p.seed}, "
            f"variant {html.escape(p.variant)}<br>C: {p.steps_c} steps, CFG {p.cfg_c:g}, shift {p.shift_c:g}, "
            f"{html.escape(p.sampler_c)}/{html.escape(p.scheduler_c)}<br>B: {p.steps_b} steps, CFG {p.cfg_b:g}, "
            f"shift {p.shift_b:g}, {html.escape(p.sampler_b)}/{html.escape(p.scheduler_b)}"
            + "".join(f"<br>ControlNet {html.escape(kind)}, strength {strength:g}, steps {start:g}–{end:g}"
                      for kind, _, strength, start, end, *_ in p.controls))
        copy = widgets.Button(description="copy as %%cascade", icon="copy", layout=widgets.Layout(width="auto"))
        copy.on_click(lambda _: self.copy_cell(result))
        inspect = widgets.Button(description="inspect latents", icon="search")
        inspect.on_click(lambda _: self.inspect(result))
        return widgets.HBox([*thumbs, widgets.VBox([summary, widgets.HBox([copy, inspect])])])

    def inspect(self, result: Any) -> Any:
        """Show a `LatentInspector` for ``result`` in the panel (with its variant's Previewer while loaded)."""
        from .inspector import LatentInspector

        try:
            inspector = LatentInspector(result, session=self.session)
        except Exception as exc:
            self._show_error(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return None
        self.inspector_box.children = (inspector.widget,)
        return inspector

    def copy_cell(self, result: Any) -> str:
        """Put the ``%%cascade`` cell for ``result`` in the panel's text box (select it and copy) and return it.

        IPython's ``set_next_input`` is not used: from a button callback there is no cell execution to attach
        its payload to, so the text would appear at some unrelated later cell.
        """
        text = cascade_cell(result.params)
        self.copy_area.value = text
        self.copy_area.layout.display = None
        controls = result.params.controls
        notes = [f"the cell applies the {kind} control on every step (no flag for its steps {start:g}–{end:g})"
                 for kind, _, _, start, end, *_ in controls if (start, end) != (0.0, 1.0)]
        notes += [f"the {kind} control's {what} was in memory ({value}): put its file or variable in the cell"
                  for kind, image, _, _, _, mask, *_ in controls
                  for what, value in (("image", image), ("mask", mask)) if value.startswith("sha256:")]
        if notes:  # otherwise the status keeps saying how the job went
            self.status.value = html.escape("; ".join(notes))
        return text


def _set_options(dropdown: widgets.Dropdown, options: list[str] | list[tuple[str, str]]) -> None:
    """Replace a dropdown's options (names, or (label, name) pairs), keeping the current choice when it exists."""
    current = dropdown.value
    values = [o[1] if isinstance(o, tuple) else o for o in options]
    if list(dropdown.options) != list(options):
        dropdown.options = options
        dropdown.value = current if current in values else (values[0] if values else None)
