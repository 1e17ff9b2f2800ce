"""The training memory planner: exact bytes of weights, gradients and optimizer states; what fits where."""

from __future__ import annotations

import math

import pytest
import torch

from cascade_lab.models.stage_b import StageBConfig
from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.training import ConfigError, TrainConfig, plan_memory
from cascade_lab.training.lora_train import LoraNetwork
from cascade_lab.training.memory_plan import (
    ACTIVATION_CALIBRATION,
    GiB,
    check_fit,
    frozen_helpers,
    latent_size,
    plan_table,
    run_settings,
    sample_helpers,
    saved_activation_bytes,
)
from cascade_lab.training.optim import build_optimizer

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, one_thread


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(optimizer) -> int:
    return nbytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def one_step(params, optimizer) -> None:
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()


@pytest.mark.parametrize(("optimizer", "args"), [("adamw", []), ("adamw", ["amsgrad=True"]),
                                                  ("adafactor", ["relative_step=False"]),
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


# -- Stage B ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "optimizer", "args"), [("full", "adamw", []),
                                                         ("full", "adafactor", ["relative_step=False"]),
                                                         ("lora", "adamw", []),
                                                         ("lora", "adafactor", ["relative_step=False", "beta1=0.9"])])
def test_stage_b_bytes_are_the_real_tensors(mode, optimizer, args) -> None:
    model = StageBConfig.tiny().build()
    if mode == "full":
        params = list(model.parameters())
    else:
        params = list(LoraNetwork.for_model(model, rank=4, target="all_linear").parameters())
    opt = build_optimizer(optimizer, params, 1e-3, args)
    one_step(params, opt)
    settings = {"stage": "b", "mode": mode, "optimizer": optimizer, "optimizer_args": args,
                "mixed_precision": "no", "network_dim": 4, "network_target": "all_linear"}
    plan = plan_memory("tiny", **settings)
    assert plan.stage == "b" and plan.params == sum(p.numel() for p in model.parameters())
    assert plan.trainable == sum(p.numel() for p in params)
    base = 0 if mode == "full" else nbytes(model.parameters())
    assert plan.weights == base + nbytes(params) and plan.gradients == nbytes(p.grad for p in params)
    assert plan.optimizer_states == state_bytes(opt) > 0
    ddp = plan_memory("tiny", gpus=2, **settings)
    assert ddp.gradients == 2 * plan.gradients  # DDP's buckets hold a second copy
    if mode == "full":
        fsdp = plan_memory("tiny", gpus=2, strategy="fsdp", **settings)
        assert fsdp.weights == math.ceil(plan.weights / 2) and fsdp.gradients == math.ceil(plan.gradients / 2)


