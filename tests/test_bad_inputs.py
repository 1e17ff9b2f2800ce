"""The bad-input catalogue (issue 18): one case per row, each what a new user or a hostile tester tries, and what
cascade_lab does about it. ``docs/errors.md`` is generated from `CASES` (``python tools/errors_table.py``) and a
test below keeps it current.

A case's ``check(env)`` does the bad thing and asserts the outcome: for input mistakes a one-line message naming
the value and what to do instead, raised before any model runs (`Env.ran` counts sampling runs); for the user's
own plugin code the traceback stays visible; for saving, nothing written is lost.
"""

from __future__ import annotations

import errno
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import widget_of
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from PIL import Image

from cascade_lab import Cascade
from cascade_lab.notebook import session as session_module
from cascade_lab.notebook.session import Session
from cascade_lab.params import read_png_params
from cascade_lab.pipeline import Pipeline

FAST = {"variant": "tiny", "width": 128, "height": 128, "steps_c": 2, "steps_b": 1, "preview_interval": 0.0}
SMALL = {"width": 128, "height": 128, "steps_c": 2, "steps_b": 1}


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # API, magic, CLI, weights, training, panel
    given: str  # what the user does
    outcome: str  # what cascade_lab does
    check: Callable[[Env], None]
    marks: tuple[Any, ...] = ()


CASES: list[Case] = []


def case(id: str, surface: str, given: str, outcome: str,
         marks: tuple[Any, ...] = ()) -> Callable[[Callable[[Env], None]], Callable[..., None]]:
    def register(check: Callable[[Env], None]) -> Callable[[Env], None]:
        CASES.append(Case(id, surface, given, outcome, check, marks))
        return check
    return register


class Env:
    """What the cases use: a tiny cascade shared by the module, an IPython shell whose session holds it, a
    temporary folder, and a count of sampling runs (to show a refusal came before any model ran)."""

    def __init__(self, cascade: Cascade, shell: Any, tmp: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
        self.cascade, self.shell, self.tmp, self.monkeypatch, self.capsys = cascade, shell, tmp, monkeypatch, capsys
        self.runs = 0
        original = Pipeline.run

        def counted(pipeline: Pipeline, *args: Any, **kwargs: Any) -> Any:
            self.runs += 1
            return original(pipeline, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "run", counted)

    def magic(self, line: str, body: str = "a red circle\n") -> str:
        """Run a ``%%cascade`` cell that must be refused; the one-line message (no traceback)."""
        with capture_output(), pytest.raises(UsageError) as info:
            self.shell.run_cell_magic("cascade", line, body)
        return str(info.value)

    def cli(self, *argv: str) -> tuple[int, str]:
        """``cascade-lab ARGV`` in this process: (exit code, stderr)."""
        from cascade_lab.cli import main

        self.capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        return code, self.capsys.readouterr().err

    def file(self, name: str, data: bytes = b"") -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def image(self, name: str = "in.png", size: tuple[int, int] = (128, 128)) -> Path:
        path = self.tmp / name
        Image.new("RGB", size, "red").save(path)
        return path

    def lora(self, name: str = "lora.safetensors") -> Path:
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(0)
        path = self.tmp / name
        layer = "lora_unet_down_blocks_0_2_attention_attn_out_proj"
        save_file({f"{layer}.lora_down.weight": torch.randn(2, 32, generator=g),
                   f"{layer}.lora_up.weight": torch.randn(32, 2, generator=g), f"{layer}.alpha": torch.tensor(2.0)},
                  str(path))
        return path


def one_line(message: str) -> bool:
    return "\n" not in message.strip() and "Traceback" not in message


# -- silent wrong results ------------------------------------------------------------------------------------


@case("api-cfg-inf", "API", "generate(cfg_c=float('inf'))", "ValueError naming cfg_c=inf, before any model runs")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"cfg_c=inf: classifier-free guidance must be a finite number"):
        env.cascade.generate("x", cfg_c=math.inf, **SMALL)
    assert env.runs == 0


@case("magic-cfg-inf", "magic", "%%cascade --cfg-c inf", "one-line UsageError, nothing runs")
def _(env: Env) -> None:
    message = env.magic("--cfg-c inf")
    assert "--cfg-c" in message and "inf" in message and one_line(message) and env.runs == 0


@case("magic-lora-nan", "magic", "%%cascade --lora style.safetensors:nan",
      "one-line UsageError: the strength is not a finite number")
