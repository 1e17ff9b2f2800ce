"""Two processes (torchrun, gloo on CPU) give the losses of one process with the doubled batch."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_run, torchrun_cli

from cascade_lab.training import train

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["full", "lora"])  # lora: the pairs' gradients are synchronised too
def test_two_processes_match_one_with_the_doubled_batch(shapes_dir, shared_cache, tmp_path, mode) -> None:
    common = {"mode": mode, "max_train_steps": 6, "adaptive_loss_weight": True, "gradient_accumulation_steps": 2}
    one = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "one", train_batch_size=8, **common))

    start = time.perf_counter()
    two, stdout = torchrun_cli(tiny_run(shapes_dir, shared_cache, tmp_path / "two", train_batch_size=4, **common),
                               tmp_path / "train.toml")
    print(f"torchrun, 2 processes x batch 4, 6 steps: {time.perf_counter() - start:.1f} s")
    assert two["status"] == "finished" and two["metadata"]["cascade_lab.world_size"] == "2"
    assert stdout.count("finished: step 6/6") == 1  # only rank 0 reports
    for a, b in zip(one.losses, two["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["raw_loss"] == pytest.approx(b["raw_loss"],
                                                                                                   rel=1e-5)
    w_one, w_two = load_file(str(one.output_file)), load_file(str(tmp_path / "two" / one.output_file.name))
    for key, value in w_one.items():
        torch.testing.assert_close(w_two[key], value, rtol=1e-4, atol=1e-6)


def test_two_processes_train_full_bf16(shapes_dir, shared_cache, tmp_path) -> None:
    """full_bf16 under DDP: bf16 gradients are all-reduced (gloo) and the run follows one process with the doubled
    batch, up to the order of the bf16 gradient sums (every process rounds with the same seeded bits)."""
    common = {"mode": "full", "max_train_steps": 6, "mixed_precision": "bf16", "full_bf16": True,
              "optimizer_type": "adamw"}
    one = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "one", train_batch_size=8, **common))
    two, _ = torchrun_cli(tiny_run(shapes_dir, shared_cache, tmp_path / "two", train_batch_size=4, **common),
                          tmp_path / "train.toml")
    assert two["status"] == "finished" and two["metadata"]["cascade_lab.full_bf16"] == "True (stochastic rounding)"
    for a, b in zip(one.losses, two["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    w_one, w_two = load_file(str(one.output_file)), load_file(str(tmp_path / "two" / one.output_file.name))
    a, b = (torch.cat([w[k].flatten() for k in sorted(w_one)]) for w in (w_one, w_two))
    assert float((a - b).norm() / a.norm()) < 5e-3  # measured 1.2e-3
