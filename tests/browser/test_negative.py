"""The suite's checks fail when the page is broken: no widget front end, a button handler that raises, a preview
that never updates, a slider whose handler does nothing. A check that cannot fail is not a check."""

from __future__ import annotations

import pytest

from . import checks
from .lab import Notebook

pytestmark = pytest.mark.browser


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wait less for widgets that are known not to come."""
    monkeypatch.setattr(checks, "WIDGET_TIMEOUT_MS", 8_000)


def test_checks_fail_without_the_widget_front_end(page, lab, quick) -> None:  # type: ignore[no-untyped-def]
    # JupyterLab without @jupyter-widgets/jupyterlab-manager (what a missing jupyterlab_widgets looks like):
    # widget outputs fall back to their text, "HBox(children=...)"
    blocked: list[str] = []
    page.route("**/lab/extensions/@jupyter-widgets/jupyterlab-manager/**",
               lambda route: (blocked.append(route.request.url), route.abort()))
    nb = Notebook(page, lab, "no_widgets.ipynb", checks.cascade_cells())
    with pytest.raises(AssertionError, match="no progress bar rendered as a widget"):
        checks.check_cascade_cell(nb)
    assert blocked, "the widget manager was not requested, so blocking it proved nothing"
    nb.add_and_run("%cascade panel")
    with pytest.raises(AssertionError, match="no generation panel rendered"):
        checks.Panel(nb, index=3)


def test_panel_check_fails_when_the_generate_handler_raises(page, lab, quick) -> None:  # type: ignore[no-untyped-def]
    nb = Notebook(page, lab, "broken_panel.ipynb", checks.panel_cells(broken_generate=True))
    with pytest.raises(AssertionError, match="a deliberately broken Generate handler"):
        checks.check_panel_generate(nb)


def test_cascade_check_fails_when_the_preview_never_updates(page, lab) -> None:  # type: ignore[no-untyped-def]
    # one preview at the first step, none after: the interval outlasts the run
    nb = Notebook(page, lab, "still_preview.ipynb", checks.cascade_cells(preview_interval=600))
    with pytest.raises(AssertionError, match=r"the live preview showed 1 distinct frame"):
        checks.check_cascade_cell(nb)


def test_inspector_check_fails_when_the_slider_does_nothing(page, lab, quick) -> None:  # type: ignore[no-untyped-def]
    nb = Notebook(page, lab, "frozen_inspector.ipynb", checks.inspector_cells(frozen_slider=True))
    with pytest.raises(AssertionError, match="moving the step slider to 0 did not change the trajectory image"):
        checks.check_inspector(nb)