def _(env: Env) -> None:
    lora = env.lora()
    message = env.magic(f"--lora {lora}:nan")
    assert "strength nan is not a finite number" in message and one_line(message) and env.runs == 0


@case("api-lora-nan", "API", "cascade.load_lora(file, float('nan')), set_lora_strength(file, inf)",
      "ValueError before the weights change")
def _(env: Env) -> None:
    lora = env.lora()
    before = {k: v.clone() for k, v in env.cascade.pipeline.stages.stage_c.state_dict().items()}
    with pytest.raises(ValueError, match=r"strength=nan: use a finite number"):
        env.cascade.load_lora(lora, math.nan)
    env.cascade.load_lora(lora, 0.5)
    try:
        with pytest.raises(ValueError, match=r"strength=inf"):
            env.cascade.set_lora_strength(lora, math.inf)
    finally:
        env.cascade.unload_lora(lora)
    after = env.cascade.pipeline.stages.stage_c.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _nan_sampler(after: int) -> Any:
    """A plugin sampler whose latent turns NaN after `after` good steps (its previews until then are fine)."""
    from cascade_lab.diffusion.samplers import StepEvent
    from cascade_lab.registry import Sampler

    def sample(model: Any, x: torch.Tensor, levels: torch.Tensor, *, callback: Any = None, **_: Any) -> torch.Tensor:
        steps = len(levels) - 1
        for i in range(steps):
            x0 = model(x, levels[i])
            x = x0 * (float("nan") if i >= after else 1.0)
            if callback is not None:
                callback(StepEvent(i, steps, float(levels[i]), float(levels[i + 1]), x, x0))
        return x

    sample.__module__ = "my_plugin"
    return Sampler(name="nan_after", description="diverges on purpose (test)", fn=sample)


@case("sampler-nan", "API, magic", "a sampler (or plugin) whose latent becomes NaN/inf at some step",
      "stopped at that step naming stage, step and sampler; the previews so far stay; one line in the magic")
def _(env: Env) -> None:
    from cascade_lab import hookimpl
    from cascade_lab.pipeline import NonFiniteLatent
    from cascade_lab.plugins import register_plugin, unregister_plugin

    class Plugin:
        @hookimpl
        def register_samplers(self, register: Any) -> None:
            register(_nan_sampler(after=2))

    register_plugin(Plugin(), "nan_plugin")
    try:
        with pytest.raises(NonFiniteLatent, match=r"Stage C: sampler 'nan_after' reached NaN/inf values at step 3/4"):
            env.cascade.generate("x", sampler_c="nan_after", **{**SMALL, "steps_c": 4})
        with capture_output() as cap, pytest.raises(UsageError, match="at step 3/4") as info:
            env.shell.run_cell_magic("cascade", "--sampler-c nan_after --steps-c 4", "x\n")
        assert one_line(str(info.value))
        assert sum("image/jpeg" in o.data for o in cap.outputs) >= 1  # the good previews stay
    finally:
        unregister_plugin("nan_plugin")


def _write_stage_c(path: Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    from cascade_lab.models.stage_c import StageCConfig

    torch.manual_seed(0)
    model = StageCConfig.tiny().build()
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}, str(path))
    return path


@case("weights-float64", "weights", "load_stage('stage_c', a float64 file)",
      "one notice saying what the file holds; loaded as float32")
