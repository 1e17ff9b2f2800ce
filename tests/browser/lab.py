"""A JupyterLab server on localhost and a notebook opened in headless Chromium, driven through Playwright.

`JupyterLab` starts ``python -m jupyterlab`` of this interpreter (a random free port, a token, a temporary root,
config, data and settings folders, and a kernelspec whose argv is this very interpreter), so nothing on the
machine's own Jupyter setup is used or changed. `Notebook` writes a notebook into the root, opens it in a page,
runs its cells through JupyterLab's own commands (``--LabApp.expose_app_in_browser`` puts the app on ``window``)
and reads what the widgets rendered from the DOM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

KERNEL = "cascade_lab_browser"
INSTALL = ("install the browser test tools: `apt-get install -y chromium` and "
           "`.venv/bin/pip install -e \".[browser]\"` (.ci/run does both)")


def chromium_path() -> str | None:
    """Debian's Chromium (Playwright's own browser download is not reachable from CI), or None."""
    for name in (os.environ.get("CASCADE_LAB_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class JupyterLab:
    """``python -m jupyterlab`` on 127.0.0.1 in a throwaway home; `stop` ends it and its kernels."""

    def __init__(self, home: Path, *, startup_s: float = 90) -> None:
        self.home, self.root = home, home / "root"
        self.port, self.token = free_port(), secrets.token_hex(16)
        env = self._environment()
        self.log = (home / "jupyterlab.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", "--ServerApp.allow_root=True",
             "--LabApp.expose_app_in_browser=True"],
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(startup_s)

    def _environment(self) -> dict[str, str]:
        for sub in ("root", "config", "data", "runtime", "settings", "workspaces", "ipython", "path/kernels/" + KERNEL):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "cascade_lab (browser tests)", "language": "python",
                "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}  # the 2-core CI machine is shared
        (self.home / "path/kernels" / KERNEL / "kernel.json").write_text(json.dumps(spec))
        (self.home / "config/labconfig").mkdir(exist_ok=True)  # no "would you like news?" toast over the notebook
        (self.home / "config/labconfig/page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        env = dict(os.environ)
        env.update(JUPYTER_PATH=str(self.home / "path"), JUPYTER_CONFIG_DIR=str(self.home / "config"),
                   JUPYTER_DATA_DIR=str(self.home / "data"), JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(self.home / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"), IPYTHONDIR=str(self.home / "ipython"),
                   MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
        return env

    def _wait_ready(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"JupyterLab did not answer within {startup_s:.0f} s:\n{self.log_text()}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str) -> str:
        return f"{self.base}/lab/tree/{notebook}?token={self.token}&reset"

    def log_text(self, tail: int = 4000) -> str:
        self.log.flush()
        return (self.home / "jupyterlab.log").read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the server shuts its kernels down on SIGTERM
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code cells bound to the test kernel (so Lab starts it without asking)."""
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": KERNEL, "display_name": "cascade_lab (browser tests)",
                                      "language": "python"}},
          "cells": [{"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "execution_count": None,
                     "outputs": [], "source": source} for i, source in enumerate(cells)]}
    path.write_text(json.dumps(nb))
    return path


# Records, for cell `i`, what its output area showed over time: the distinct <img> sources, the most images
# shown at once, and the highest value each progress bar reached (by the text left of it: "Stage C").
RECORDER = """(i) => {
  const log = window.__cascadeLog = {images: [], maxImages: 0, bars: {}, texts: []};
  const cell = () => document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
  const look = () => {
    const area = cell() && cell().querySelector('.jp-OutputArea');
    if (!area) return;
    const images = area.querySelectorAll('.jp-OutputArea-output img');
    log.maxImages = Math.max(log.maxImages, images.length);
    for (const img of images) {
      if (img.src && log.images[log.images.length - 1] !== img.src) log.images.push(img.src);
    }
    for (const box of area.querySelectorAll('.widget-hprogress, .widget-progress')) {
      const row = box.closest('.widget-hbox') || box.parentElement;
      const label = (row.querySelector('.widget-html-content') || {}).textContent || '?';
      const name = label.split(':')[0].replace(/[\\s\\u2007]+/g, ' ').trim() || '?';
      const bar = box.querySelector('.progress-bar');
      const pct = bar ? parseFloat(bar.style.width || bar.style.height || '0') : 0;
      log.bars[name] = Math.max(log.bars[name] || 0, pct);
    }
  };
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                     characterData: true});
  look();
}"""


