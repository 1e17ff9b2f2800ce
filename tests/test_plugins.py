"""The pluggy core: built-ins, registries, notebook plugins, entry points, broken plugins, listings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import cascade_lab
from cascade_lab import plugins
from cascade_lab.registry import LazyCallable, Registry, Sampler, Scheduler, UnknownNameError, Variant

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "cascade-lab-linear-logsnr"


def run_python(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_unknown_name_lists_available_names() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown variant 'nope'; available: .*bf16.*lite_bf16.*tiny"):
        plugins.get_variant("nope")


def test_registry_refuses_duplicates_naming_both_plugins() -> None:
    reg: Registry[Scheduler] = Registry("scheduler")
    reg.add(Scheduler("a", "first", print), "plugin_one")
    with pytest.raises(ValueError, match="'a' from plugin 'plugin_two' is already registered by plugin 'plugin_one'"):
        reg.add(Scheduler("a", "second", print), "plugin_two")
    assert reg.get("a").description == "first"


def test_hook_register_variants_builtins() -> None:
    reg = plugins.registries()["variant"]
    assert {"full", "bf16", "lite", "lite_bf16", "tiny"} <= set(reg.names())
    bf16 = reg.get("bf16")
    assert bf16.files["stage_c"].filename == "stage_c_bf16.safetensors"
    assert bf16.files["stage_b"].filename == "stage_b_bf16.safetensors"
    assert reg.get("lite").files["stage_c"].filename == "stage_c_lite.safetensors"
    assert reg.get("lite_bf16").files["stage_b"].filename == "stage_b_lite_bf16.safetensors"
    # memory: the bf16 Stage C file is 7.18 GB, the fp32 one 14.4 GB (spec §9)
    assert bf16.files["stage_c"].nbytes == pytest.approx(7.18e9, rel=0.01)
    assert reg.get("full").files["stage_c"].nbytes == pytest.approx(14.36e9, rel=0.01)
    assert reg.get("lite").stage_c == "lite" and reg.get("tiny").build is not None


class CellPlugin:
    """A plugin as a notebook user writes it: a class with hook functions as static methods."""

    @staticmethod
    @cascade_lab.hookimpl
    def register_samplers(register):  # type: ignore[no-untyped-def]
        register(Sampler("cell_sampler", "from a notebook cell", lambda *a, **k: None))

    @staticmethod
    @cascade_lab.hookimpl
    def register_schedulers(register):  # type: ignore[no-untyped-def]
        register(Scheduler("cell_scheduler", "from a notebook cell", lambda *a, **k: None))


def test_hook_register_samplers_and_schedulers_from_a_cell() -> None:
    name = cascade_lab.register_plugin(CellPlugin)
    try:
        assert plugins.get_sampler("cell_sampler").description == "from a notebook cell"
        assert "cell_scheduler" in plugins.registries()["scheduler"]
        # re-running the cell replaces, never duplicates
        cascade_lab.register_plugin(CellPlugin)
        assert plugins.registries()["sampler"].names().count("cell_sampler") == 1
        info = {i.name: i for i in plugins.plugin_infos()}[name]
        assert info.source == "notebook"
        assert info.registered == {"sampler": ["cell_sampler"], "scheduler": ["cell_scheduler"]}
    finally:
        cascade_lab.unregister_plugin(name)
    assert "cell_sampler" not in plugins.registries()["sampler"]
    with pytest.raises(ValueError, match="no plugin 'CellPlugin' is registered"):
        cascade_lab.unregister_plugin("CellPlugin")


def test_duplicate_name_from_a_second_plugin_is_refused_and_reported() -> None:
    class Clash:
        @staticmethod
        @cascade_lab.hookimpl
        def register_variants(register):  # type: ignore[no-untyped-def]
            register(Variant("tiny", "impostor"))
            register(Variant("clash_ok", "fine"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cascade_lab.register_plugin(Clash, name="clash")
        reg = plugins.registries()["variant"]
    try:
        assert reg.get("tiny").description.startswith("random-weight tiny")
        assert "clash_ok" in reg
        assert any("'tiny' from plugin 'clash' is already registered by plugin "
                   "'cascade_lab.builtins.variants'" in str(w.message) for w in caught)
        info = {i.name: i for i in plugins.plugin_infos()}["clash"]
        assert info.errors and "already registered" in info.errors[0]
    finally:
        cascade_lab.unregister_plugin("clash")


def test_a_hook_that_raises_is_reported_and_skipped() -> None:
    class Raises:
        @staticmethod
        @cascade_lab.hookimpl
        def register_samplers(register):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    with pytest.warns(plugins.PluginWarning, match="register_samplers raised RuntimeError: boom"):
        cascade_lab.register_plugin(Raises, name="raises")
        plugins.registries()
    cascade_lab.unregister_plugin("raises")


def test_register_wants_a_record() -> None:
    class Wrong:
        @staticmethod
        @cascade_lab.hookimpl
        def register_schedulers(register):  # type: ignore[no-untyped-def]
            register("karras")

    with pytest.warns(plugins.PluginWarning, match="takes a cascade_lab.Scheduler, got str"):
        cascade_lab.register_plugin(Wrong, name="wrong")
        plugins.registries()
    cascade_lab.unregister_plugin("wrong")


def test_lazy_callable_imports_on_first_call() -> None:
    fn = LazyCallable("json:dumps")
    assert fn([1]) == "[1]" and "json:dumps" in repr(fn)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin installed (pip, no network) plus a deliberately broken one, in a fresh folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(EXAMPLE)], check=True, timeout=300)
    broken = target / "broken_plugin-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[cascade_lab]\nbroken = broken_plugin_mod\n")
    (target / "broken_plugin_mod.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    return target


def test_entry_point_plugin_is_discovered_listed_and_usable(site: Path) -> None:
    result = run_python(
        """
        import sys, warnings
        warnings.simplefilter("ignore")
        import cascade_lab
        assert "torch" not in sys.modules
        from cascade_lab import plugins
        from cascade_lab.listing import plugins_text
        print(plugins_text())
        sched = plugins.get_scheduler("linear_logsnr")
        print("OWNER", plugins.registries()["scheduler"].owner["linear_logsnr"])
        levels = sched.fn(4, shift=2.0)
        cosine = plugins.get_scheduler("cosine").fn(4, shift=2.0)
        steps = (levels[1:] - levels[:-1]).tolist()
        assert len(levels) == 5 and float(levels[0]) == float(cosine[0]) and float(levels[-1]) == float(cosine[-1])
        assert max(steps) - min(steps) < 1e-4, steps  # evenly spaced in logSNR
        """,
        {"PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "linear_logsnr (entry point 0.1.0)" in out
    assert "hooks: register_schedulers" in out and "schedulers: linear_logsnr" in out
    assert "OWNER linear_logsnr" in out
    # the broken plugin is reported and skipped, and importing cascade_lab still worked
    assert "broken (entry point 0.1)" in out
    assert "ERROR: failed to load (ImportError: this plugin is broken on purpose)" in out


def test_allow_list_limits_entry_points(site: Path) -> None:
    code = """
        import warnings; warnings.simplefilter("ignore")
        from cascade_lab import plugins
        print(sorted(i.name for i in plugins.plugin_infos() if i.source == "entry point"))
        """
    assert run_python(code, {"PYTHONPATH": str(site), "CASCADE_LAB_LOAD_PLUGINS": "linear_logsnr"}
                      ).stdout.strip() == "['linear_logsnr']"
    assert run_python(code, {"PYTHONPATH": str(site), "CASCADE_LAB_LOAD_PLUGINS": ""}).stdout.strip() == "[]"


def test_cli_plugins_lists_builtins_and_errors(site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-m", "cascade_lab.cli", "plugins"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cascade_lab.builtins.variants (builtin" in result.stdout
    assert "variants: full, bf16, lite, lite_bf16, tiny" in result.stdout
    assert "ERROR: failed to load" in result.stdout
    assert "cascade_lab plugin 'broken'" in result.stderr  # the warning, once
