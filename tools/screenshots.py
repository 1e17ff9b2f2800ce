"""Screenshots of the notebook front ends for the README: a %%cascade cell (running and done), the generation
panel (a result, a wrong width), the latent inspector (trajectory, statistics) and the training panel (stopped),
each at 1280×800 and 800×1000, written to docs/screenshots/<scene>_<width>x<height>.png, with a list of the
widgets that overflow their output or cut their text (what to fix at a narrow width).

It drives JupyterLab in headless Chromium with the browser suite's own harness and checks (tests/browser), so a
screenshot is only taken of a state the suite accepts. Not part of the test run; needs what the browser tests
need (`apt-get install -y chromium`, `pip install -e ".[browser]"`). About 3 minutes on 2 cores:

    .venv/bin/python tools/screenshots.py [--out docs/screenshots] [--only panel inspector]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import checks  # noqa: E402
from browser.lab import JupyterLab, Notebook, chromium_path  # noqa: E402

VIEWPORTS = [(1280, 800), (800, 1000)]


def tidy(page: Any) -> None:
    """What a person on a laptop does first: close the file browser, so the notebook gets the width."""
    page.evaluate("() => { const shell = window.jupyterapp.shell; shell.collapseLeft(); shell.collapseRight(); }")
    page.wait_for_timeout(300)


def show(nb: Notebook, index: int, *, offset: int = 0) -> None:
    """Scroll the notebook so cell ``index``'s output starts at the top of the view (``offset`` px above it)."""
    nb.page.evaluate("""([i, offset]) => {
        const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
        const area = cell.querySelector('.jp-OutputArea') || cell;
        const scroller = cell.closest('.jp-WindowedPanel-outer') || cell.closest('.jp-Notebook');
        scroller.scrollTop += area.getBoundingClientRect().top - scroller.getBoundingClientRect().top - offset;
    }""", [index, offset])
    nb.page.mouse.move(1, 1)  # no hover highlight or tooltip in the picture
    nb.page.wait_for_timeout(400)


# Every widget of the page's outputs that reaches past its output area's right edge, and every button, label or
# checkbox whose text is cut (scrollWidth > clientWidth: an ellipsis or hidden overflow)
OVERFLOW = """() => {
  const found = [];
  const name = e => {
    const label = e.querySelector && e.querySelector(':scope > label');
    return ((label && label.textContent) || e.getAttribute('title') || e.textContent || '').trim().slice(0, 40)
      || e.className.split(' ').filter(c => c.startsWith('widget-'))[0] || e.tagName;
  };
  for (const out of document.querySelectorAll('.jp-OutputArea-output')) {
    const edge = out.getBoundingClientRect().right;
    for (const e of out.querySelectorAll('.jupyter-widgets, button, label')) {
      const r = e.getBoundingClientRect();
      if (!r.width || e.closest('.lm-mod-hidden')) continue;
      if (r.right > edge + 1) found.push(`${name(e)}: ${Math.round(r.right - edge)} px past the right edge`);
      else if (['BUTTON', 'LABEL'].includes(e.tagName) && e.scrollWidth > e.clientWidth + 1)
        found.push(`${name(e)}: text cut (${e.scrollWidth} px wide in ${e.clientWidth} px)`);
    }
  }
  return [...new Set(found)];
}"""


def cascade(lab: JupyterLab, page: Any, shoot: Callable[[str], None]) -> None:
    cells = [*checks.cascade_cells(), "%cascade config preview_interval=0.3",
             f"%%cascade --seed 11 --steps-c 3000 --steps-b 4\n{checks.PROMPT}"]  # slow: caught mid-run
    nb = Notebook(page, lab, "cascade_cell.ipynb", cells)
    tidy(page)
    checks.check_cascade_cell(nb)
    show(nb, 1, offset=60)
    shoot("cascade_cell")
    nb.run(3)
    nb.run(4, wait=False)
    for what in (".widget-hprogress, .widget-progress", "img"):  # attached: off-screen cells are not "visible"
        nb.output(4).locator(what).first.wait_for(state="attached", timeout=60_000)
    page.wait_for_timeout(1500)
    show(nb, 4, offset=60)
    shoot("cascade_cell_running")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:interrupt-kernel')")
    nb.wait_done(4)


def panel(lab: JupyterLab, page: Any, shoot: Callable[[str], None]) -> None:
    nb = Notebook(page, lab, "panel.ipynb", checks.panel_cells())
    tidy(page)
    p = checks.check_panel_generate(nb)
    checks.check_panel_copy(nb, p)
    show(nb, 1)
    shoot("panel")
    checks.check_panel_invalid_width(nb, p)
    show(nb, 1)
    shoot("panel_error")


def inspector(lab: JupyterLab, page: Any, shoot: Callable[[str], None]) -> None:
    nb = Notebook(page, lab, "inspector.ipynb", checks.inspector_cells())
    tidy(page)
    checks.check_inspector(nb)
    show(nb, 2)
    shoot("inspector_trajectory")
    root = nb.output(2).locator(".widget-tab").first
    root.locator(".lm-TabBar-tab", has_text="Statistics").first.click()
    show(nb, 2)
    shoot("inspector_statistics")


def training(lab: JupyterLab, page: Any, shoot: Callable[[str], None]) -> None:
    shutil.rmtree(lab.root / "run", ignore_errors=True)  # a fresh run each time, not one resumed
    checks.write_training_files(lab.root)
    nb = Notebook(page, lab, "training.ipynb", checks.training_cells())
    tidy(page)
    checks.check_training(nb)
    show(nb, 1)
    shoot("training_panel")


SCENES = {"cascade": cascade, "panel": panel, "inspector": inspector, "training": training}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--only", nargs="+", choices=list(SCENES), default=list(SCENES))
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        parser.error("no Chromium found: apt-get install -y chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as home, sync_playwright() as p:
        lab = JupyterLab(Path(home))
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            for width, height in VIEWPORTS:
                for name in args.only:
                    started = time.monotonic()
                    context = browser.new_context(viewport={"width": width, "height": height})
                    page = context.new_page()
                    page.set_default_timeout(60_000)

                    def shoot(scene: str, page: Any = page, width: int = width, height: int = height) -> None:
                        path = args.out / f"{scene}_{width}x{height}.png"
                        page.screenshot(path=str(path))
                        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
                        for problem in page.evaluate(OVERFLOW):
                            print(f"    layout: {problem}")

                    SCENES[name](lab, page, shoot)
                    page.evaluate("() => window.jupyterapp.serviceManager.sessions.shutdownAll()")
                    context.close()
                    print(f"  {name} at {width}x{height}: {time.monotonic() - started:.0f} s")
        finally:
            browser.close()
            lab.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