def test_stage_b_sizes_latents_and_frozen_models() -> None:
    full = plan_memory("full", stage="b", resolution=64)  # small: the activation count of the real size is slow
    assert full.params == 1_562_941_136  # spec manifest (the lite's 699_471_248: the start-of-run check below)
    # the trainer's rule: buckets in image pixels (multiples of 32), Stage A latents a quarter of each side
    assert latent_size("b", 1024) == (256, 256) and latent_size("b", (768, 1000)) == (192, 248)
    assert latent_size("c", 1024) == (24, 24) and full.latent == (16, 16)
    tiny = plan_memory("tiny", stage="b", resolution=128)
    bigger = plan_memory("tiny", stage="b", resolution=256)
    assert tiny.latent == (32, 32) and 3.5 * tiny.activations < bigger.activations < 4.5 * tiny.activations
    assert plan_memory("tiny", stage="b", batch_size=3, resolution=128).activations == pytest.approx(
        3 * tiny.activations, abs=3)
    # on the GPU during the steps: only the encoders that run every step (uncached); cached runs have none
    assert frozen_helpers("b", "lite") == {} and frozen_helpers("b", "tiny", latents_cached=False) == {}
    assert set(frozen_helpers("b", "full", latents_cached=False)) == {"effnet", "stage_a"}
    assert set(frozen_helpers("c", "full", text_encoder_cached=False)) == {"text_encoder"}
    # samples: one model at a time while rendering, the Previewer on the CPU; the largest is the fp32 Stage C
    sampled = sample_helpers("b", "lite")
    assert set(sampled) == {"text_encoder", "stage_c", "stage_a"} and sample_helpers("b", "tiny") == {}
    assert sampled["stage_c"] == 4 * 1_030_785_040 and set(sample_helpers("c", "full")) == {
        "text_encoder", "stage_b", "stage_a"} and set(sample_helpers("c", "full", sample_full_images=False)) == {
        "text_encoder"}
    sampling = plan_memory("bf16", stage="b", samples=True, resolution=64)
    assert sampling.frozen == 0 and sampling.helpers == () and sampling.static == full.static
    assert sampling.sampling_model == "stage_c" and sampling.sampling == 4 * 3_589_103_632  # 13.4 GiB
    # while rendering: the gradients are freed, the weights, AdamW states, autocast copies and Stage C are there
    assert sampling.sampling_peak == (full.static - full.gradients + sampling.sampling) == sampling.total
    assert sampling.total > sampling.steps_total == full.total
    uncached = plan_memory("bf16", stage="b", samples=True, latents_cached=False, resolution=64)
    assert uncached.frozen == sum(frozen_helpers("b", "full", latents_cached=False).values())
    assert uncached.sampling_peak - sampling.sampling_peak == uncached.frozen  # the step encoders stay
    sharded = plan_memory("bf16", stage="b", samples=True, gpus=2, strategy="fsdp", resolution=64)
    assert sharded.sampling_peak == (sharded.weights + sharded.optimizer_states + sharded.overhead +
                                     sharded.sampling + 2 * sharded.params)  # the model gathered in bf16
    with pytest.raises(ValueError, match=r"variant='huge'.*full, bf16, lite, lite_bf16, tiny"):
        plan_memory("huge", stage="b")
    with pytest.raises(ValueError, match=r"stage='a'.*'c'.*'b'"):
        plan_memory("tiny", stage="a")
    with pytest.raises(ValueError, match="StageCConfig but stage='b'"):
        plan_memory(StageCConfig.tiny(), stage="b")


def test_selective_checkpointing_that_may_not_fit_advises_full() -> None:
    with torch.device("meta"):
        lite = StageCConfig.lite().build()
    settings = {"mode": "full", "model": "lite", "train_data_dir": "x", "mixed_precision": "bf16",
                "gradient_checkpointing": True}
    selective = TrainConfig(**settings, gradient_checkpointing_mode="selective")
    cuda = torch.device("cuda")
    full_plan = check_fit(TrainConfig(**settings), lite, cuda, 1, "single", gpu_memory_gb=80)
    selective_plan = check_fit(selective, lite, cuda, 1, "single", gpu_memory_gb=80)
    between = (full_plan.total + selective_plan.total) / 2 / GiB  # full fits, selective does not
    assert check_fit(TrainConfig(**settings), lite, cuda, 1, "single", gpu_memory_gb=between).fits
    with pytest.warns(RuntimeWarning, match=r"may not fit.*gradient_checkpointing_mode='full' recomputes the "
                      r"products selective checkpointing keeps \(activations 0\.\d -> 0\.\d GiB\)"):
        check_fit(selective, lite, cuda, 1, "single", gpu_memory_gb=between)