def _(env: Env) -> None:
    from cascade_lab.weights import load_stage

    path = _write_stage_c(env.tmp / "c64.safetensors", torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_stage("stage_c", path, config="tiny")
    notices = [str(w.message) for w in caught]
    assert len(notices) == 1 and "stores its stage_c weights as float64; loading them as float32" in notices[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@case("weights-int8", "weights", "load_stage('stage_c', a file of int8 weights)",
      "refused once, naming the dtype and an example key (no warning per parameter)")
def _(env: Env) -> None:
    from cascade_lab.weights import load_stage

    path = _write_stage_c(env.tmp / "c8.safetensors", torch.int8)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TypeError, match=r"stored as int8 .* quantized"):
        warnings.simplefilter("always")
        load_stage("stage_c", path, config="tiny")
    assert not caught


# -- work thrown away after it was done ----------------------------------------------------------------------


@case("magic-save-proc", "magic", "%%cascade --save /proc/x.png", "refused before generating: folder not writable")
def _(env: Env) -> None:
    message = env.magic("--save /proc/x.png")
    assert "cannot save to '/proc/x.png'" in message and one_line(message) and env.runs == 0


@case("magic-save-under-file", "magic", "%%cascade --save notes.txt/x.png (a file where a folder should be)",
      "refused before generating")
def _(env: Env) -> None:
    notes = env.file("notes.txt", b"x")
    message = env.magic(f"--save {notes}/x.png")
    assert f"{str(notes)!r} is a file, not a folder" in message and env.runs == 0


@case("magic-save-jpg", "magic", "%%cascade --save out.jpg", "refused before generating: PNG carries the parameters")
def _(env: Env) -> None:
    message = env.magic(f"--save {env.tmp / 'out.jpg'}")
    assert "use a .png name (e.g. out.png)" in message and env.runs == 0


@case("cli-output-unwritable", "CLI", "cascade-lab generate -o /proc/x.png", "exit 2 with one line, before loading")
def _(env: Env) -> None:
    code, err = env.cli("generate", "x", "-o", "/proc/x.png", "--variant", "tiny")
    assert code == 2 and "cannot save to '/proc/x.png'" in err and "Traceback" not in err and env.runs == 0


@case("cli-output-jpg", "CLI", "cascade-lab generate -o out.jpg", "exit 2: use a .png name")
def _(env: Env) -> None:
    code, err = env.cli("generate", "x", "-o", str(env.tmp / "out.jpg"), "--variant", "tiny")
    assert code == 2 and "use a .png name" in err and env.runs == 0


@case("save-existing", "API, magic, CLI", "saving onto an existing file",
      "kept: the next free NAME_00001.png is written (as ComfyUI and kohya number outputs); --overwrite replaces")
def _(env: Env) -> None:
    target = env.tmp / "x.png"
    target.write_bytes(b"precious")
    with capture_output() as cap:
        env.shell.run_cell_magic("cascade", f"-s 4 --save {target}", "x\n")
    assert target.read_bytes() == b"precious" and read_png_params(env.tmp / "x_00001.png").seed == 4
    assert f"({target} exists; --overwrite replaces it)" in cap.stdout
    code, _ = env.cli("generate", "x", "-o", str(target), "--variant", "tiny", "--steps", "1", "--steps-b", "1",
                      "--size", "128x128", "--quiet", "--seed", "5")
    assert code == 0 and read_png_params(env.tmp / "x_00002.png").seed == 5 and target.read_bytes() == b"precious"
    with capture_output():
        env.shell.run_cell_magic("cascade", f"-s 6 --save {target} --overwrite", "x\n")
    assert read_png_params(target).seed == 6


@case("save-disk-full", "API, magic", "the disk fills (or permission is lost) while a PNG is written",
      "SaveError naming the path; the previous file intact; the result kept in memory (magic: _cascade_unsaved)")
def _(env: Env) -> None:
    from cascade_lab.results import SaveError

    target = env.tmp / "keep.png"
    target.write_bytes(b"previous")
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name.endswith(".tmp"):
            real(self, data[: len(data) // 2])  # a partial write, then the error
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    env.monkeypatch.setattr(Path, "write_bytes", full)
    result = env.cascade.generate("x", seed=3, **SMALL)
    with pytest.raises(SaveError, match=r"could not write .*keep.png: No space left on device; the result is still"):
        result.save(target, overwrite=True)
    assert target.read_bytes() == b"previous" and not list(env.tmp.glob(".*.tmp"))
    with capture_output(), pytest.raises(UsageError, match="kept as _cascade_unsaved"):
        env.shell.run_cell_magic("cascade", f"-s 3 --save {target} --overwrite", "x\n")
    assert env.shell.user_ns["_cascade_unsaved"].params.seed == 3 and target.read_bytes() == b"previous"
    env.monkeypatch.setattr(Path, "write_bytes", real)
    assert read_png_params(result.save(env.tmp / "elsewhere.png")[0]).seed == 3  # still saveable


# -- waiting for nothing, or no limit ------------------------------------------------------------------------


@case("hub-unreachable", "API", "Cascade('lite_bf16').generate() with no network and HF_HUB_OFFLINE unset",
      "one 3 s connection probe, then the usual 'not found' list naming the files, the places and the commands",
      marks=(pytest.mark.real_hub_probe,))
def _(env: Env) -> None:
    from cascade_lab.weights import WeightsNotFoundError

    locate_module = sys.modules["cascade_lab.weights.locate"]
    env.monkeypatch.setenv("HF_HOME", str(env.tmp / "hf"))
    env.monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    env.monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    locate_module._HUB_PROBE.clear()
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match=r"the Hugging Face Hub cannot be reached") as info:
        Cascade("lite_bf16").generate("x")
    assert time.monotonic() - start < 10 and "hf download stabilityai/stable-cascade" in str(info.value)
    locate_module._HUB_PROBE.clear()


@case("size-huge", "API, magic", "--size 100000x100000 on tiny",
      "refused in a second, naming the largest size that fits")
def _(env: Env) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"100000x100000 \(batch 1\) needs at least .* GiB to decode, more than .* "
                                         r"the largest size that fits is about \d+x\d+"):
        env.cascade.generate("x", width=100000, height=100000, steps_c=1, steps_b=1)
    assert time.monotonic() - start < 5


# -- tracebacks where a sentence belongs ---------------------------------------------------------------------


@case("lora-truncated", "API, magic", "load_lora / --lora with a truncated .safetensors file",
      "one sentence: the file is truncated, delete it and fetch it again")
def _(env: Env) -> None:
    good = env.lora().read_bytes()
    cut = env.file("cut.safetensors", good[: len(good) - 40])
    with pytest.raises(ValueError, match=r"cut.safetensors: the file is truncated"):
        env.cascade.load_lora(cut)
    message = env.magic(f"--lora {cut}")
    assert "the file is truncated" in message and env.runs == 0


@case("image-not-an-image", "API, magic", "-i notes.txt (a file that is not an image)",
      "one line: not an image file PIL can read")
def _(env: Env) -> None:
    notes = env.file("notes.txt", b"hello")
    with pytest.raises(ValueError, match=r"image .*notes.txt' is not an image file PIL can read"):
        env.cascade.generate("x", image=notes, strength=0.5, **SMALL)
    message = env.magic(f"-i {notes}")
    assert "is not an image file PIL can read" in message and one_line(message) and env.runs == 0


@case("device-cuda-missing", "API, magic, CLI", "--device cuda on a machine without CUDA",
      "one line naming the torch build and what to use")
def _(env: Env) -> None:
    if torch.cuda.is_available():
        pytest.fail("this case needs a machine without CUDA (the project's CI is one)")
    with pytest.raises(ValueError, match=r"device='cuda': this torch is a CPU-only build"):
        Cascade("tiny", device="cuda")
    assert "CPU-only build" in env.magic("--device cuda")
    code, err = env.cli("generate", "x", "-o", str(env.tmp / "x.png"), "--variant", "tiny", "--device", "cuda:1")
    assert code == 2 and "device='cuda:1'" in err and "Traceback" not in err


@case("seed-float", "API", "generate(seed=1.5)", "ValueError: use a whole number")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"seed=1.5: use a whole number"):
        env.cascade.generate("x", seed=1.5, **SMALL)


