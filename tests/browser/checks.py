"""The checks of the browser suite, one function per thing a person sees; the tests call them on working
notebooks and, in test_negative.py, on deliberately broken ones, where each must fail.

Each check takes an open `Notebook` whose cells were written by the matching ``*_cells`` function, so a broken
variant is the same notebook with one cell changed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tempfile
from pathlib import Path
from typing import Any

from cascade_lab import read_png_params

from .lab import Notebook

PROMPT = "a red circle at the top left on a blue background"
LOAD = "%load_ext cascade_lab\n%cascade config variant=demo"
WIDGET_TIMEOUT_MS = 30_000


def _bytes(src: str) -> bytes:
    """The bytes of a ``data:`` URL (what JupyterLab and ipywidgets put in an <img>)."""
    head, _, payload = src.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), f"not a base64 data URL: {src[:60]!r}"
    return base64.b64decode(payload)


def image_bytes(img: Any) -> bytes:
    """The bytes an <img> locator shows, whether a data: URL (outputs) or a blob: URL (ipywidgets' Image)."""
    url = img.evaluate("""async img => { const blob = await (await fetch(img.src)).blob();
        return await new Promise(done => { const r = new FileReader(); r.onload = () => done(r.result);
                                           r.readAsDataURL(blob); }); }""")
    return _bytes(str(url))


def _digest(src: str) -> str:
    """A short hash of an <img> source and its format, e.g. 'jpeg:3fa2…' (data: URLs are long)."""
    if not src.startswith("data:"):
        return f"url:{src[:40]}"
    kind = re.match(r"data:image/(\w+)", src)
    return f"{kind[1] if kind else '?'}:{hashlib.sha1(_bytes(src)).hexdigest()[:10]}"


# -- (a) a %%cascade cell ------------------------------------------------------------------------------------
def cascade_cells(*, preview_interval: float = 0) -> list[str]:
    """Load, a cell that generates (every Stage C step previews at interval 0), and one reading the result."""
    return [LOAD + f"\n%cascade config preview_interval={preview_interval:g}",
            f"%%cascade --seed 3 --steps-c 24 --steps-b 8 -o fox\n{PROMPT}",
            "print(fox.params.seed, fox.params.steps_c, fox.params.variant)"]


def check_cascade_cell(nb: Notebook) -> dict[str, Any]:
    """Cell 1 of `cascade_cells`: bars render and reach 100 %, ≥ 2 distinct previews in one place, then the PNG
    result replaces them and the caption carries the parameters. Returns what was recorded."""
    nb.run(0)
    nb.record(1)
    nb.run(1)
    log = nb.recorded()
    out = nb.output(1)
    frames = [_digest(src) for src in log["images"]]
    previews = [f for f in frames if f.startswith("jpeg:")]
    assert log["bars"], f"no progress bar rendered as a widget; the output shows: {nb.output_text(1)[:300]!r}"
    for name in ("Stage C", "Stage B"):
        assert log["bars"].get(name, 0) >= 100, f"progress bar {name!r} reached {log['bars'].get(name)} % " \
                                                f"(all bars: {log['bars']})"
    assert len(set(previews)) >= 2, f"the live preview showed {len(set(previews))} distinct frame(s): {frames}"
    assert log["maxImages"] == 1, f"{log['maxImages']} images at once: the preview was appended, not updated in place"
    images = out.locator(".jp-OutputArea-output img")
    assert images.count() == 1, f"{images.count()} images after the run (want the result alone)"
    final = _digest(images.first.get_attribute("src") or "")
    assert final.startswith("png:") and final not in previews, f"the final image is {final}, not a new PNG"
    text = nb.output_text(1)
    assert re.search(r"seed 3 · demo · 128x128 · C \S+ 24 steps", text), f"no parameter caption in {text!r}"
    with tempfile.TemporaryDirectory() as folder:  # the PNG as a person saves it from the page
        saved = Path(folder) / "result.png"
        saved.write_bytes(_bytes(images.first.get_attribute("src") or ""))
        params = read_png_params(saved)
    assert (params.prompt, params.seed, params.steps_c) == (PROMPT, 3, 24), f"the PNG carries {params}"
    nb.run(2)
    assert nb.output_text(2).strip() == "3 24 demo", nb.output_text(2)
    assert not nb.kernel_errors(), nb.kernel_errors()
    return log


# -- (b) the generation panel --------------------------------------------------------------------------------
def panel_cells(*, broken_generate: bool = False) -> list[str]:
    """Load (Stage C starting at 2500 steps, so that a run lasts long enough to be cancelled), then the panel;
    ``broken_generate``: the same panel whose Generate handler raises."""
    panel = "%cascade panel"
    if broken_generate:
        panel = ("from cascade_lab.notebook.panel import GenerationPanel\npanel = GenerationPanel()\n"
                 "def broken():\n    raise RuntimeError('a deliberately broken Generate handler')\n"
                 "panel.generate = broken  # what the button's handler calls\npanel")
    return [LOAD + "\n%cascade config steps_c=2500 preview_interval=0", panel]


class Panel:
    """The generation panel as a person sees it: labelled fields, buttons, status, error box, gallery."""

    def __init__(self, nb: Notebook, index: int = 1) -> None:
        self.nb, self.root = nb, nb.output(index).locator(".widget-vbox").first
        try:
            self.root.locator("button:has-text('Generate')").wait_for(timeout=WIDGET_TIMEOUT_MS)
        except Exception as exc:
            raise AssertionError(f"no generation panel rendered; the output shows {nb.output_text(index)[:300]!r}"
                                 ) from exc

    def field(self, kind: str, label: str, nth: int = 0) -> Any:
        """The input of the ``nth`` widget of CSS class ``widget-<kind>`` whose label reads ``label``."""
        return self.root.locator(f".widget-{kind}:has(> label:text-is('{label}'))").nth(nth)

    def type_into(self, kind: str, label: str, value: str, nth: int = 0) -> None:
        box = self.field(kind, label, nth).locator("input")
        box.fill(value)
        box.press("Enter")  # number boxes sync on Enter or blur

    def set_steps(self, stage: int, steps: int) -> None:
        """Type into the ``steps`` slider's readout (stage 0 is C, 1 is B), as a person edits a slider's number."""
        readout = self.field("slider", "steps", stage).locator(".widget-readout")
        readout.fill(str(steps))
        readout.press("Enter")

    def button(self, text: str) -> Any:
        return self.root.locator(f"button:has-text('{text}')").first

    def status(self) -> str:
        # the status HTML sits in the row of the Generate button, after the progress bar
        row = self.root.locator(".widget-hbox:has(button:has-text('Generate'))").first
        return str(row.locator(".widget-html-content").last.inner_text())

    def wait_status(self, pattern: str, timeout_ms: int = 120_000) -> str:
        """Until the status line matches the regular expression ``pattern``; the status then."""
        row = self.root.locator(".widget-hbox:has(button:has-text('Generate'))").first
        try:
            row.locator(".widget-html-content", has_text=re.compile(pattern)).last.wait_for(timeout=timeout_ms)
        except Exception as exc:
            raise AssertionError(f"the panel's status never matched {pattern!r}; it reads {self.status()!r}; "
                                 f"error box: {self.error_text()!r}; kernel errors: {self.nb.kernel_errors()}") from exc
        return self.status()

    def error_text(self) -> str:
        boxes = self.root.locator("div[style*='color']")
        return str(boxes.first.inner_text()) if boxes.count() else ""

    def gallery_items(self) -> Any:
        # an entry: thumbnails, then the summary and its buttons (which sit in an inner box of their own)
        return self.root.locator(".widget-hbox:has(> img.widget-image):has(button:has-text('copy as %%cascade'))")


def check_panel_generate(nb: Notebook) -> Panel:
    """Set prompt, size, seed, Stage C sampler and steps in the DOM; Generate; the gallery shows the image with
    exactly those settings."""
    nb.run(0)
    nb.run(1)
    panel = Panel(nb)
    panel.root.locator("textarea[placeholder='prompt']").fill(PROMPT)
    panel.field("dropdown", "size").locator("select").select_option(label="128 × 128")
    panel.root.locator(".widget-checkbox:has-text('new seed each run') input").uncheck()  # else 42 is replaced
    panel.type_into("text", "seed", "42")
    panel.field("dropdown", "sampler", 0).locator("select").select_option(label="ddim (official)")
    panel.set_steps(0, 12)
    panel.button("Generate").click()
    panel.wait_status(r"^(starting|Stage|done)", timeout_ms=WIDGET_TIMEOUT_MS)  # the click reached the handler
    panel.wait_status(r"^done in")
    items = panel.gallery_items()
    assert items.count() == 1, f"{items.count()} gallery items after one run"
    summary = items.first.inner_text()
    for expected in (PROMPT, "128×128, seed 42", "variant demo", "C: 12 steps", "ddim/cosine"):
        assert expected in summary, f"{expected!r} not in the gallery entry {summary!r}"
    thumb = items.first.locator("img").first
    assert image_bytes(thumb).startswith(b"\x89PNG"), "no PNG thumbnail in the gallery"
    assert thumb.evaluate("img => img.naturalWidth") == 128, "the thumbnail did not load as a 128 px image"
    assert not nb.kernel_errors(), nb.kernel_errors()
    return panel


def check_panel_copy(nb: Notebook, panel: Panel) -> str:
    """"copy as %%cascade" shows the cell text; run as a new cell, it makes the gallery's image again."""
    from PIL import Image, ImageChops

    item = panel.gallery_items().first
    item.locator("button:has-text('copy as %%cascade')").click()
    area = panel.root.locator("textarea[placeholder='%%cascade cell']")
    area.wait_for(state="visible", timeout=WIDGET_TIMEOUT_MS)
    text = str(area.input_value())
    assert text.startswith("%%cascade --seed 42 --size 128x128 --variant demo --steps-c 12"), text
    assert "--sampler-c ddim --sampler-b ddpm" in text and text.endswith("\n" + PROMPT), text
    nb.add_and_run(text.replace("%%cascade ", "%%cascade -o again ", 1))
    cells = nb.page.locator(".jp-Notebook .jp-Cell")
    again = cells.nth(cells.count() - 1).locator(".jp-OutputArea-output img").first
    thumb = item.locator("img").first
    a, b = (Image.open(io.BytesIO(image_bytes(x))).convert("RGB") for x in (again, thumb))
    assert a.size == b.size and ImageChops.difference(a, b).getbbox() is None, "the copied cell made another image"
    return text


def check_panel_cancel(nb: Notebook, panel: Panel) -> None:
    """A long run (2500 Stage C steps): Cancel mid-run → "cancelled", Generate is back, the kernel answers."""
    panel.set_steps(0, 2500)
    panel.button("Generate").click()
    panel.wait_status(r"Stage C step \d+/2500", timeout_ms=60_000)
    assert panel.button("Generate").is_disabled(), "Generate stays enabled while a job runs"
    panel.button("Cancel").click()
    status = panel.wait_status(r"^cancelled", timeout_ms=30_000)
    stopped = re.search(r"before step (\d+)", status)
    assert stopped and 0 < int(stopped[1]) < 2500, f"not stopped mid-run: {status!r}"
    assert not panel.button("Generate").is_disabled() and panel.button("Cancel").is_disabled()
    assert nb.add_and_run("print(6 * 7)").strip() == "42", "the kernel does not answer after Cancel"


def check_panel_invalid_width(nb: Notebook, panel: Panel) -> str:
    """Width 100 (not a multiple of 8): the panel's error box says so, in red, and nothing runs."""
    panel.type_into("text", "width", "100")
    panel.button("Generate").click()
    box = panel.root.locator("div[style*='color']", has_text="width=100")
    try:
        box.first.wait_for(timeout=WIDGET_TIMEOUT_MS)
    except Exception as exc:
        raise AssertionError(f"no error about width=100 in the panel; status {panel.status()!r}") from exc
    colour = box.first.evaluate("e => getComputedStyle(e).color")
    assert colour == "rgb(176, 0, 32)", f"the error is shown in {colour}, not red"
    assert "multiple of 8" in box.first.inner_text()
    assert not panel.button("Generate").is_disabled(), "a refused run left Generate disabled"
    return str(box.first.inner_text())


# -- (c) the latent inspector --------------------------------------------------------------------------------
def inspector_cells(*, frozen_slider: bool = False) -> list[str]:
    """A result and its inspector; ``frozen_slider``: an inspector whose slider handler does nothing."""
    inspect = "%cascade inspect r"
    if frozen_slider:
        inspect = ("from cascade_lab.notebook.inspector import LatentInspector\ninspector = LatentInspector(r)\n"
                   "inspector.show_step = lambda step: None  # what the slider's handler calls\ninspector")
    return [LOAD, f"%%cascade --seed 5 --steps-c 10 -o r\n{PROMPT}", inspect]


def _tab(root: Any, title: str) -> None:
    root.locator(".lm-TabBar-tab", has_text=title).first.click()


def _loaded(img: Any, what: str) -> tuple[int, int]:
    """Wait until an <img> has loaded and is laid out; its natural (width, height)."""
    try:
        img.wait_for(state="visible", timeout=WIDGET_TIMEOUT_MS)
        img.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=WIDGET_TIMEOUT_MS)
    except Exception as exc:
        raise AssertionError(f"the {what} image never rendered") from exc
    box = img.bounding_box()
    assert box and box["width"] > 50 and box["height"] > 50, f"the {what} image is laid out at {box}"
    return img.evaluate("img => [img.naturalWidth, img.naturalHeight]")


