"""The training memory planner: exact bytes of weights, gradients and optimizer states; what fits where."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.training import ConfigError, TrainConfig, plan_memory
from cascade_lab.training.lora_train import LoraNetwork
from cascade_lab.training.memory_plan import GiB, check_fit, plan_table
from cascade_lab.training.optim import build_optimizer


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(optimizer) -> int:
    return nbytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def one_step(params, optimizer) -> None:
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()


@pytest.mark.parametrize(("optimizer", "args"), [("adamw", []), ("adafactor", ["relative_step=False"]),
                                                  ("adafactor", ["relative_step=False", "beta1=0.9"])])
def test_full_fine_tune_bytes_are_the_real_tensors(optimizer, args) -> None:
    model = StageCConfig.tiny().build()
    params = list(model.parameters())
    opt = build_optimizer(optimizer, params, 1e-3, args)
    one_step(params, opt)
    plan = plan_memory("tiny", optimizer=optimizer, optimizer_args=args, mixed_precision="no")
    assert plan.params == plan.trainable == sum(p.numel() for p in params)
    assert plan.weights == nbytes(params) and plan.gradients == nbytes(p.grad for p in params)
    assert plan.optimizer_states == state_bytes(opt) > 0
    ddp = plan_memory("tiny", optimizer=optimizer, optimizer_args=args, mixed_precision="no", gpus=2)
    assert ddp.gradients == 2 * plan.gradients  # DDP's buckets hold a second copy
    fsdp = plan_memory("tiny", optimizer=optimizer, optimizer_args=args, mixed_precision="no", gpus=2,
                       strategy="fsdp")
    assert fsdp.weights == math.ceil(plan.weights / 2) and fsdp.gradients == math.ceil(plan.gradients / 2)


def test_lora_bytes_are_the_real_tensors() -> None:
    model = StageCConfig.tiny().build()
    network = LoraNetwork.for_model(model, rank=4, target="all_linear")
    params = list(network.parameters())
    opt = build_optimizer("adamw", params, 1e-3, [])
    one_step(params, opt)
    plan = plan_memory("tiny", mode="lora", network_dim=4, network_target="all_linear", mixed_precision="no")
    assert plan.trainable == sum(p.numel() for p in params)
    assert plan.weights == nbytes(model.parameters()) + nbytes(params)
    assert plan.gradients == nbytes(p.grad for p in params) and plan.optimizer_states == state_bytes(opt)


def test_the_big_model_needs_fsdp_on_24_gb_cards() -> None:
    ddp = plan_memory("full", gpus=2, gpu_memory_gb=24)
    assert not ddp.fits and ddp.static > 24 * GiB  # 3.6 B fp32 weights + gradients alone are 26.7 GiB
    assert ddp.params == 3_589_103_632 and plan_memory("lite").params == 1_030_785_040  # spec/training.md
    assert not plan_memory("full", gpus=2, strategy="fsdp", gpu_memory_gb=24).fits
    four = plan_memory("full", gpus=4, strategy="fsdp", gpu_memory_gb=24)
    assert four.fits and 0 < four.activations < 2 * GiB
    eight = plan_memory("full", gpus=8, strategy="fsdp")
    assert eight.total < four.total and eight.weights * 8 == four.weights * 4 == 4 * four.params
    no_ckpt = plan_memory("full", gpus=4, strategy="fsdp", gradient_checkpointing=False, batch_size=2)
    assert no_ckpt.activations > 10 * four.activations
    with pytest.raises(ValueError, match="lora"):
        plan_memory("full", mode="lora", strategy="fsdp", gpus=2)


def test_training_start_refuses_what_cannot_fit() -> None:
    with torch.device("meta"):
        big = StageCConfig.full().build()
    config = TrainConfig(mode="full", model="full", train_data_dir="x", mixed_precision="bf16",
                         gradient_checkpointing=True)
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match="cannot fit .* strategy='fsdp' on 4 GPUs"):
        check_fit(config, big, cuda, 1, "single", gpu_memory_gb=24)
    assert check_fit(config, big, cuda, 4, "fsdp", gpu_memory_gb=24).fits
    assert check_fit(config, big, torch.device("cpu"), 1, "single") is None  # on CPU: only the table


def test_plan_command_prints_the_table(capsys) -> None:
    from cascade_lab.cli import main

    assert main(["train", "plan", "--variant", "tiny", "--gpus", "1", "2", "--gpu-memory", "24", "80"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert [r[:4] for r in rows] == [["tiny", "full", "1", "GPU"], ["tiny", "full", "ddp", "2"],
                                     ["tiny", "full", "fsdp", "2"]]
    assert all(r[-2:] == ["yes", "yes"] for r in rows)  # a 0.3 M-parameter model fits anywhere
    assert "24 GB" in out and "estimate" in out
    assert plan_table(("tiny",), (2,), (24,), ("fsdp",)).count("\n") == 3
