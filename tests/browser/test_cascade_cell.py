"""(a) A ``%%cascade`` cell in JupyterLab: progress bars, live preview in place, the result and its parameters."""

from __future__ import annotations

import pytest

from .checks import cascade_cells, check_cascade_cell
from .lab import Notebook

pytestmark = pytest.mark.browser


def test_cascade_cell_shows_progress_live_previews_then_the_result(page, lab) -> None:  # type: ignore[no-untyped-def]
    nb = Notebook(page, lab, "cascade_cell.ipynb", cascade_cells())
    log = check_cascade_cell(nb)
    assert log["bars"]["Stage C"] == 100