def check_inspector(nb: Notebook) -> dict[str, Any]:
    """Channel grid and histograms render; the trajectory slider, moved in the DOM, changes the preview."""
    for i in range(3):
        nb.run(i)
    root = nb.output(2).locator(".widget-tab").first
    try:
        root.wait_for(timeout=WIDGET_TIMEOUT_MS)
    except Exception as exc:
        raise AssertionError(f"no inspector tabs rendered; the output shows {nb.output_text(2)[:300]!r}") from exc
    channels = _loaded(root.locator("img.widget-image:visible").first, "Stage C channel grid")
    _tab(root, "Statistics")
    rows = root.locator("table tbody tr:visible")
    rows.first.wait_for(timeout=WIDGET_TIMEOUT_MS)
    assert rows.count() == 16, f"the statistics table has {rows.count()} rows, not one per Stage C channel"
    histograms = _loaded(root.locator("img.widget-image:visible").first, "histograms")
    _tab(root, "Trajectory")
    image = root.locator("img.widget-image:visible").first
    _loaded(image, "trajectory")
    readout = root.locator(".widget-slider:has(> label:text-is('step')) .widget-readout")
    assert readout.inner_text().strip() == "9", f"the step slider starts at {readout.inner_text()!r}, not the last step"
    last = image_bytes(image)
    readout.fill("0")
    readout.press("Enter")
    try:
        nb.page.wait_for_function("([img, src]) => img.src !== src", arg=[image.element_handle(),
                                                                          image.get_attribute("src")],
                                  timeout=WIDGET_TIMEOUT_MS)
    except Exception as exc:
        raise AssertionError("moving the step slider to 0 did not change the trajectory image") from exc
    first = image_bytes(image)
    assert first != last, "the trajectory image for step 0 is the same as for the last step"
    assert not nb.kernel_errors(), nb.kernel_errors()
    return {"channels": channels, "histograms": histograms}


