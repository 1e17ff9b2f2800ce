"""(c) The latent inspector and (d) the training panel in JupyterLab."""

from __future__ import annotations

import pytest

from .checks import check_inspector, check_training, inspector_cells, training_cells, write_training_files
from .lab import Notebook

pytestmark = pytest.mark.browser


def test_latent_inspector_slider_channels_and_histograms(page, lab) -> None:  # type: ignore[no-untyped-def]
    nb = Notebook(page, lab, "inspector.ipynb", inspector_cells())
    sizes = check_inspector(nb)
    assert sizes["channels"][0] > 300 and sizes["histograms"][0] > 300, sizes


def test_training_panel_start_plot_grows_stop_leaves_a_checkpoint(page, lab) -> None:  # type: ignore[no-untyped-def]
    write_training_files(lab.root)
    nb = Notebook(page, lab, "training.ipynb", training_cells())
    check_training(nb)
