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


# -- %cascade subcommands, defaults as traits, lazy loading ----------------------------------------------
@pytest.fixture
def session(monkeypatch):  # type: ignore[no-untyped-def]
    """A fresh shared session for the test (the magics read and write its defaults)."""
    from cascade_lab.notebook import session as session_module

    s = session_module.Session()
    monkeypatch.setattr(session_module, "_session", s)
    return s


def test_help_documents_the_cell_options_separator_sizes_and_lazy_loading(ip, session, capsys) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", "")
    out = capsys.readouterr().out
    for words in ("%%cascade [options]", "--- negative ---", "portrait     2:3  768x1152", "--lora FILE[:STRENGTH]",
                  '%config MagicsManager.lazy_magics = {"cascade": "cascade_lab"}', "--expand", "--steps-c N"):
        assert words in out, words
    assert "--- negative ---" in ip.find_line_magic("cascade").__doc__


def test_config_shows_and_sets_the_session_defaults(ip, session, capsys) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", "config variant=tiny size=portrait steps_c=3 preview=off device=cpu")
    d = session.defaults
    assert (d.variant, d.width, d.height, d.steps_c, d.preview, d.device) == ("tiny", 768, 1152, 3, False, "cpu")
    magics = ip.magics_manager.registry["CascadeMagics"]
    assert magics.default_variant == "tiny" and magics.default_size == "768x1152" and magics.preview is False
    ip.run_line_magic("cascade", "config")
    out = capsys.readouterr().out
    assert "variant          = tiny" in out and "size             = 768x1152" in out
    with pytest.raises(UsageError, match="%cascade config: sampler='nope': unknown sampler 'nope'; available"):
        ip.run_line_magic("cascade", "config steps_c=5 sampler=nope")
    with pytest.raises(UsageError, match="unknown default 'bogus'; known: variant, device"):
        ip.run_line_magic("cascade", "config bogus=1")
    with pytest.raises(UsageError, match="%cascade config size: 'x' is not a size"):
        ip.run_line_magic("cascade", "config size=x")
    with pytest.raises(UsageError, match="write KEY=VALUE"):
        ip.run_line_magic("cascade", "config variant")
    assert session.defaults.steps_c == 3


