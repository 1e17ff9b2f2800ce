"""(b) The generation panel in JupyterLab: fields set in the DOM, Generate, copy as %%cascade, Cancel, errors."""

from __future__ import annotations

import pytest

from .checks import check_panel_cancel, check_panel_copy, check_panel_generate, check_panel_invalid_width, panel_cells
from .lab import Notebook

pytestmark = pytest.mark.browser


def test_generation_panel_generate_copy_cancel_and_a_wrong_width(page, lab) -> None:  # type: ignore[no-untyped-def]
    nb = Notebook(page, lab, "panel.ipynb", panel_cells())
    panel = check_panel_generate(nb)
    check_panel_copy(nb, panel)
    check_panel_cancel(nb, panel)
    check_panel_invalid_width(nb, panel)
