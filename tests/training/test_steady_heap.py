"""glibc's heap held steady through a CPU training run: a step's freed blocks are not faulted in again each step."""

from __future__ import annotations

import platform
import resource
import sys

import pytest
import torch
from training_helpers import tiny_run

import cascade_lab.pipeline as pipeline
from cascade_lab.pipeline import steady_heap
from cascade_lab.training import train

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
BLOCKS, MIB = 4, 24  # 96 MiB of 24 MiB blocks: under glibc's 32 MiB mmap cap, over its 64 MiB trim threshold
PAGES = BLOCKS * MIB * 2**20 // resource.getpagesize()


def _churn() -> int:
    """Page faults of allocating, touching and freeing the blocks (what a training step does with its
    activations and gradients)."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(MIB * 2**18) for _ in range(BLOCKS)]
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


def test_freed_blocks_stay_mapped_inside_and_go_back_to_the_os_after() -> None:
    with steady_heap() as taken:
        assert taken is GLIBC  # elsewhere nothing to set, nothing changes
        if not GLIBC:
            return
        for _ in range(3):  # the first passes fault their pages in (and settle which free chunks they take)
            _churn()
        assert _churn() < 0.05 * PAGES  # the next ones find them mapped
        assert _churn() < 0.05 * PAGES
    assert pipeline._heap_holders == [0]
    assert _churn() > 0.5 * PAGES  # left: the freed memory went back to the OS, a new pass faults again


def test_nested_holders_keep_it_until_the_last_leaves() -> None:
    with steady_heap() as outer:
        with steady_heap():
            assert pipeline._heap_holders == [2]
        assert pipeline._heap_holders == [1]
        if outer:  # the inner one leaving did not restore trimming
            for _ in range(3):
                _churn()
            assert _churn() < 0.05 * PAGES
    assert pipeline._heap_holders == [0]


def test_a_training_run_holds_it_in_the_main_thread_and_trims_in_a_background_one(
        shapes_dir, shared_cache, tmp_path, monkeypatch) -> None:
    import cascade_lab.training.loop as loop

    trims: list[int] = []
    monkeypatch.setattr(loop, "release_freed_memory", lambda: trims.append(1) or True)
    holders: list[int] = []

    def on_event(event) -> None:
        if event.kind == "step":
            holders.append(pipeline._heap_holders[0])

    settings = tiny_run(shapes_dir, shared_cache, tmp_path / "main", mode="full", max_train_steps=3,
                        gradient_accumulation_steps=2)
    run = train(**settings, callback=on_event)
    assert run.status == "finished"
    assert holders == [1] * 3 and pipeline._heap_holders == [0]  # held wherever glibc takes it or not
    assert trims == ([] if GLIBC else [1] * 6)  # no trim before each backward where the heap is held

    holders.clear()
    run = train(**(settings | {"output_dir": str(tmp_path / "background")}), callback=on_event,
                background=True).wait()
    assert run.status == "finished"
    # another thread's arena fragments without trimming: the background run trims before each backward instead
    assert holders == [0] * 3 and trims == [1] * 6


def test_a_failing_run_lets_go_of_it(shapes_dir, shared_cache, tmp_path, monkeypatch) -> None:
    import cascade_lab.training.loop as loop

    def broken_step(self: loop.Trainer) -> dict:
        assert pipeline._heap_holders == [1]
        raise RuntimeError("broken step")

    monkeypatch.setattr(loop.Trainer, "train_step", broken_step)
    with pytest.raises(RuntimeError, match="broken step"):
        train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=3))
    assert pipeline._heap_holders == [0]