def test_percent_config_sets_defaults_through_the_traits(ip, session, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("config", 'CascadeMagics.default_variant = "lite_bf16"')
    ip.run_line_magic("config", "CascadeMagics.default_steps_b = 4")
    ip.run_line_magic("config", 'CascadeMagics.default_size = "16:9"')
    assert (session.defaults.variant, session.defaults.steps_b) == ("lite_bf16", 4)
    assert (session.defaults.width, session.defaults.height) == (1408, 768)
    ip.run_line_magic("config", 'CascadeMagics.default_sampler = "nope"')  # %config logs the error
    assert "CascadeMagics.default_sampler: sampler='nope': unknown sampler 'nope'" in caplog.text
    assert session.defaults.sampler == "ddpm" and ip.magics_manager.registry["CascadeMagics"].default_sampler == "ddpm"
    ip.run_line_magic("config", "CascadeMagics")
    assert "default_variant" in capsys.readouterr().out


def test_configured_traits_reach_the_session_on_load(session) -> None:  # type: ignore[no-untyped-def]
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    config.CascadeMagics.default_variant = "tiny"
    config.CascadeMagics.default_cfg_c = 3.0
    config.CascadeMagics.default_scheduler = "nope"  # a bad value warns and never breaks loading
    InteractiveShell.clear_instance()
    try:
        shell = InteractiveShell.instance(config=config)
        with pytest.warns(UserWarning, match="CascadeMagics.default_scheduler"):
            shell.run_line_magic("load_ext", "cascade_lab")
        assert (session.defaults.variant, session.defaults.cfg_c, session.defaults.scheduler) == ("tiny", 3.0, "cosine")
    finally:
        InteractiveShell.clear_instance()


def test_lazy_magics_work_without_load_ext(session) -> None:  # type: ignore[no-untyped-def]
    """Both documented forms: %config in a notebook, and c.MagicsManager.lazy_magics in a profile."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    for in_profile in (False, True):
        config = Config()
        config.HistoryManager.enabled = False
        if in_profile:
            config.MagicsManager.lazy_magics = {"cascade": "cascade_lab"}
        InteractiveShell.clear_instance()
        try:
            shell = InteractiveShell.instance(config=config)
            if not in_profile:
                shell.run_line_magic("config", 'MagicsManager.lazy_magics = {"cascade": "cascade_lab"}')
            assert "CascadeMagics" not in dict.keys(shell.magics_manager.registry)
            with pytest.raises(UsageError, match="argument -s/--seed"):  # the cell magic is found and parses
                shell.run_cell_magic("cascade", "-s nope", "a cat\n")
            assert "cascade_lab" in shell.extension_manager.loaded  # type: ignore[union-attr]
            assert shell.find_line_magic("cascade") is not None
        finally:
            InteractiveShell.clear_instance()


def test_variants_show_memory_and_local_files(ip, session, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cascade_lab import weights

    def locate(variant, download=True, **options):  # type: ignore[no-untyped-def]
        assert download is False
        if variant == "lite_bf16":
            return {}
        if variant == "lite":
            raise OSError("unreadable header")
        raise weights.WeightsNotFoundError(f"Stable Cascade variant {variant!r}: 3 file(s) not found (...)")

    monkeypatch.setattr(weights, "locate", locate)
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", "variants")
    out = capsys.readouterr().out
    blocks = {b.split()[0]: b for b in out.split("\n") if b and not b.startswith(" ")}
    assert "lite_bf16" in blocks and "memory on cpu (Stage C bfloat16" in out
    after = {name: out.split("\n" + name + "  ", 1)[1].split("\n")[1:3] for name in ("full", "lite", "lite_bf16")}
    assert "GiB all resident" in after["lite_bf16"][0] and "with stage swapping" in after["lite_bf16"][0]
    assert after["lite_bf16"][1].strip() == "files: present on this machine"
    assert "not present (3 of 7 files missing" in after["full"][1]
    assert "could not check (OSError: unreadable header)" in after["lite"][1]
    assert "tiny" in blocks and "built in: no weight files needed" in out


def test_panel_and_inspect_display_the_widgets_lazily(ip, session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys
    import types

    from IPython.utils.capture import capture_output

    made: list[object] = []

    def make_panel() -> str:
        made.append("panel")
        return "PANEL"

    def make_inspector(result: object) -> str:
        made.append(result)
        return "INSPECTOR"

    panel, inspector = types.ModuleType("panel"), types.ModuleType("inspector")
    panel.GenerationPanel = make_panel  # type: ignore[attr-defined]
    inspector.LatentInspector = make_inspector  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cascade_lab.notebook.panel", panel)
    monkeypatch.setitem(sys.modules, "cascade_lab.notebook.inspector", inspector)
    ip.run_line_magic("load_ext", "cascade_lab")

    class FakeResult:
        latent_c = None

    result = FakeResult()
    with pytest.raises(UsageError, match="no result yet"):
        ip.run_line_magic("cascade", "inspect")
    ip.user_ns.update(res=result, other=3)
    # returned, not displayed: a cell ending in the magic shows it, `p = %cascade panel` keeps it to drive
    assert ip.run_line_magic("cascade", "panel") == "PANEL"
    assert ip.run_line_magic("cascade", "inspect res") == "INSPECTOR"
    session.results.append(result)
    with capture_output() as cap:
        assert ip.run_line_magic("cascade", "inspect") == "INSPECTOR"
    assert made == ["panel", result, result] and not cap.outputs  # shown once, as the cell's value
    with pytest.raises(UsageError, match="'nope' is not defined in the notebook"):
        ip.run_line_magic("cascade", "inspect nope")
    with pytest.raises(UsageError, match="'other' is a int, not a cascade_lab Result"):
        ip.run_line_magic("cascade", "inspect other")
    monkeypatch.setitem(sys.modules, "cascade_lab.notebook.panel", None)  # as if the module were missing
    with pytest.raises(UsageError, match="GenerationPanel is not available in this version"):
        ip.run_line_magic("cascade", "panel")


def test_cancel_and_unload(ip, session, capsys) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", "cancel")
    assert capsys.readouterr().out.strip() == "no cascade_lab job is running"
    with session.job("a panel job"):
        ip.run_line_magic("cascade", "cancel")
        assert session.token()
        with pytest.raises(UsageError, match="already running: a panel job"):
            ip.run_line_magic("cascade", "unload")
    assert "cancel requested: the job stops before its next step" in capsys.readouterr().out
    ip.run_line_magic("cascade", "unload")
    assert session.loaded == [] and "models unloaded" in capsys.readouterr().out


def test_unload_ext_removes_the_configurable(ip, session) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("reload_ext", "cascade_lab")
    assert sum(type(c).__name__ == "CascadeMagics" for c in ip.configurables) == 1
    ip.run_line_magic("unload_ext", "cascade_lab")
    assert not any(type(c).__name__ == "CascadeMagics" for c in ip.configurables)


def test_traits_follow_defaults_changed_elsewhere(ip, session) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    session.configure(variant="tiny", steps_c=5)  # as a panel would
    ip.run_line_magic("cascade", "cancel")
    magics = ip.magics_manager.registry["CascadeMagics"]
    assert (magics.default_variant, magics.default_steps_c) == ("tiny", 5)


# -- %cascade train and the training panel ---------------------------------------------------------------
@pytest.fixture(scope="module")
def train_toml(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny run's TOML next to four 128 px images (paths relative to the file); one cache for the module."""
    from PIL import Image

    root = tmp_path_factory.mktemp("train")
    (root / "images").mkdir()
    for name, colour in {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
                         "white": (250, 250, 250)}.items():
        Image.new("RGB", (128, 128), colour).save(root / "images" / f"{name}.png")
        (root / "images" / f"{name}.txt").write_text(f"a {name} picture")
    path = root / "train.toml"
    path.write_text('train_data_dir = "images"\ncache_dir = "cache"\noutput_dir = "out"\nresolution = 128\n'
                    'training_scale = "kohya"\ntrain_batch_size = 4\nlearning_rate = 1e-3\nmax_train_steps = 2\n'
                    'val_every_n_steps = 0\nval_items = 2\nlog_every_n_steps = 1\n')
    return path


def test_train_runs_a_toml_config_and_keeps_the_run(ip, session, train_toml, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", f"train {train_toml} --set max_train_steps=3 output_dir='{tmp_path}' -o my_run")
    out = capsys.readouterr().out
    assert "step 1/3  loss" in out and "step 3/3  loss" in out and "validation loss" in out
    run = ip.user_ns["my_run"]
    assert ip.user_ns["_cascade_train_run"] is run and run.status == "finished" and run.step == 3
    assert f"finished: step 3/3; model {run.output_file}" in out and "the run is _cascade_train_run and my_run" in out
    assert run.output_file == tmp_path / "cascade_lora.safetensors" and run.output_file.is_file()
    assert not session.busy and session.training is None
    ip.run_line_magic("cascade", "help")
    help_text = capsys.readouterr().out
    assert "%cascade train CONFIG [--set KEY=VALUE ...] [--background] [-o NAME]" in help_text
    assert "_cascade_train_run" in help_text and "%cascade panel train [CONFIG]" in help_text


def test_train_in_the_background_blocks_generation_and_cancel_stops_it(ip, session, train_toml, tmp_path,
                                                                        capsys) -> None:  # type: ignore[no-untyped-def]
    import time

    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", f"train {train_toml} --background --set max_train_steps=100000 "
                                 f"output_dir='{tmp_path}'")
    assert "in the background (lora, 100000 steps" in capsys.readouterr().out
    run = ip.user_ns["_cascade_train_run"]
    try:
        assert session.training is run and session.running.label.startswith("training 'cascade_lora'")
        with pytest.raises(UsageError, match="training 'cascade_lora' .* is still running"):
            ip.run_cell_magic("cascade", "--variant tiny", "a cat\n")
        deadline = time.monotonic() + 120
        while len(run.losses) < 2 and run.running and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ip.run_line_magic("cascade", "cancel")
        session.wait_training()
    assert "stop requested: the training ends after its current step" in capsys.readouterr().out
    assert run.status == "stopped" and run.error is None and 2 <= run.step < 100000
    assert run.last_checkpoint_step == run.step and not session.busy
    steps = run.step + 1
    ip.run_line_magic("cascade", f"train {train_toml} --set resume=auto max_train_steps={steps} "
                                 f"output_dir='{tmp_path}'")
    resumed = ip.user_ns["_cascade_train_run"]
    assert resumed.status == "finished" and resumed.step == steps and resumed.losses[:run.step] == run.losses
    assert f"finished: step {steps}/{steps}" in capsys.readouterr().out


def test_ctrl_c_stops_a_foreground_training_after_the_step_with_a_checkpoint(ip, session, train_toml, tmp_path,
                                                                            capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import time

    real_wait = session.wait_training
    interrupts: list[int] = []

    def wait_training(timeout=None):  # type: ignore[no-untyped-def]
        if not interrupts:  # the first wait of the magic: Ctrl-C once the run has made a step
            run = ip.user_ns["_cascade_train_run"]
            deadline = time.monotonic() + 120
            while not run.losses and run.running and time.monotonic() < deadline:
                time.sleep(0.05)
            interrupts.append(run.step)
            raise KeyboardInterrupt
        return real_wait(timeout)

    monkeypatch.setattr(session, "wait_training", wait_training)
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", f"train {train_toml} --set max_train_steps=100000 output_dir='{tmp_path}'")
    run = ip.user_ns["_cascade_train_run"]
    out = capsys.readouterr().out
    assert "stopping after this step and saving a checkpoint" in out and f"stopped: step {run.step}/100000" in out
    assert run.status == "stopped" and interrupts[0] <= run.step <= interrupts[0] + 1  # at most the step under way
    assert run.last_checkpoint_step == run.step and not session.busy


def test_train_is_refused_while_a_generation_holds_the_session(ip, session, train_toml, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    with session.job("generate 'a cat'"):
        with pytest.raises(UsageError, match="a cascade_lab job is already running: generate 'a cat'"):
            ip.run_line_magic("cascade", f"train {train_toml} --set output_dir='{tmp_path}'")
    assert "_cascade_train_run" not in ip.user_ns and not list(tmp_path.iterdir())


def test_train_usage_errors(ip, session, train_toml, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ip.run_line_magic("load_ext", "cascade_lab")
    with pytest.raises(UsageError, match="the following arguments are required: config"):
        ip.run_line_magic("cascade", "train")
    with pytest.raises(UsageError, match="training config '.*nope.toml' does not exist"):
        ip.run_line_magic("cascade", f"train {tmp_path / 'nope.toml'}")
    with pytest.raises(UsageError, match="--set 'steps': write KEY=VALUE"):
        ip.run_line_magic("cascade", f"train {train_toml} --set steps")
    with pytest.raises(UsageError, match="'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
        ip.run_line_magic("cascade", f"train {train_toml} --set learning_rat=1")
    with pytest.raises(UsageError, match="mixed_precision='fp16'"):
        ip.run_line_magic("cascade", f"train {train_toml} --set mixed_precision=fp16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty: no images"):  # found by the run itself, before any step
        ip.run_line_magic("cascade", f"train {train_toml} --set train_data_dir='{tmp_path / 'empty'}' "
                                     f"output_dir='{tmp_path / 'out'}'")
    assert ip.user_ns["_cascade_train_run"].status == "error" and not session.busy


def test_panel_train_displays_the_training_panel_lazily(ip, session, train_toml, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys
    import types


    made: list[tuple[object, ...]] = []

    def make_panel(*args: object) -> str:
        made.append(args)
        return "TRAINING PANEL"

    module = types.ModuleType("train_panel")
    module.TrainingPanel = make_panel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cascade_lab.notebook.train_panel", module)
    ip.run_line_magic("load_ext", "cascade_lab")
    shown = [ip.run_line_magic("cascade", "panel train"), ip.run_line_magic("cascade", f"panel train {train_toml}")]
    assert made == [(), (str(train_toml),)] and len(shown) == 2 and all(p is not None for p in shown)
    with pytest.raises(UsageError, match="%cascade panel train \\[CONFIG\\]"):
        ip.run_line_magic("cascade", "panel bogus")
    monkeypatch.undo()  # the real module from here on
    with pytest.raises(UsageError, match="%cascade panel train: training config 'nope.toml' does not exist"):
        ip.run_line_magic("cascade", "panel train nope.toml")
    panel = ip.run_line_magic("cascade", f"panel train {train_toml}")  # returned: the cell shows it, code drives it
    assert "application/vnd.jupyter.widget-view+json" in panel._repr_mimebundle_()  # the form, from the TOML
