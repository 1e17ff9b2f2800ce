"""Every notebook in notebooks/ executes without an error on an offline variant (tiny or demo), in a kernel of
this very interpreter (a kernelspec written to a temporary JUPYTER_PATH, so no installed `python3` kernel is used)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "cascade_lab_test"
BUDGET_S = 240  # per notebook; about 30 s on an idle 2-core machine, much more when it is shared


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "cascade_lab tests",
                                                  "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        mp.setenv("MPLBACKEND", "Agg")  # `%matplotlib inline` in a notebook still switches to inline
        yield KERNEL


def test_the_tutorial_notebooks_are_there() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_latent_inspection.ipynb",
                                           "03_sampler_plugin.ipynb", "04_controlnets.ipynb",
                                           "05_comfyui_workflow.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_with_a_tiny_parameters_cell(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit notebooks without outputs"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "the first code cell, and only it, is tagged 'parameters'"
    # the offline variants: tiny (random weights, seconds) or demo (trained shapes, its own ControlNet)
    assert ('VARIANT = "tiny"' in tagged[0].source or 'VARIANT = "demo"' in tagged[0].source) \
        and "change ONLY" in tagged[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, kernel_name: str, tmp_path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))  # which kernel ran
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=BUDGET_S, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})  # files the notebook writes go here
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError with the cell and its traceback on the first error
    elapsed = time.perf_counter() - started
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s"
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert nb.cells[-1].outputs[0]["text"] == sys.executable  # this interpreter, not whatever `python3` is
