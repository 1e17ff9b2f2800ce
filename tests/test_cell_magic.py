"""``%%cascade`` on a fresh shell with the tiny variant: options reach the job, the body reaches the pipeline
byte for byte, results are stored and shown as PNGs with their parameters, interrupts end cleanly, and the
shared session runs one job at a time."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from conftest import widget_of
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from PIL import Image

from cascade_lab.api import Cascade
from cascade_lab.notebook import display as display_module
from cascade_lab.notebook import session as session_module
from cascade_lab.notebook.options import NAMED_SIZES, RATIO_ALIASES, fit_ratio, parse_size
from cascade_lab.notebook.session import JobRunning, Session
from cascade_lab.params import read_png_params

FAST = {"variant": "tiny", "width": 128, "height": 128, "steps_c": 2, "steps_b": 2, "preview_interval": 0.0}


@pytest.fixture(scope="module")
def tiny() -> Cascade:
    cascade = Cascade("tiny")
    cascade.pipeline  # build once for the module  # noqa: B018
    return cascade


@pytest.fixture(scope="module")
def made(tiny: Cascade) -> Any:
    """One real small Result, for the spies to return."""
    return tiny.generate("made", width=128, height=128, steps_c=2, steps_b=2, seed=7)


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch, tiny: Cascade) -> Session:
    """A fresh shared session with fast defaults and the module's tiny cascade already loaded."""
    s = Session()
    s.configure(**FAST)
    s.use(tiny)
    monkeypatch.setattr(session_module, "_session", s)
    return s


@pytest.fixture
def shell(ip: Any, session: Session) -> Any:
    ip.run_line_magic("load_ext", "cascade_lab")
    return ip


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, made: Any) -> list[dict[str, Any]]:
    """Spy on Session.generate: records every call, returns the ready-made result without running."""
    seen: list[dict[str, Any]] = []

    def spy(self: Session, prompt: str, negative_prompt: str = "", **kwargs: Any) -> Any:
        seen.append({"prompt": prompt, "negative_prompt": negative_prompt, **kwargs})
        return made

    monkeypatch.setattr(Session, "generate", spy)
    return seen


def passed(call: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in call.items() if k not in ("callback", "prompt", "negative_prompt")}