def test_selective_checkpointing_is_planned_between_full_and_none() -> None:
    off = plan_memory("full", gradient_checkpointing=False)
    full = plan_memory("full")
    selective = plan_memory("full", gradient_checkpointing_mode="selective")
    assert full.activations < selective.activations < off.activations
    assert (selective.gradient_checkpointing_mode, full.gradient_checkpointing_mode) == ("selective", "full")
    unused = plan_memory("full", gradient_checkpointing=False, gradient_checkpointing_mode="selective")
    assert unused.activations == off.activations  # the mode only matters with checkpointing on
    assert selective.total - full.total == selective.activations - full.activations
    with pytest.raises(ValueError, match=r"gradient_checkpointing_mode='some': use 'full', 'selective'"):
        plan_memory("full", gradient_checkpointing_mode="some")
    # a run's plan is made for its GPU, where "auto" is the full recomputation
    config = TrainConfig(train_data_dir="x", gradient_checkpointing=True)
    assert run_settings(config, 1, "ddp")["gradient_checkpointing_mode"] == "full"
    assert run_settings(TrainConfig(train_data_dir="x", gradient_checkpointing=True,
                                    gradient_checkpointing_mode="selective"), 1, "ddp")[
        "gradient_checkpointing_mode"] == "selective"
    table = plan_table(("lite",), (1,), (24,), ("ddp",), gradient_checkpointing_mode="selective")
    assert "gradient checkpointing on (selective)" in table


