"""A run that fails while setting up records the error, also in the background."""

from __future__ import annotations

import pytest

from cascade_lab.training import run as run_module


def test_setup_failure_is_recorded_in_background(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def broken(device):  # type: ignore[no-untyped-def]
        raise RuntimeError("no such device")

    monkeypatch.setattr(run_module.dist, "setup", broken)
    (tmp_path / "data").mkdir()
    run = run_module.train(train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"), model="tiny",
                           max_train_steps=1, background=True)
    run.wait(timeout=30)
    assert run.status == "error" and "no such device" in str(run.error)
    with pytest.raises(RuntimeError, match="no such device"):
        run_module.train(train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"), model="tiny",
                         max_train_steps=1)