@case("prompt-none", "API", "generate(None)", "ValueError: give a string or a list of strings")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"prompt=None: give a string"):
        env.cascade.generate(None, **SMALL)  # type: ignore[arg-type]


@case("prompt-list", "API", "generate(['a cat', 'a dog'])", "works: a batch of two, one prompt per image")
def _(env: Env) -> None:
    result = env.cascade.generate(["a cat", "a dog"], seed=1, **SMALL)
    assert len(result.images) == 2 and result.params.prompts == ["a cat", "a dog"]


@case("plugin-sampler-raises", "API, magic", "a plugin sampler that raises",
      "SamplerFailed naming the sampler and its module, with the plugin's own traceback chained (it is their code)")
def _(env: Env) -> None:
    from cascade_lab import Sampler, hookimpl
    from cascade_lab.pipeline import SamplerFailed
    from cascade_lab.plugins import register_plugin, unregister_plugin

    def broken(*_: Any, **__: Any) -> Any:
        raise KeyError("my sampler broke")

    broken.__module__ = "my_plugin"

    class Plugin:
        @hookimpl
        def register_samplers(self, register: Any) -> None:
            register(Sampler(name="broken_one", description="raises (test)", fn=broken))

    register_plugin(Plugin(), "broken_plugin")
    try:
        with pytest.raises(SamplerFailed, match=r"sampler 'broken_one' \(from my_plugin\) raised KeyError in Stage C"
                           ) as info:
            env.cascade.generate("x", sampler_c="broken_one", **SMALL)
        assert isinstance(info.value.__cause__, KeyError)  # the plugin's traceback is printed above ours
        with capture_output(), pytest.raises(SamplerFailed):  # the magic shows it as a traceback, not one line
            env.shell.run_cell_magic("cascade", "--sampler-c broken_one", "x\n")
    finally:
        unregister_plugin("broken_plugin")


