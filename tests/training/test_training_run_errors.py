"""A run that fails while setting up records the error, also in the background."""

from __future__ import annotations

import pytest
from training_helpers import tiny_run

from cascade_lab.training import run as run_module

pytest_plugins = ["training_fixtures"]


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


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_and_the_run(shapes_dir, shared_cache, tmp_path,
                                                                             monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 18 fault injection: the disk fills while the step-4 checkpoint is written. The step-2 checkpoint
    stays whole, nothing half-written is left, the run goes on (weights in memory) and saves again at step 6."""
    import errno

    from cascade_lab.training.checkpoint import Checkpoints, load_state
    from cascade_lab.training.config import TrainConfig

    real = run_module.write_torch
    calls: list[object] = []

    def disk_full_at_the_second(obj, path):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path)

    monkeypatch.setattr(run_module, "write_torch", disk_full_at_the_second)
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match=r"step 4: the checkpoint could not be written \(No space left on device"):
        run = run_module.train(**tiny_run(shapes_dir, shared_cache, out, mode="full", max_train_steps=6,
                                          save_every_n_steps=2, keep_checkpoints=5))
    assert run.status == "finished"
    saved = Checkpoints(out).complete()
    assert [p.name for p in saved] == ["step-00000002", "step-00000006"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written folder
    assert load_state(saved[0], TrainConfig(**tiny_run(shapes_dir, shared_cache, out, mode="full")))["step"] == 2
