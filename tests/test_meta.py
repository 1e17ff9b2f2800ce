"""Datasette-style meta-tests: every hook is documented with its exact signature and has a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from cascade_lab import hookspecs

REPO = Path(__file__).resolve().parents[1]
HOOKS = [name for name, fn in vars(hookspecs).items()
         if inspect.isfunction(fn) and hasattr(fn, "cascade_lab_spec")]


def test_there_are_hooks() -> None:
    assert set(HOOKS) == {"register_samplers", "register_schedulers", "register_variants"}


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook: str) -> None:
    docs = (REPO / "docs" / "plugins.md").read_text()
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"### {hook}({params})" in docs
    first_line = (getattr(hookspecs, hook).__doc__ or "").strip().splitlines()[0]
    assert first_line.replace("``", "`") in docs, "the docs should repeat the hook's one-line docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    tests = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py") if p.name != "test_meta.py")
    assert re.search(rf"def test_hook_\w*{hook.removeprefix('register_')}", tests), (
        f"add a test named test_hook_..._{hook.removeprefix('register_')}"
    )