# -- options ---------------------------------------------------------------------------------------------
def test_every_option_is_passed_through(shell: Any, calls: list[dict[str, Any]], tmp_path: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("style.safetensors", "other.safetensors"):
        (tmp_path / name).write_bytes(b"")
    source = Image.new("RGB", (64, 64), "red")
    shell.user_ns["src"] = source
    shell.user_ns["arr"] = np.zeros((32, 32, 3), np.uint8)
    path = tmp_path / "v.png"
    source.save(path)
    line = (f'-n "blurry, low quality" -s 42 --size 1024x1536 -b 3 -v tiny --device cpu --dtype float32 '
            f"--steps-c 7 --steps-b 3 --cfg-c 5.5 --cfg-b 1.5 --shift-c 2.5 --shift-b 1.2 --cfg-rescale 0.5 "
            f"--sampler euler --scheduler-b karras -i src --strength 0.6 --variation {path}:0.25 "
            f"--variation arr --lora style.safetensors:0.8 --lora other.safetensors --no-trajectory")
    shell.run_cell_magic("cascade", line, "a cat\n")
    [call] = calls
    assert call["prompt"] == "a cat" and call["negative_prompt"] == "blurry, low quality"
    assert passed(call) == {
        "seed": 42, "width": 1024, "height": 1536, "batch_size": 3, "variant": "tiny", "device": "cpu",
        "dtype": "float32", "steps_c": 7, "steps_b": 3, "cfg_c": 5.5, "cfg_b": 1.5, "shift_c": 2.5, "shift_b": 1.2,
        "cfg_rho": 0.5, "sampler_c": "euler", "sampler_b": "euler", "scheduler_b": "karras", "image": source,
        "strength": 0.6, "variations": [str(path), shell.user_ns["arr"]], "variation_weights": [0.25, 1.0],
        "loras": [("style.safetensors", 0.8), ("other.safetensors", 1.0)], "keep_trajectory": False}


def test_unset_options_are_left_to_the_session_defaults(shell: Any, calls: list[dict[str, Any]], tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    shell.user_ns["img"] = "img.png"  # a variable holding a path means that file
    shell.run_cell_magic("cascade", "--size wide --sampler-c lcm --scheduler exponential -i img", "x")
    assert passed(calls[0]) == {"width": 1408, "height": 768, "sampler_c": "lcm", "scheduler_c": "exponential",
                                "scheduler_b": "exponential", "image": "img.png", "strength": 0.8, "loras": [],
                                "variant": None, "device": None, "dtype": None}


@pytest.mark.parametrize(("line", "words"), [
    ("-s x", "argument -s/--seed: 'x' is not a whole number"),
    ("--seed -1", "argument -s/--seed: '-1'"),
    ("--size 100x100", "argument --size: '100x100': sides must be ≥ 128"),
    ("--size huge", "argument --size: 'huge' is not a size"),
    ("--size 50:1", "argument --size: the ratio 50:1 is too extreme"),
    ("--steps-c 0", "argument --steps-c: '0': use a whole number ≥ 1"),
    ("--cfg-b -1", "argument --cfg-b: '-1': give a finite number ≥ 0"),
    ("--cfg-c inf", "argument --cfg-c: 'inf': give a finite number ≥ 0"),
    ("--cfg-c 4,2,1", "argument --cfg-c: '4,2,1': give a finite number ≥ 0 .*or A,B"),
    ("--shift-c 0", "argument --shift-c: '0': use a number > 0"),
    ("--cfg-rescale 2", "argument --cfg-rescale: '2': use a number in \\[0, 1\\]"),
    ("-b 0", "argument -b/--batch: '0'"),
    ("--sampler nope", "argument --sampler: unknown sampler 'nope'; available under compat='comfyui': ComfyUI's "
     ".*euler_ancestral.*; others: .*ddpm"),
    ("--compat comfyui --sampler-c comfyui.heun", "argument --sampler-c: unknown sampler 'comfyui.heun'"),
    ("--compat comfy", "argument --compat: invalid choice: 'comfy'"),
    ("--denoise 0", "argument --denoise: '0': use a number in \\(0, 1\\]"),
    ("--denoise 1.5", "argument --denoise: '1.5'"),
    ("--denoise nan", "argument --denoise: 'nan'"),
    ("-i img.png --strength 0.5 --denoise 0.5", "give one of the two partial schedules"),
    ("--seed-b -3", "argument --seed-b: '-3'"),
    ("--scheduler-b nope", "argument --scheduler-b: unknown scheduler 'nope'"),
    ("-v huge", "argument -v/--variant: unknown variant 'huge'"),
    ("--dtype float16", "argument --dtype: invalid choice: 'float16'"),
    ("--strength 0.5", "--strength needs --image"),
    ("-i img.png --strength 1.5", "argument --strength: '1.5': use a number in \\(0, 1\\]"),
    ("-i no_such_var", "--image 'no_such_var': neither a notebook variable nor an existing file"),
    ("--variation nothing.png:0.5", "--variation 'nothing.png': neither a notebook variable nor an existing file"),
    ("--lora style.ckpt", "argument --lora: 'style.ckpt': give a .safetensors file"),
    ("--lora gone.safetensors:0.5", "--lora 'gone.safetensors': file not found"),
    ("-o 1x", "-o/--out '1x': not a valid Python variable name"),
    ("--save out.jpg", "--save 'out.jpg': cascade_lab writes PNG files"),
    ("--bogus 1", "unrecognized arguments: --bogus"),
    ("--steps 3", "unrecognized arguments: --steps"),  # no abbreviation guessing
    ('-n "unclosed', "%%cascade options: No closing quotation"),
])  # fmt: skip
def test_bad_options_are_one_line_usage_errors(shell: Any, calls: list[dict[str, Any]], tmp_path: Any,
                                               monkeypatch: pytest.MonkeyPatch, line: str, words: str) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    with pytest.raises(UsageError, match=words):
        shell.run_cell_magic("cascade", line, "a prompt\n")
    assert calls == []


def test_empty_body_and_two_negatives_are_usage_errors(shell: Any, calls: list[dict[str, Any]]) -> None:
    with pytest.raises(UsageError, match="the cell body is the prompt and it is empty"):
        shell.run_cell_magic("cascade", "-s 1", "  \n")
    with pytest.raises(UsageError, match="--negative: the body already has a negative prompt"):
        shell.run_cell_magic("cascade", "-n bad", "good\n--- negative ---\nbad\n")
    assert calls == []


# -- the prompt --------------------------------------------------------------------------------------------
BODIES = [
    "a {cat} in ${hat} costs $5 and {0} {x!r} {{y}}",
    'say "hello" and \'bye\' \\n (a backslash, not a newline)',
    "ein Käfer · 猫 · ✓ · emoji 🐈",
    "line one\n  indented line two\n\nline four after a blank",
    "trailing spaces   ",
]


@pytest.mark.parametrize("body", BODIES)
def test_body_reaches_the_job_byte_for_byte(shell: Any, calls: list[dict[str, Any]], body: str) -> None:
    shell.user_ns.update(cat="DOG", hat="CAP", x=1)
    result = shell.run_cell("%%cascade -s 1\n" + body)  # as a notebook cell: IPython adds the final newline
    assert result.success, result.error_in_exec
    shell.run_cell_magic("cascade", "", body)  # and as a direct call without one
    assert [c["prompt"] for c in calls] == [body, body]
    assert calls[0]["negative_prompt"] == ""


def test_negative_prompt_after_the_separator_line(shell: Any, calls: list[dict[str, Any]]) -> None:
    body = 'a {red} "fox"\nin snow\n  --- Negative ---  \nblurry, $cheap,\n{text}, watermark\n'
    shell.run_cell_magic("cascade", "", body)
    assert calls[0]["prompt"] == 'a {red} "fox"\nin snow'
    assert calls[0]["negative_prompt"] == "blurry, $cheap,\n{text}, watermark"


def test_expand_fills_plain_names_only(shell: Any, calls: list[dict[str, Any]]) -> None:
    shell.user_ns.update(animal="fox", n=3)
    shell.run_cell_magic("cascade", "--expand", "{n} {animal}s, ${animal}, $animal, $$5, {{lit}}, {animal.upper}\n"
                                                "--- negative ---\nno {animal}\n")
    assert calls[0]["prompt"] == "3 foxs, fox, fox, $5, {lit}, {animal.upper}"  # nothing is evaluated
    assert calls[0]["negative_prompt"] == "no fox"
    with pytest.raises(UsageError, match="--expand: 'missing' is not defined in the notebook"):
        shell.run_cell_magic("cascade", "--expand", "a {missing}\n")


def test_prompt_reaches_the_pipeline_unchanged(shell: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, ...]] = []
    original = Cascade.generate

    def spy(self: Cascade, prompt: str, negative_prompt: str = "", **kwargs: Any) -> Any:
        seen.append((prompt, negative_prompt, kwargs))
        return original(self, prompt, negative_prompt, **kwargs)

    monkeypatch.setattr(Cascade, "generate", spy)
    body = 'a {braced} $dollar "quoted" — 猫\nsecond line'
    with capture_output():
        shell.run_cell("%%cascade -s 5 -o r --cfg-c 2\n" + body + "\n--- negative ---\n{ugly} $1\n")
    prompt, negative, kwargs = seen[0]
    assert (prompt, negative) == (body, "{ugly} $1")
    assert kwargs["seed"] == 5 and kwargs["cfg_c"] == 2.0 and kwargs["steps_c"] == 2 and kwargs["width"] == 128
    assert kwargs["sampler_b"] == "ddpm" and kwargs["keep_trajectory"] is True and kwargs["cancel"] is not None
    assert shell.user_ns["r"].params.prompt == body


# -- results and their display -----------------------------------------------------------------------------
def test_result_is_stored_and_shown_as_png_with_parameters(shell: Any, session: Session, tmp_path: Any) -> None:
    with capture_output() as cap:
        shell.run_cell_magic("cascade", f"-s 9 -b 2 -o out --save {tmp_path / 'x.png'}", "a {red} cube $\n")
    result = shell.user_ns["out"]
    assert result.params.seed == 9 and result.params.prompt == "a {red} cube $" and len(result.images) == 2
    assert session.last_result is result and len(result.trajectory_c) == 2
    bars, previews, final = cap.outputs[0], cap.outputs[1:-1], cap.outputs[-1]
    assert "application/vnd.jupyter.widget-view+json" in bars.data  # the progress rows come first, then the image
    assert previews and all("image/jpeg" in o.data for o in previews)
    png = final.data["image/png"]
    assert png.startswith(b"\x89PNG") and b"a {red} cube $" in png and b"cascade_lab" in png
    meta = final.metadata["cascade_lab"]
    assert meta["params"]["seed"] == 9 and meta["params"]["variant"] == "tiny" and meta["version"]
    assert "seed 9" in final.data["text/plain"] and "cascade_lab 0" in final.data["text/plain"]
    # the result replaced the preview in place: same display id, sent as an update
    assert final.update and final.transient["display_id"] == previews[0].transient["display_id"]
    assert "seed 9 · tiny · 128x128 · C ddpm/cosine 2 steps" in cap.stdout
    saved = [tmp_path / "x_0.png", tmp_path / "x_1.png"]
    assert f"saved {saved[0]}, {saved[1]}" in cap.stdout and read_png_params(saved[1]).seed == 9


def test_no_preview_shows_only_the_result(shell: Any) -> None:
    with capture_output() as cap:
        shell.run_cell_magic("cascade", "--no-preview -s 1", "x\n")
    assert [list(o.data) for o in cap.outputs][1:] == [["image/png", "text/plain"]]
    assert not cap.outputs[1].update


def bar_values(box: Any) -> dict[str, tuple[int, int, str]]:
    """{label: (value, max, bar_style)} of the progress rows."""
    rows = {}
    for line in box.children:
        label, bar, _ = line.children
        rows[label.value.rstrip(":")] = (bar.value, bar.max, bar.bar_style)
    return rows


def test_bars_end_at_100_percent_above_the_result(shell: Any) -> None:
    """Issue 18: the saved widget state reaches 100 % for both stages, and the image sits below both bars."""
    with capture_output() as cap:
        shell.run_cell_magic("cascade", "-s 1 --steps-c 3 --steps-b 2", "x\n")
    assert bar_values(widget_of(cap.outputs[0])) == {"Stage C": (3, 3, "success"), "Stage B": (2, 2, "success")}
    assert "image/png" in cap.outputs[-1].data and all("image/png" not in o.data for o in cap.outputs[:-1])


def test_text_bars_without_widgets_update_in_place_to_100_percent(shell: Any) -> None:
    """Without ipywidgets the bars are one text display updated in place (no carriage-return stream stuck at
    0 %); a cancelled job leaves its row where it stopped, marked."""
    clock = [0.0]
    bars = display_module.StageBars(clock=lambda: clock[0])
    bars.widgets = None
    with capture_output() as cap:
        for _ in range(4):
            clock[0] += 0.05
            bars.step("c", 4)
        bars.step("b", 3)
        bars.close("cancelled")
    texts = [o.data["text/plain"] for o in cap.outputs]
    assert len({o.transient["display_id"] for o in cap.outputs}) == 1 and cap.outputs[-1].update
    assert "Stage C: 100% |████████████████████| 4/4" in texts[-1]
    assert "Stage B:  33% |" in texts[-1] and "1/3" in texts[-1] and texts[-1].endswith("· cancelled")


def test_preview_updates_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[Any] = []
    now = [0.0]
    progress = display_module.LiveProgress(preview=lambda x0: x0, interval=0.5, clock=lambda: now[0])
    monkeypatch.setattr(progress, "_show_preview", shown.append)

    class Event:
        stage, steps, x0 = "c", 10, None

        def __init__(self, step: int) -> None:
            self.step = step

    for step, t in enumerate([0.0, 0.1, 0.3, 0.55, 0.6, 1.2]):
        now[0] = t
        progress(Event(step))
    progress.close()
    assert len(shown) == 3  # at 0.0, 0.55 and 1.2 s


def tiny_lora(path: Any) -> str:
    """A kohya-format LoRA file for two layers of the tiny Stage C."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    layers = (("lora_unet_down_blocks_0_2_attention_attn_out_proj", 32), ("lora_unet_up_blocks_1_2_kv_mapper_1", 40))
    for name, width in layers:  # width: the tiny Stage C channels, 40 for the kv_mapper's c_cond input
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, width, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return str(path)


def test_lora_applies_per_cell(shell: Any, tiny: Cascade, tmp_path: Any) -> None:
    path = tiny_lora(tmp_path / "style.safetensors")
    try:
        with capture_output():
            shell.run_cell_magic("cascade", f"--lora {path}:0.8 -s 4 -o styled --no-preview", "x\n")
            shell.run_cell_magic("cascade", f"--lora {path}:0.5 -s 4 -o weaker --no-preview", "x\n")
            shell.run_cell_magic("cascade", "-s 4 -o plain --no-preview", "x\n")
        styled, weaker, plain = (shell.user_ns[n] for n in ("styled", "weaker", "plain"))
        assert styled.params.loras == ((path, 0.8),) and weaker.params.loras == ((path, 0.5),)
        assert plain.params.loras == () and tiny.loras == []  # a cell without --lora runs without any
        assert not np.array_equal(np.asarray(styled.image), np.asarray(plain.image))
    finally:
        if tiny.loras:
            tiny.unload_lora()


def test_lora_refused_by_a_cascade_without_lora_support() -> None:
    from cascade_lab.notebook.session import LoraUnavailable

    with pytest.raises(LoraUnavailable, match="LoRA not available in this version"):
        Session._apply_loras(object(), [("x.safetensors", 1.0)])
    Session._apply_loras(object(), [])  # nothing asked: nothing to refuse


def test_img2img_from_a_variable(shell: Any, made: Any) -> None:
    shell.user_ns["src"] = made.image
    with capture_output():
        shell.run_cell_magic("cascade", "-i src --strength 0.5 -s 2 -o r --no-preview", "x\n")
    assert shell.user_ns["r"].params.strength == 0.5 and shell.user_ns["r"].params.init_image.startswith("sha256:")


# -- stopping --------------------------------------------------------------------------------------------
def stop_at(monkeypatch: pytest.MonkeyPatch, step: int, action: Any) -> None:
    original = display_module.LiveProgress.__call__

    def on_step(self: Any, event: Any) -> None:
        original(self, event)
        if event.stage == "c" and event.step == step:
            action()

    monkeypatch.setattr(display_module.LiveProgress, "__call__", on_step)


def test_keyboard_interrupt_stops_cleanly_and_the_session_goes_on(shell: Any, session: Session,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_lab.notebook import magics

    freed: list[bool] = []
    monkeypatch.setattr(magics, "free_memory", lambda: freed.append(True))

    def interrupt() -> None:
        raise KeyboardInterrupt

    stop_at(monkeypatch, 1, interrupt)
    with capture_output() as cap, pytest.raises(UsageError) as error:
        shell.run_cell_magic("cascade", "--steps-c 4 -o r", "x\n")
    assert str(error.value) == ("cascade_lab job interrupted after Stage C step 2/4; the last preview is kept; "
                                "memory freed, the session is ready for the next job")
    assert error.value.__context__ is None or error.value.__suppress_context__
    assert freed == [True] and not session.busy and "r" not in shell.user_ns
    assert [list(o.data) for o in cap.outputs][1:] == [["image/jpeg", "text/plain"]] * 2  # the previews stay
    assert bar_values(widget_of(cap.outputs[0])) == {"Stage C": (2, 4, "warning")}  # marked where it stopped

    monkeypatch.undo()
    monkeypatch.setattr(session_module, "_session", session)
    with capture_output():
        shell.run_cell_magic("cascade", "-o r", "x\n")
    assert shell.user_ns["r"].params.steps_c == 2


def test_cancel_from_the_session_stops_before_the_next_step(shell: Any, session: Session,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    stop_at(monkeypatch, 0, lambda: steps.append(session.cancel()))
    with capture_output(), pytest.raises(UsageError, match="cancelled after Stage C step 1/5"):
        shell.run_cell_magic("cascade", "--steps-c 5 --no-preview", "x\n")
    assert steps == [True] and not session.busy and not session.cancel()


# -- the shared session --------------------------------------------------------------------------------------
def test_one_job_at_a_time(shell: Any, session: Session, calls: list[dict[str, Any]]) -> None:
    with session.job("panel job"):
        with pytest.raises(UsageError, match="panel job is still running; wait for it or %cascade cancel"):
            shell.run_cell_magic("cascade", "", "x\n")
        with pytest.raises(JobRunning, match="already running: panel job"):
            with session.job("second"):
                pass
    assert calls == [] and not session.busy


def test_a_job_in_another_thread_holds_the_session(session: Session) -> None:
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def on_step(event: Any) -> None:
        started.set()
        release.wait(30)

    def run() -> None:
        try:
            session.generate("x", callback=on_step)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60)
    with pytest.raises(JobRunning, match="generate 'x'"):
        session.generate("y")
    assert session.cancel()
    release.set()
    worker.join(60)
    assert type(errors[0]).__name__ == "Cancelled" and not session.busy
    assert session.generate("z", seed=1).params.prompt == "z"


def test_session_caches_one_cascade_per_key(session: Session, tiny: Cascade) -> None:
    assert session.cascade() is tiny and session.cascade("tiny") is tiny
    other = session.cascade("tiny", device="cpu")
    assert other is not tiny and session.loaded == [("tiny", "cpu", None)]  # max_loaded=1 dropped the first
    with pytest.raises(ValueError, match="sampler='nope': unknown sampler 'nope'"):
        session.configure(steps_c=3, sampler="nope")
    assert session.defaults.steps_c == 2  # nothing changed


# -- sizes -----------------------------------------------------------------------------------------------
def test_named_sizes_are_the_fitted_ratios() -> None:
    for name, (w, h) in NAMED_SIZES.items():
        a, b = (int(v) for v in RATIO_ALIASES[name].split(":"))
        assert fit_ratio(a, b) == (w, h) == parse_size(RATIO_ALIASES[name]) == parse_size(name.upper())
        assert w % 128 == 0 and h % 128 == 0 and 0.75 < w * h / 1024**2 < 1.3
    assert parse_size("1024x1536") == (1024, 1536) and parse_size("768") == (768, 768)
    assert parse_size("4:3") == (1152, 896)


# -- ComfyUI compatibility and prompt batches (issue 15) --------------------------------------------------------
def test_comfyui_options_are_passed_through(shell: Any, calls: list[dict[str, Any]]) -> None:
    shell.run_cell_magic("cascade", "--compat comfyui --sampler euler_ancestral --scheduler simple -s 314307448448003 "
                         "--seed-b 183495397600639 --denoise 0.6 --compression 32 --cfg-c 8,2", "a cat\n")
    [call] = calls
    assert passed(call) == {
        "compat": "comfyui", "sampler_c": "euler_ancestral", "sampler_b": "euler_ancestral", "scheduler_c": "simple",
        "scheduler_b": "simple", "seed": 314307448448003, "seed_b": 183495397600639, "denoise": 0.6,
        "compression": 32.0, "cfg_c": (8.0, 2.0), "loras": [], "variant": None, "device": None, "dtype": None}


def test_next_lines_make_one_prompt_per_image(shell: Any, calls: list[dict[str, Any]]) -> None:
    shell.run_cell_magic("cascade", "", "a {red} cat\n--- next ---\na $blue dog\n--- negative ---\nblurry\n")
    shell.run_cell_magic("cascade", "", "a\n--- next ---\nb\n--- negative ---\nx\n--- next ---\ny\n")
    assert calls[0]["prompt"] == ["a {red} cat", "a $blue dog"] and calls[0]["negative_prompt"] == "blurry"
    assert calls[1]["prompt"] == ["a", "b"] and calls[1]["negative_prompt"] == ["x", "y"]
    with pytest.raises(UsageError, match="prompt 2 of the batch is empty"):
        shell.run_cell_magic("cascade", "", "a\n--- next ---\n\n")
    with pytest.raises(UsageError, match="-b/--batch 3: the body has 2 prompts"):
        shell.run_cell_magic("cascade", "-b 3", "a\n--- next ---\nb\n")
    with pytest.raises(UsageError, match="2 negative prompts for 3 prompt"):
        shell.run_cell_magic("cascade", "", "a\n--- next ---\nb\n--- next ---\nc\n--- negative ---\nx\n"
                                            "--- next ---\ny\n")


def test_a_comfyui_cell_runs_comfyuis_sampler_with_its_defaults(shell: Any, session: Session) -> None:
    shell.run_cell_magic("cascade", "--compat comfyui -s 5 -o r", "a\n--- next ---\nb\n")
    result = shell.user_ns["r"]
    p = result.params
    assert (p.compat, p.sampler_c, p.scheduler_c, p.compression, p.cfg_rho) == \
        ("comfyui", "euler_ancestral", "simple", 42.0, 0.0)
    assert p.prompts == ["a", "b"] and len(result.images) == 2
    assert result.latent_c.shape == (2, 16, 3, 3)  # 128 // 42


def test_control_options_build_controls(shell: Any, calls: list[dict[str, Any]], tmp_path: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: --control KIND:IMAGE[:STRENGTH] with its --controlnet file, --mask for inpainting."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "canny.safetensors").write_bytes(b"")
    (tmp_path / "inpaint.safetensors").write_bytes(b"")
    shell.user_ns["photo"] = Image.new("RGB", (64, 64), "red")
    Image.new("RGB", (64, 64)).save(tmp_path / "edges.png")
    shell.run_cell_magic("cascade", "--control canny:edges.png:0.7 --controlnet canny.safetensors "
                         "--control inpainting:photo --controlnet inpaint.safetensors --mask 8,8,40,40;0,0,4,4",
                         "a cat\n")
    canny, inpaint = calls[0]["controls"]
    assert (inpaint.grow, inpaint.feather) == (0, 0)
    shell.run_cell_magic("cascade", "--control inpainting:photo --mask 8,8,40,40 --mask-grow 4 --mask-feather 6",
                         "a cat\n")
    assert (calls[-1]["controls"][0].grow, calls[-1]["controls"][0].feather) == (4, 6)
    assert (canny.kind, canny.image, canny.strength, canny.model) == ("canny", "edges.png", 0.7, "canny.safetensors")
    assert inpaint.image is shell.user_ns["photo"] and inpaint.mask == [(8, 8, 40, 40), (0, 0, 4, 4)]
    for line, words in [
        ("--control depth:edges.png", "KIND one of canny, inpainting, super_resolution"),
        ("--control canny:edges.png --control canny:edges.png --controlnet canny.safetensors",
         "2 control.* but 1 --controlnet"),
        ("--control inpainting:edges.png --controlnet canny.safetensors", "needs --mask"),
        ("--control canny:edges.png --controlnet nope.safetensors", "--controlnet 'nope.safetensors': file not found"),
        ("--controlnet canny.safetensors", "0 control.* but 1 --controlnet"),
        ("--mask 1,2,3,4", "--mask / --mask-grow / --mask-feather are for an inpainting control"),
        ("--control canny:edges.png --mask-feather 3", "are for an inpainting control"),
        ("--upscale 2x", "--upscale 2x needs --image"),
        ("--upscale 4x -i edges.png", "2x only"),
        ("--upscale 2x -i edges.png --strength 0.5", "drop --strength"),
        ("--upscale 2x -i edges.png --size 512x512", "width=512 with a 2x upscale of a 64x64 image"),
    ]:
        with pytest.raises((UsageError, ValueError), match=words):
            shell.run_cell_magic("cascade", line, "a cat\n")


def test_controlnets_are_found_when_no_file_is_given_and_upscale_is_the_official_recipe(
        shell: Any, calls: list[dict[str, Any]], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--controlnet is optional (each ControlNet found like the stages); --upscale 2x -i IMAGE is the
    super-resolution control at the official settings, with the flags given winning."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48)).save(tmp_path / "small.png")
    shell.run_cell_magic("cascade", "--control canny:small.png", "a cat\n")
    (canny,) = calls[-1]["controls"]
    assert (canny.kind, canny.model) == ("canny", None)
    shell.run_cell_magic("cascade", "--upscale 2x -i small.png --steps-c 3", "a cat\n")
    opts = calls[-1]
    (sr,) = opts["controls"]
    assert (sr.kind, sr.image, sr.strength, sr.model) == ("super_resolution", "small.png", 1.0, None)
    assert (opts["width"], opts["height"], opts["cfg_c"], opts["sampler_c"], opts["steps_c"], opts["steps_b"]) == \
        (128, 96, 1.0, "ddpm", 3, 10)
    assert "image" not in opts and "strength" not in opts  # the image is the control, not an img2img start
    (tmp_path / "sr.safetensors").write_bytes(b"")
    shell.run_cell_magic("cascade", "--control canny:small.png --upscale 2x -i small.png --controlnet small.png "
                         "--controlnet sr.safetensors", "a cat\n")
    assert [c.model for c in calls[-1]["controls"]] == ["small.png", "sr.safetensors"]