def _measured_peak(case: dict) -> float:
    """The benchmark's measurement (benchmarks/activation_memory.py) in a fresh process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "activation_memory.py"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script), "--child", json.dumps(case)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.parametrize(("checkpointing", "side", "band"), [(False, 64, (1.0, ACTIVATION_CALIBRATION)),
                                                             (True, 96, (1.0, 1.25)),
                                                             ("selective", 96, (0.95, ACTIVATION_CALIBRATION))])
def test_stage_b_activation_count_matches_a_real_cpu_peak(checkpointing, side, band) -> None:
    """A 15 M Stage B with the real level layout and repeats, fp32, one forward+backward: the measured peak over
    the count. With checkpointing a fixed ~6 MiB (the recomputed block's backward) weighs more at this small
    size: 1.16 at 96x96, 1.13 at 128x128 (benchmarks/RESULTS.md), so its band is wider here. Selective
    checkpointing (1.02-1.03 at 128x128) also runs here in a fresh process, where the first large product (and
    the oneDNN probe before it) happens inside a checkpointed block."""
    config = {"c_cond": 256, "c_hidden": [64, 128, 256, 256], "nhead": [-1, -1, 4, 4],
              "blocks": [[1, 2, 4, 2], [2, 4, 2, 1]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]], "c_clip": 1280,
              "dropout": [0.0, 0.0, 0.0, 0.0]}
    peak = _measured_peak({"config": config, "batch": 1, "ckpt": checkpointing, "side": side})
    mode = "selective" if checkpointing == "selective" else "full"
    counted = saved_activation_bytes(StageBConfig(**config), stage="b", mixed_precision="no", latent=(side, side),
                                     gradient_checkpointing=bool(checkpointing), gradient_checkpointing_mode=mode)
    assert band[0] <= peak / counted <= band[1], (peak / 2**20, counted / 2**20)


def test_stage_b_training_start_checks_its_plan() -> None:
    with torch.device("meta"):
        lite = StageBConfig.lite().build()
    config = TrainConfig(stage="b", mode="full", model="lite", train_data_dir="x", mixed_precision="bf16",
                         gradient_checkpointing=True)
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match=r"cannot fit .*Stage B lite full.* strategy='fsdp' on 2 GPUs"):
        check_fit(config, lite, cuda, 1, "single", gpu_memory_gb=10)
    plan = check_fit(config, lite, cuda, 2, "fsdp", gpu_memory_gb=10)
    assert plan.fits and plan.params == 699_471_248 and plan.latent == (256, 256)  # spec manifest; 1024 px
    sampling = TrainConfig(stage="b", mode="full", model="lite", train_data_dir="x", mixed_precision="bf16",
                           gradient_checkpointing=True, sample_prompts=["a cat"], sample_every_n_steps=100)
    # the samples' fp32 Stage C lite (3.8 GiB) comes over only while they render: 10.1 GiB then, a step 7.6
    plan = check_fit(sampling, lite, cuda, 2, "fsdp", gpu_memory_gb=12)
    assert plan.fits and plan.frozen == 0 and 10 * GiB < plan.total == plan.sampling_peak < 10.1 * GiB
    with pytest.raises(ConfigError, match=r"sample images cannot fit .*stage_c.*sample less"):
        check_fit(sampling, lite, cuda, 2, "fsdp", gpu_memory_gb=9)
    assert check_fit(config, lite, torch.device("cpu"), 1, "single") is None


def test_plan_command_for_stage_b(capsys) -> None:
    from cascade_lab.cli import main

    assert main(["train", "plan", "--stage", "b", "--variant", "tiny", "--gpus", "1", "2", "--gpu-memory", "24",
                 "--mode", "lora", "--resolution", "256"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert [r[:4] for r in rows] == [["tiny", "lora", "1", "GPU"], ["tiny", "lora", "ddp", "2"]]
    assert "Stage B, 64x64 Stage A latents (256x256 px)" in out and "frozen" in out.splitlines()[0]
    for bad, named in ((["--stage", "a"], "invalid choice: 'a' (choose from 'c', 'b')"),
                       (["--stage", "b", "--variant", "huge"], "invalid choice: 'huge'")):
        with pytest.raises(SystemExit):
            main(["train", "plan", *bad])
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "plan", "--help"])
    assert "--stage {c,b}" in capsys.readouterr().out


def test_stage_b_latent_size_is_the_trainers(shapes_dir, tmp_path, one_thread) -> None:
    """The planner's Stage B input size is what the trainer feeds Stage B: a 96x128 px bucket → Stage A latents
    [4, 32, 24] (plan (w, h) = (24, 32))."""
    from training_helpers import tiny_run

    from cascade_lab.training import distributed as dist
    from cascade_lab.training.data import TrainingData
    from cascade_lab.training.loop import Trainer
    from cascade_lab.training.metadata import scale_factor
    from cascade_lab.training.models import build_models
    from cascade_lab.training.toml_config import dataset_config_for

    config = TrainConfig(**tiny_run(shapes_dir, tmp_path / "cache", tmp_path / "out", stage="b", mode="lora",
                                    resolution=[96, 128], train_batch_size=2, enable_bucket=False,
                                    cache_latents=False)).validate()
    models = build_models(config)
    data = TrainingData(dataset_config_for(config), scale=scale_factor(config, models), seed=0)
    latents = Trainer(config, models, data, dist.setup("cpu")).inputs(0)["latents"]
    w, h = plan_memory("tiny", stage="b", mode="lora", resolution=(96, 128)).latent
    assert tuple(latents.shape[1:]) == (4, h, w) == (4, 32, 24)


# -- full_bf16 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "args", "rounding"), [("adamw", [], "stochastic"), ("adamw", [], "nearest"),
                                                             ("adafactor", ["relative_step=False"], "stochastic")])
def test_full_bf16_bytes_are_the_real_tensors(optimizer, args, rounding) -> None:
    """Weights and gradients at 2 bytes; AdamW's moments fp32 (stochastic) or bf16 (nearest, kohya's AdamW)."""
    from cascade_lab.training.bf16_weights import Rounding

    model = StageCConfig.tiny().build().to(torch.bfloat16)
    params = list(model.parameters())
    opt = build_optimizer(optimizer, params, 1e-3, args, Rounding(rounding))
    one_step(params, opt)
    plan = plan_memory("tiny", optimizer=optimizer, optimizer_args=args, full_bf16=True, bf16_rounding=rounding)
    assert plan.weights == nbytes(params) == 2 * plan.params and plan.gradients == nbytes(p.grad for p in params)
    assert plan.optimizer_states == state_bytes(opt) > 0
    assert plan_memory("tiny", optimizer=optimizer, optimizer_args=args, full_bf16=True, bf16_rounding=rounding,
                       gpus=2).gradients == 2 * plan.gradients  # DDP's buckets in bf16 too
    with pytest.raises(ValueError, match="strategy='ddp'"):
        plan_memory("tiny", full_bf16=True, strategy="fsdp", gpus=2)


def test_kohyas_full_bf16_run_fits_one_24_gb_card() -> None:
    """kohya's `--full_bf16 --optimizer_type adafactor --gradient_checkpointing` on the 3.6 B Stage C: 7.2 GB of
    weights and 7.2 GB of gradients fit 24 GB; fp32 masters do not, and the advice says which setting fits."""
    kohya = {"optimizer": "adafactor", "optimizer_args": ["scale_parameter=False", "relative_step=False",
                                                          "warmup_init=False"], "mixed_precision": "bf16"}
    masters = plan_memory("full", gpu_memory_gb=24, **kohya)
    bf16 = plan_memory("full", gpu_memory_gb=24, full_bf16=True, **kohya)
    assert not masters.fits and bf16.fits and bf16.weights == bf16.gradients == 2 * bf16.params
    assert bf16.transient < 0.1 * masters.transient  # no autocast copies of fp32 weights, one tensor's fp32 update
    with torch.device("meta"):
        big = StageCConfig.full().build()
    config = TrainConfig(mode="full", model="full", train_data_dir="x", mixed_precision="bf16",
                         gradient_checkpointing=True, optimizer_type="adafactor",
                         optimizer_args=kohya["optimizer_args"])
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match=r"full_bf16=true \(kohya --full_bf16: weights and gradients in bf16\) "
                                          r"needs 15\.\d GiB"):
        check_fit(config, big, cuda, 1, "single", gpu_memory_gb=24)
    config.full_bf16 = True
    assert check_fit(config, big, cuda, 1, "single", gpu_memory_gb=24).fits
    config.full_bf16, config.optimizer_type, config.optimizer_args = False, "adamw", []  # AdamW: 8 bytes of moments
    with pytest.raises(ConfigError, match="full_bf16=true .*optimizer='adafactor'\\) needs"):
        check_fit(config, big, cuda, 1, "single", gpu_memory_gb=24)
    config.full_bf16 = True  # 42 GiB: FSDP is advised with fp32 weights (full_bf16 is refused there)
    with pytest.raises(ConfigError, match="strategy='fsdp' \\(fp32 weights sharded: without full_bf16\\) on 4 GPUs"):
        check_fit(config, big, cuda, 1, "single", gpu_memory_gb=24)


def test_plan_command_with_full_bf16(capsys) -> None:
    from cascade_lab.cli import main

    assert main(["train", "plan", "--variant", "full", "--gpus", "1", "--gpu-memory", "24", "--optimizer",
                 "adafactor", "--full-bf16"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert [r[:4] for r in rows] == [["full", "full", "1", "GPU"]] and rows[0][-1] == "yes"
    assert rows[0][5] == rows[0][6] == "6.7"  # GiB of bf16 weights and of gradients ("1 GPU" is two words)
    assert "full_bf16 (bf16 weights and gradients)" in out
    with pytest.raises(SystemExit, match="--full-bf16 with --mixed-precision no"):
        main(["train", "plan", "--full-bf16", "--mixed-precision", "no"])
    with pytest.raises(SystemExit, match="full_bf16=true with strategy='fsdp'"):
        main(["train", "plan", "--full-bf16", "--strategy", "fsdp"])


@pytest.mark.parametrize(("checkpointing", "side"), [(False, 64), (True, 96)])
def test_full_bf16_activation_count_matches_a_real_cpu_peak(checkpointing, side) -> None:
    """The 15 M Stage B with bf16 weights and gradients under bf16 autocast (full_bf16), one forward+backward in a
    fresh process: the measured peak is 1.07x (64x64, no checkpointing) and 1.09x (96x96, checkpointing) the count,
    within the calibration; there are no autocast weight copies to add."""
    config = {"c_cond": 256, "c_hidden": [64, 128, 256, 256], "nhead": [-1, -1, 4, 4],
              "blocks": [[1, 2, 4, 2], [2, 4, 2, 1]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]], "c_clip": 1280,
              "dropout": [0.0, 0.0, 0.0, 0.0]}
    peak = _measured_peak({"config": config, "batch": 1, "ckpt": checkpointing, "side": side, "bf16": True,
                           "full_bf16": True})
    counted = saved_activation_bytes(StageBConfig(**config), stage="b", mixed_precision="bf16", latent=(side, side),
                                     gradient_checkpointing=checkpointing, full_bf16=True)
    assert 1.0 <= peak / counted <= ACTIVATION_CALIBRATION, (peak / 2**20, counted / 2**20)


# -- kohya's other optimizers ---------------------------------------------------------------------------------

OTHER_OPTIMIZERS = [("Lion", []), ("SGDNesterov", []), ("Prodigy", []), ("DAdaptAdam", []), ("DAdaptAdan", []),
                    ("DAdaptLion", []), ("DAdaptSGD", []), ("DAdaptAdaGrad", []), ("DAdaptation", []),
                    ("RAdam", []), ("NAdam", []), ("torch.optim.SGD", []), ("torch.optim.SGD", ["momentum=0.9"]),
                    ("RMSprop", ["momentum=0.5", "centered=True"]), ("Adam", ["amsgrad=True"]), ("Adagrad", [])]


@pytest.mark.parametrize("full_bf16", [False, True])
@pytest.mark.parametrize(("optimizer", "args"), OTHER_OPTIMIZERS)
def test_other_optimizers_states_are_the_real_tensors(optimizer, args, full_bf16) -> None:
    """The planner's states for kohya's other names and torch's classes: the tensors the optimizer really holds
    after a step (in the trained weights' dtype: fp32, or bf16 under full_bf16)."""
    import warnings

    model = StageCConfig.tiny().build().to(torch.bfloat16 if full_bf16 else torch.float32)
    params = list(model.parameters())
    with torch.no_grad():  # a loaded checkpoint: no all-zero tensor (Prodigy copies only the others: its p0)
        for p in params:
            p.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # D-Adaptation / Prodigy: kohya's learning-rate advice
        opt = build_optimizer(optimizer, params, 1.0, args)
    one_step(params, opt)
    plan = plan_memory("tiny", optimizer=optimizer, optimizer_args=args, full_bf16=full_bf16,
                       mixed_precision="bf16" if full_bf16 else "no")
    assert plan.optimizer_states == state_bytes(opt)


def test_other_optimizers_in_the_plan_and_its_command(capsys) -> None:
    """Prodigy's four parameter-sized states make the full Stage C's 8 GPUs' DDP plan larger than AdamW's; a class
    whose states are unknown is refused by name."""
    adamw, prodigy = (plan_memory("full", gpus=8, optimizer=o) for o in ("adamw", "prodigy"))
    assert prodigy.optimizer_states == 16 * prodigy.params > 2 * adamw.optimizer_states - 1e6  # fp32 masters
    assert prodigy.total > adamw.total
    eight_bit = plan_memory("full", optimizer="AdamW8bit")
    assert eight_bit.optimizer_states < adamw.optimizer_states / 3
    with pytest.raises(ValueError, match="'mypackage.Custom': its states are not estimated"):
        plan_memory("tiny", optimizer="mypackage.Custom")
    from cascade_lab.cli import main

    with pytest.raises(SystemExit, match="--optimizer mypackage.Custom: its states are not estimated"):
        main(["train", "plan", "--variant", "tiny", "--gpus", "1", "--optimizer", "mypackage.Custom"])
    assert main(["train", "plan", "--variant", "tiny", "--gpus", "1", "--optimizer", "lion"]) == 0
    assert "lion" in capsys.readouterr().out