@case("plugin-sampler-none", "API", "a plugin sampler that returns None", "TypeError: must return the stage's result")
def _(env: Env) -> None:
    from cascade_lab import Sampler, hookimpl
    from cascade_lab.plugins import register_plugin, unregister_plugin

    class Plugin:
        @hookimpl
        def register_samplers(self, register: Any) -> None:
            register(Sampler(name="returns_none", description="returns None (test)", fn=lambda *a, **k: None))

    register_plugin(Plugin(), "none_plugin")
    try:
        with pytest.raises(TypeError, match=r"sampler 'returns_none' returned NoneType, not a latent tensor"):
            env.cascade.generate("x", sampler_c="returns_none", **SMALL)
    finally:
        unregister_plugin("none_plugin")


@case("plugin-warning-once", "plugins", "a plugin registering a name that exists, then later cells",
      "one PluginWarning per session, not one per registry rebuild")
def _(env: Env) -> None:
    from cascade_lab import Sampler, hookimpl, plugins

    class Clash:
        @hookimpl
        def register_samplers(self, register: Any) -> None:
            register(Sampler(name="ddpm", description="a second ddpm (test)", fn=lambda *a, **k: None))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins.register_plugin(Clash(), "clash_plugin")
        plugins.registries()
        plugins.register_plugin(type("Other", (), {})(), "other_plugin")  # any change rebuilds the registries
        plugins.registries()
    plugins.unregister_plugin("clash_plugin")
    plugins.unregister_plugin("other_plugin")
    assert sum(issubclass(w.category, plugins.PluginWarning) for w in caught) == 1


# -- notebook details ----------------------------------------------------------------------------------------


@case("image-save-keeps-params", "API", "result.images[0].save('x.png') (PIL's own save)",
      "the PNG carries the parameters (they are in img.info too)")
def _(env: Env) -> None:
    result = env.cascade.generate("a cube", seed=8, **SMALL)
    image = result.images[0]
    assert "cascade_lab" in image.info
    image.save(env.tmp / "pil.png")
    assert read_png_params(env.tmp / "pil.png").seed == 8


@case("progress-bars-finish", "magic", "a %%cascade cell, then the notebook saved (or a terminal without widgets)",
      "each stage's bar ends at 100 % (text bars updated in place, no stuck 0 %), above the final image")
def _(env: Env) -> None:
    with capture_output() as cap:
        env.shell.run_cell_magic("cascade", "-s 2 --steps-c 3 --steps-b 2", "x\n")
    box = widget_of(cap.outputs[0])
    values = [(line.children[1].value, line.children[1].max) for line in box.children]
    assert values == [(3, 3), (2, 2)] and "image/png" in cap.outputs[-1].data


@case("magic-size-and-width", "magic", "%%cascade --size 256x256 --width 512", "refused: --width is not an option")
def _(env: Env) -> None:
    assert "unrecognized arguments: --width 512" in env.magic("--size 256x256 --width 512")


@case("panel-status-after-error", "panel", "Generate with width 100 after a finished job",
      "the red error in the panel, and the old 'done in …' status cleared")
def _(env: Env) -> None:
    from cascade_lab.notebook.panel import GenerationPanel

    panel = GenerationPanel()
    panel.status.value = "done in 0.2 s"
    panel.size.value, panel.width.value = None, 100
    assert panel.generate() is False and env.runs == 0
    assert panel.status.value == "" and "width=100" in panel.error_box.value and "#b00020" in panel.error_box.value


@case("panel-nan-box", "panel", "NaN (or inf) typed into a number box (denoise, CFG, shift, strength)",
      "the last good value comes back, with a message; no unencodable JSON")
def _(env: Env) -> None:
    from cascade_lab.notebook.panel import GenerationPanel

    panel = GenerationPanel()
    panel.denoise.value = math.nan
    assert panel.denoise.value == 1.0 and "denoise: nan is not a number; kept 1" in panel.error_box.value
    panel.stage["c"]["cfg"].value = math.nan
    assert panel.stage["c"]["cfg"].value == 4.0 and "CFG: nan is not a number" in panel.error_box.value


