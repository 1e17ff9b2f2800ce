"""Shared fixtures: where the official reference numbers live, and a fresh IPython shell."""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("CASCADE_LAB_REFERENCE", REPO.parent / "shared" / "reference"))


def reference_dir(*parts: str) -> Path:
    """A folder of ../shared/reference; fails in CI when missing, skips elsewhere with the reason."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        message = f"reference data not found at {path} (set CASCADE_LAB_REFERENCE)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_fixture(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config.json, weights, io) of ../shared/reference/fixtures/<name>, tensors cloned (aligned)."""
    from safetensors.torch import load_file

    d = reference_dir("fixtures", name)
    cfg = json.loads((d / "config.json").read_text())
    weights = {k: v.clone() for k, v in load_file(str(d / "weights.safetensors")).items()}
    io = {k: v.clone() for k, v in load_file(str(d / "io.safetensors")).items()}
    return cfg, weights, io


def call_kwargs(call: dict[str, Any], io: dict[str, Any]) -> dict[str, Any]:
    """Turn a config.json call's kwargs into real arguments (tensor names, lists, literals)."""
    out: dict[str, Any] = {}
    for k, v in call["kwargs"].items():
        if isinstance(v, list):
            out[k] = [None if n is None else io[n] for n in v]
        elif isinstance(v, dict):
            out[k] = v["literal"]
        else:
            out[k] = io[v]
    return out


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Rows (key, shape, dtype) of ../shared/reference/manifests/<name>.tsv in official order."""
    path = reference_dir("manifests") / f"{name}.tsv"
    rows = []
    for line in path.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else (), dtype))
    return rows


def assert_matches_manifest(model: Any, name: str) -> None:
    """Keys (any order), shapes and dtypes of model.state_dict() equal manifests/<name>.tsv."""
    expected = {key: (shape, dtype) for key, shape, dtype in read_manifest(name)}
    actual = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not unexpected, (
        f"{name}: {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
    )
    wrong = {k: f"{actual[k]} != manifest {expected[k]}" for k in expected if actual[k] != expected[k]}
    assert not wrong, f"{name}: {len(wrong)} shape/dtype mismatches, e.g. {dict(list(wrong.items())[:8])}"


@pytest.fixture
def ip():
    """A fresh InteractiveShell per test: history off, errors re-raised (jupysql's _testing style)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    yield shell
    InteractiveShell.clear_instance()
    # IPython registers every shell's atexit_operations (a namespace reset with a full gc.collect()): kept, the
    # session's hundreds of shells stayed alive to the end and their resets took ~70 s at interpreter exit
    atexit.unregister(shell.atexit_operations)


@pytest.fixture(autouse=True)
def _hub_reachable_in_tests(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Tests stand in for the Hub (mocked downloads, offline caches): the one-connection reachability probe of
    `weights.locate` answers "reachable" unless a test asks for the real probe (marker ``real_hub_probe``)."""
    if request.node.get_closest_marker("real_hub_probe") is None:
        import importlib

        locate_module = importlib.import_module("cascade_lab.weights.locate")  # the package exports a function of it
        monkeypatch.setattr(locate_module, "hub_unreachable", lambda timeout=3.0: None)


def widget_of(output: Any) -> Any:
    """The ipywidgets instance a captured display output shows (its widget-view model id)."""
    import ipywidgets

    return ipywidgets.widgets.widget._instances[output.data["application/vnd.jupyter.widget-view+json"]["model_id"]]


PRODUCT_OPS = ("mm", "addmm", "_linear_pointwise", "_scaled_dot_product_flash_attention_for_cpu")


def count_products(fn: Any) -> int:
    """How many matrix products and forward attention kernels `fn()` runs (a dispatch mode below autograd: products
    that selective checkpointing serves from its cache are not run, so not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.overloadpacket.__name__ in PRODUCT_OPS:
                count[0] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return count[0]