class Notebook:
    """One notebook open in a Playwright page: run cells, wait on the kernel, read outputs."""

    def __init__(self, page: Any, lab: JupyterLab, name: str, cells: list[str], *, timeout_s: float = 90) -> None:
        self.page, self.lab, self.name, self.cells = page, lab, name, cells
        self._counts: dict[int, int | None] = {}  # each cell's execution count before its latest run
        write_notebook(lab.root / name, cells)
        page.goto(lab.url(name))
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                               "window.jupyterapp.shell.currentWidget.content && "
                               "window.jupyterapp.shell.currentWidget.content.widgets && "
                               f"window.jupyterapp.shell.currentWidget.content.widgets.length === {len(cells)}",
                               timeout=timeout_s * 1000)
        self.wait_kernel_idle(timeout_s)
        # every error the kernel reports (a cell's, or a widget callback's, which Lab only logs) is kept here
        page.evaluate("""() => { window.__kernelErrors = [];
            window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.anyMessage.connect((_, m) => {
                if (m.direction === 'recv' && m.msg.header.msg_type === 'error')
                    window.__kernelErrors.push(m.msg.content.ename + ': ' + m.msg.content.evalue); }); }""")

    def kernel_errors(self) -> list[str]:
        """Errors the kernel reported since the notebook opened, as 'Name: message'."""
        return list(self.page.evaluate("() => window.__kernelErrors"))

    def wait_kernel_idle(self, timeout_s: float = 90) -> None:
        self.page.wait_for_function(
            "() => { const w = window.jupyterapp.shell.currentWidget; const k = w.sessionContext.session && "
            "w.sessionContext.session.kernel; return k && k.connectionStatus === 'connected' && "
            "k.status === 'idle'; }", timeout=timeout_s * 1000)

    def record(self, index: int) -> None:
        """Start recording cell ``index``'s output area (see `RECORDER`); read it with `recorded`."""
        self.page.evaluate(RECORDER, index)

    def recorded(self) -> dict[str, Any]:
        return dict(self.page.evaluate("() => window.__cascadeLog"))

    def run(self, index: int, *, wait: bool = True, timeout_s: float = 120) -> None:
        """Run cell ``index`` as a person would (select it, Shift+Enter's command); wait for it to finish."""
        self._counts[index] = self.page.evaluate(
            "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.executionCount", index)
        self.page.evaluate("""(i) => {
            const panel = window.jupyterapp.shell.currentWidget; panel.content.activeCellIndex = i;
            panel.content.deselectAll();
            window.jupyterapp.commands.execute('notebook:run-cell');  // not awaited: it resolves when the cell ends
        }""", index)
        if wait:
            self.wait_done(index, timeout_s)

    def wait_done(self, index: int, timeout_s: float = 120) -> None:
        """Until cell ``index`` has a new execution count (it ran) and the kernel is idle again."""
        self.page.wait_for_function(
            """([i, before]) => { const w = window.jupyterapp.shell.currentWidget; const cell = w.content.widgets[i];
                const k = w.sessionContext.session.kernel; const count = cell.model.executionCount;
                return count !== null && count !== before && k.status === 'idle'; }""",
            arg=[index, self._counts.get(index)], timeout=timeout_s * 1000)

    def output(self, index: int) -> Any:
        """The output area of cell ``index`` (a Playwright locator)."""
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea")

    def output_text(self, index: int) -> str:
        return str(self.output(index).inner_text())

    def add_and_run(self, source: str, timeout_s: float = 60) -> str:
        """Append a cell with ``source``, run it, return its output text (the kernel is still usable)."""
        index = int(self.page.evaluate("""(source) => {
            const panel = window.jupyterapp.shell.currentWidget; const nb = panel.content;
            nb.activeCellIndex = nb.widgets.length - 1;
            return window.jupyterapp.commands.execute('notebook:insert-cell-below').then(() => {
                nb.activeCell.model.sharedModel.setSource(source); return nb.activeCellIndex; });
        }""", source))
        self.run(index, timeout_s=timeout_s)
        return self.output_text(index)