@case("panel-returned", "magic", "p = %cascade panel", "the panel is returned (the cell shows it; code can drive it)")
def _(env: Env) -> None:
    from cascade_lab.notebook.panel import GenerationPanel

    assert isinstance(env.shell.run_line_magic("cascade", "panel"), GenerationPanel)


# -- what a careful user tries next --------------------------------------------------------------------------


@case("seed-b-official", "API", "generate(seed_b=4) without compat='comfyui'",
      "refused: Stage B's own seed is ComfyUI's")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"seed_b=4: Stage B's own seed exists under compat='comfyui' only"):
        env.cascade.generate("x", seed_b=4, **SMALL)


@case("variation-weight-nan", "magic, API", "--variation img.png:nan", "refused: not a finite number")
def _(env: Env) -> None:
    image = env.image()
    assert "weight nan is not a finite number" in env.magic(f"--variation {image}:nan")
    with pytest.raises(ValueError, match=r"variation_weights \[inf\]"):
        env.cascade.generate("x", variations=[image], variation_weights=[math.inf], **SMALL)


@case("upscale-4x", "magic, CLI", "--upscale 4x", "refused: the super-resolution ControlNet makes 2x; run it twice")
def _(env: Env) -> None:
    image = env.image()
    assert "upscales 2x only" in env.magic(f"--upscale 4x -i {image}")
    code, err = env.cli("generate", "x", "-o", str(env.tmp / "x.png"), "--variant", "tiny", "--upscale", "4x",
                        "--image", str(image))
    assert code == 2 and "2x only" in err


@case("control-strength-nan", "API", "Control('canny', img, strength=nan)", "refused: use a finite number")
def _(env: Env) -> None:
    from cascade_lab.controls import Control

    with pytest.raises(ValueError, match=r"control strength=nan: use a finite number"):
        env.cascade.generate("x", controls=[Control("canny", env.image(), strength=math.nan)], **SMALL)
    assert env.runs == 0


@case("controlnet-count", "magic", "two --control and one --controlnet", "refused: one file each, or none")
def _(env: Env) -> None:
    image = env.image()
    net = env.file("c.safetensors")
    assert "2 control(s) (--control, --upscale) but 1 --controlnet" in env.magic(
        f"--control canny:{image} --control canny:{image} --controlnet {net}")


@case("lora-missing", "magic", "%%cascade --lora nope.safetensors", "refused: file not found")
def _(env: Env) -> None:
    assert "--lora 'nope.safetensors': file not found" in env.magic("--lora nope.safetensors")


@case("sampler-unknown", "magic", "%%cascade --sampler eulr", "refused, listing the samplers")
def _(env: Env) -> None:
    message = env.magic("--sampler eulr")
    assert "eulr" in message and "ddpm" in message and env.runs == 0


@case("empty-prompt", "magic", "%%cascade with an empty body", "refused: the body is the prompt")
def _(env: Env) -> None:
    assert "the cell body is the prompt and it is empty" in env.magic("-s 1", "\n")


@case("steps-zero", "magic", "%%cascade --steps-c 0", "refused: at least 1 step")
def _(env: Env) -> None:
    assert "--steps-c" in env.magic("--steps-c 0") and env.runs == 0


# -- the suite -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Cascade:
    cascade = Cascade("tiny")
    cascade.pipeline  # noqa: B018  # built once for the module
    return cascade


@pytest.fixture
def env(tiny: Cascade, ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Env:
    session = Session()
    session.configure(**FAST)
    session.use(tiny)
    monkeypatch.setattr(session_module, "_session", session)
    monkeypatch.chdir(tmp_path)
    ip.run_line_magic("load_ext", "cascade_lab")
    return Env(tiny, ip, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("row", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(row: Case, env: Env) -> None:
    row.check(env)


def test_catalogue_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 35


def test_docs_errors_md_is_generated_from_this_catalogue() -> None:
    """``docs/errors.md`` is the table of `CASES`; regenerate it with ``python tools/errors_table.py``."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    try:
        from errors_table import render
    finally:
        sys.path.pop(0)
    expected = render(CASES)
    current = (Path(__file__).parents[1] / "docs" / "errors.md").read_text(encoding="utf-8")
    assert current == expected, "docs/errors.md is out of date: run `python tools/errors_table.py`"