# -- (d) the training panel ----------------------------------------------------------------------------------
TRAIN_TOML = """model = "tiny"
train_data_dir = "images"
resolution = 128
training_scale = "kohya"
train_batch_size = 4
max_train_steps = 5000
val_every_n_steps = 0
log_every_n_steps = 0
output_dir = "run"
"""


def write_training_files(root: Any) -> None:
    """Four 128 px captioned images and a training TOML in the notebook's folder."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(exist_ok=True)
    for colour in ("red", "blue"):
        for shape in ("square", "disc"):
            image = Image.new("RGB", (128, 128), (230, 230, 230))
            draw = ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)((24, 24, 104, 104), fill=colour)
            image.save(root / "images" / f"{colour}_{shape}.png")
            (root / "images" / f"{colour}_{shape}.txt").write_text(f"a {colour} {shape}")
    (root / "tiny.toml").write_text(TRAIN_TOML)


def training_cells() -> list[str]:
    return [LOAD, "%cascade panel train tiny.toml"]


def check_training(nb: Notebook) -> str:
    """Start a tiny run; the loss plot is redrawn as steps go by; Stop → a resumable checkpoint, on disk."""
    nb.run(0)
    nb.run(1)
    root = nb.output(1).locator(".widget-vbox").first
    try:
        root.locator("button:has-text('Start')").wait_for(timeout=WIDGET_TIMEOUT_MS)
    except Exception as exc:
        raise AssertionError(f"no training panel rendered; the output shows {nb.output_text(1)[:300]!r}") from exc
    row = root.locator(".widget-hbox:has(button:has-text('Start'))").first

    def status() -> str:
        return str(row.locator(".widget-html-content").last.inner_text())

    def step_reached(minimum: int, timeout_ms: int) -> int:
        try:
            nb.page.wait_for_function(
                """([el, n]) => { const m = el.innerText.match(/^step (\\d+)\\//); return m && +m[1] >= n; }""",
                arg=[row.locator(".widget-html-content").last.element_handle(), minimum], timeout=timeout_ms)
        except Exception as exc:
            raise AssertionError(f"the run never reached step {minimum}; status {status()!r}") from exc
        return int(re.match(r"step (\d+)/", status())[1])  # type: ignore[index]

    root.locator("button:has-text('Start')").click()
    plot = root.locator("img.widget-image").first
    first_step = step_reached(1, 180_000)
    _loaded(plot, "loss plot")
    first = image_bytes(plot)
    try:  # the panel redraws at most every 5 s
        nb.page.wait_for_function("([img, src]) => img.src !== src", arg=[plot.element_handle(),
                                                                          plot.get_attribute("src")], timeout=30_000)
    except Exception as exc:
        raise AssertionError(f"the loss plot was not redrawn while the run went on; status {status()!r}") from exc
    later_step = step_reached(first_step + 1, 30_000)
    assert image_bytes(plot) != first and later_step > first_step, "the loss plot did not grow"
    root.locator("button:has-text('Stop')").click()
    try:
        root.locator(".widget-html-content", has_text="resumable checkpoint").last.wait_for(timeout=60_000)
    except Exception as exc:
        raise AssertionError(f"no resumable-checkpoint message after Stop; status {status()!r}") from exc
    message = status()
    found = re.search(r"stopped at step (\d+)/5000; resumable checkpoint (\S+) \(Start resumes it\)", message)
    assert found, message
    checkpoint = nb.lab.root / found[2]
    assert checkpoint.is_dir() and any(checkpoint.iterdir()), f"the checkpoint {checkpoint} is not on disk"
    assert root.locator(".widget-checkbox:has-text('resume') input").is_checked(), "resume is not ticked after Stop"
    assert not root.locator("button:has-text('Start')").is_disabled()
    assert not nb.kernel_errors(), nb.kernel_errors()
    return message
