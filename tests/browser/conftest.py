"""Fixtures of the browser suite: one JupyterLab server and one headless Chromium for the session, a fresh page
(and so a fresh kernel per notebook) per test. Missing tools fail the tests with how to install them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .lab import INSTALL, JupyterLab, chromium_path

LAPTOP = {"width": 1280, "height": 800}


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ModuleNotFoundError:
        pytest.fail(f"playwright is not installed; {INSTALL}", pytrace=False)
    return sync_playwright


@pytest.fixture(scope="package")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterLab]:
    try:
        import jupyterlab  # noqa: F401
    except ModuleNotFoundError:
        pytest.fail(f"jupyterlab is not installed; {INSTALL}", pytrace=False)
    server = JupyterLab(tmp_path_factory.mktemp("jupyterlab"))
    yield server
    server.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    sync_playwright = _playwright()
    executable = chromium_path()
    if executable is None:
        pytest.fail(f"no Chromium found on PATH (or in CASCADE_LAB_CHROMIUM); {INSTALL}", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, lab: JupyterLab) -> Iterator[Any]:
    """A fresh browser context at a laptop's size; its notebooks' kernels are shut down afterwards."""
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    try:  # free the 2 CPU cores for the next test: stop this test's kernels
        page.evaluate("() => window.jupyterapp && window.jupyterapp.serviceManager.sessions.shutdownAll()")
    except Exception as exc:  # a page that never loaded JupyterLab has no kernels to stop
        print(f"could not stop the test's kernels: {exc}")
    context.close()
