"""``%load_ext cascade_lab`` and the ``%cascade`` line magic, in a fresh shell per test."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError


def test_load_ext_registers_the_magics(ip, capsys) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    assert "cascade" in ip.magics_manager.magics["line"]
    assert "cascade" in ip.magics_manager.magics["cell"]
    ip.run_line_magic("cascade", "help")
    assert "%cascade plugins" in capsys.readouterr().out


def test_cascade_plugins_lists_plugins(ip, capsys) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", "plugins")
    out = capsys.readouterr().out
    assert "cascade_lab.builtins.variants (builtin" in out
    assert "variants: full, bf16, lite, lite_bf16, tiny" in out


def test_cascade_variants(ip, capsys) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", "variants")
    assert "lite_bf16" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(ip) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    with pytest.raises(UsageError, match="unknown %cascade command 'bogus'; try: %cascade help"):
        ip.run_line_magic("cascade", "bogus")


def test_unload_and_reload_leave_nothing_twice(ip) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("unload_ext", "cascade_lab")
    assert "cascade" not in ip.magics_manager.magics["line"]
    assert "cascade" not in ip.magics_manager.magics["cell"]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("reload_ext", "cascade_lab")
    assert list(ip.magics_manager.magics["line"]).count("cascade") == 1
    assert sum(1 for name in ip.magics_manager.registry if name == "CascadeMagics") == 1
    from cascade_lab import plugins

    names = plugins.registries()["variant"].names()
    assert len(names) == len(set(names))
