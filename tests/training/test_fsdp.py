"""FSDP2 over two processes (torchrun, gloo on CPU): the losses of one process with the doubled batch, an exact
resume from the sharded checkpoint, the single-file export (at the end and after the fact), bf16 mixed precision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import tiny_run

from cascade_lab.training import ConfigError, TrainConfig, train
from cascade_lab.training.export import export_checkpoint

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")
STEP2 = "checkpoints/step-00000002"
EXPORT = "stage_c_finetune.safetensors"


def settings(shapes_dir, cache, out, **changes):
    """Adafactor with a first moment and parameter scaling (its DTensor path), a warm-up + cosine schedule,
    adaptive buckets, accumulation and clipping: everything an exact resume must restore."""
    return tiny_run(shapes_dir, cache, out, mode="full", max_train_steps=4, optimizer_type="Adafactor",
                    optimizer_args=["relative_step=False", "scale_parameter=True", "beta1=0.9", "weight_decay=0.01"],
                    lr_scheduler="cosine_with_warmup", lr_warmup_steps=2, adaptive_loss_weight=True,
                    gradient_accumulation_steps=2, max_grad_norm=0.05, caption_dropout_rate=0.3, flip_aug=True,
                    save_every_n_steps=2, keep_checkpoints=2) | changes


def write_toml(config: dict, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    return str(path)


def torchrun(*args: str) -> float:
    """fsdp_worker.py (`cascade-lab train CONFIG --strategy fsdp`, run after run) under torchrun: 2 CPU processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).with_name("fsdp_worker.py")), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished: step") == sum(a.endswith(".toml") for a in args)  # rank 0 reports, once
    return time.perf_counter() - start


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bf16_settings(shapes_dir, cache, out):
    """bf16 mixed precision (bf16 all-gathers, fp32 reduce-scatter and masters), gradient checkpointing through
    the sharded blocks, AdamW on the shards, collective validation and sampling, a bf16 export."""
    return tiny_run(shapes_dir, cache, out, mode="full", max_train_steps=2, train_batch_size=4,
                    mixed_precision="bf16", gradient_checkpointing=True, save_precision="bf16",
                    sample_prompts=["a red circle --w 128 --h 128 --s 2"], sample_every_n_steps=2,
                    sample_full_images=False)


def adamw_settings(shapes_dir, cache, out, **changes):
    """AdamW (the default optimizer) on the shards, with gradient checkpointing through the sharded blocks."""
    return tiny_run(shapes_dir, cache, out, mode="full", max_train_steps=3, gradient_checkpointing=True,
                    lr_scheduler="linear", max_grad_norm=0.05) | changes


def lion_settings(shapes_dir, cache, out, **changes):
    """kohya's Lion (a momentum per parameter, sharded like it) with cosine restarts and a warm-up."""
    return tiny_run(shapes_dir, cache, out, mode="full", max_train_steps=3, optimizer_type="Lion",
                    learning_rate=1e-4, optimizer_args=["weight_decay=0.1"], lr_scheduler="cosine_with_restarts",
                    lr_scheduler_num_cycles=2, lr_warmup_steps=1, max_grad_norm=0.05) | changes


def stage_b_settings(shapes_dir, cache, out, **changes):
    """A full fine-tune of Stage B (its down/up blocks sharded the same way), AdamW."""
    return tiny_run(shapes_dir, cache, out, mode="full", stage="b", max_train_steps=3, max_grad_norm=0.05) | changes


@pytest.fixture(scope="module")
def fsdp_runs(shapes_dir, shared_cache, tmp_path_factory) -> Path:
    """In one torchrun launch: an uninterrupted 4-step FSDP run ("two"); its step-2 checkpoint copied to
    "resumed" and continued from there, as a run stopped after step 2 continues; a bf16 run ("bf16")."""
    root = tmp_path_factory.mktemp("fsdp")
    two = write_toml(settings(shapes_dir, shared_cache, root / "two", train_batch_size=4), root / "two.toml")
    resumed = write_toml(settings(shapes_dir, shared_cache, root / "resumed", train_batch_size=4, resume="auto"),
                         root / "resumed.toml")
    bf16 = write_toml(bf16_settings(shapes_dir, shared_cache, root / "bf16"), root / "bf16.toml")
    adamw = write_toml(adamw_settings(shapes_dir, shared_cache, root / "adamw", train_batch_size=4),
                       root / "adamw.toml")
    blocked = write_toml(tiny_run(shapes_dir, shared_cache, root / "blocked", mode="full", max_train_steps=1,
                                  train_batch_size=4), root / "blocked.toml")
    stage_b = write_toml(stage_b_settings(shapes_dir, shared_cache, root / "stage_b", train_batch_size=4),
                         root / "stage_b.toml")
    lion = write_toml(lion_settings(shapes_dir, shared_cache, root / "lion", train_batch_size=4), root / "lion.toml")
    (root / "blocked").mkdir()
    (root / "blocked" / "checkpoints").write_text("a file where the checkpoints folder goes")
    elapsed = torchrun(two, "--copy", str(root / "two" / STEP2), str(root / "resumed" / STEP2), resumed, bf16,
                       adamw, blocked, stage_b, lion)
    print(f"torchrun, 2 processes: FSDP 4 steps, resumed 2 steps, bf16 2 steps with samples, AdamW 3 steps, "
          f"1 step that cannot save, Stage B 3 steps: {elapsed:.1f} s")
    return root


def test_fsdp_gives_the_losses_of_one_process_with_the_doubled_batch(fsdp_runs, shapes_dir, shared_cache,
                                                                     tmp_path) -> None:
    one = train(**settings(shapes_dir, shared_cache, tmp_path / "one", train_batch_size=8))
    two = json.loads((fsdp_runs / "two" / "run.json").read_text())
    assert two["status"] == "finished" and two["metadata"]["cascade_lab.strategy"] == "fsdp"
    assert two["metadata"]["cascade_lab.world_size"] == "2"
    for a, b in zip(one.losses, two["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["raw_loss"] == pytest.approx(b["raw_loss"],
                                                                                                   rel=1e-5)
    w_one, w_two = load_file(str(one.output_file)), load_file(str(fsdp_runs / "two" / EXPORT))
    assert w_one.keys() == w_two.keys()
    for key, value in w_one.items():
        torch.testing.assert_close(w_two[key], value, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="not a sharded checkpoint.*model file is"):  # it has its file already
        export_checkpoint(one.last_checkpoint, tmp_path / "x.safetensors")


def test_fsdp_with_adamw_and_checkpointing_matches_one_process(fsdp_runs, shapes_dir, shared_cache,
                                                                 tmp_path) -> None:
    one = train(**adamw_settings(shapes_dir, shared_cache, tmp_path, train_batch_size=8))
    two = json.loads((fsdp_runs / "adamw" / "run.json").read_text())
    for a, b in zip(one.losses, two["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                    rel=1e-4)
    expected = load_file(str(one.output_file))
    for key, value in load_file(str(fsdp_runs / "adamw" / EXPORT)).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)


def test_fsdp_with_lion_matches_one_process(fsdp_runs, shapes_dir, shared_cache, tmp_path) -> None:
    one = train(**lion_settings(shapes_dir, shared_cache, tmp_path, train_batch_size=8))
    two = json.loads((fsdp_runs / "lion" / "run.json").read_text())
    for a, b in zip(one.losses, two["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    expected, got = load_file(str(one.output_file)), load_file(str(fsdp_runs / "lion" / EXPORT))
    assert got.keys() == expected.keys()
    # a signed step: an element whose gradient is 0 up to rounding (the key projection's bias) may step the other
    # way in one of the two runs (at most 2 lr per step); all the others agree
    apart = sum(int((~torch.isclose(got[k], expected[k], rtol=1e-5, atol=1e-6)).sum()) for k in got)
    assert apart < 0.01 * sum(v.numel() for v in got.values())
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) <= 2 * 1e-4 * 3 + 1e-6


def test_fsdp_trains_stage_b_as_one_process_with_the_doubled_batch(fsdp_runs, shapes_dir, shared_cache,
                                                                    tmp_path) -> None:
    one = train(**stage_b_settings(shapes_dir, shared_cache, tmp_path, train_batch_size=8))
    two = json.loads((fsdp_runs / "stage_b" / "run.json").read_text())
    assert two["metadata"]["cascade_lab.strategy"] == "fsdp"
    for a, b in zip(one.losses, two["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    expected = load_file(str(one.output_file))
    exported = load_file(str(fsdp_runs / "stage_b" / "stage_b_finetune.safetensors"))
    assert exported.keys() == expected.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)


def test_resume_from_the_sharded_checkpoint_is_bit_identical(fsdp_runs) -> None:
    ckpt = fsdp_runs / "two" / STEP2  # each process's shard and the run's state; no single file
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "info.json", "shards", "state.pt"]
    two = json.loads((fsdp_runs / "two" / "run.json").read_text())
    resumed = json.loads((fsdp_runs / "resumed" / "run.json").read_text())
    assert [r["loss"] for r in resumed["losses"]] == [r["loss"] for r in two["losses"]]
    assert [r["grad_norm"] for r in resumed["losses"][2:]] == [r["grad_norm"] for r in two["losses"][2:]]
    assert resumed["val_losses"] == two["val_losses"]
    w_two, w_resumed = (load_file(str(fsdp_runs / name / EXPORT)) for name in ("two", "resumed"))
    assert tensors_equal(w_resumed, w_two)


def test_export_a_sharded_checkpoint_without_a_process_group(fsdp_runs, tmp_path) -> None:
    from cascade_lab.cli import main

    exported = fsdp_runs / "two" / EXPORT  # what the run wrote at step 4
    out = tmp_path / "converted.safetensors"
    assert main(["train", "export", str(fsdp_runs / "two"), "-o", str(out)]) == 0  # its latest: step 4
    assert tensors_equal(load_file(str(out)), load_file(str(exported)))
    with safe_open(str(out), "pt") as a, safe_open(str(exported), "pt") as b:
        assert a.metadata() == b.metadata() and a.metadata()["cascade_lab.step"] == "4"
    step2 = load_file(str(export_checkpoint(fsdp_runs / "two" / STEP2, tmp_path / "s2.safetensors", "bf16")))
    final = load_file(str(exported))
    assert step2.keys() == final.keys() and step2["clf.1.weight"].dtype == torch.bfloat16
    assert not torch.equal(step2["clf.1.weight"], final["clf.1.weight"].to(torch.bfloat16))


def test_fsdp_bf16_with_checkpointing_validation_and_samples(fsdp_runs) -> None:
    out = fsdp_runs / "bf16"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and len(run["losses"]) == 2
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in run["losses"])
    assert [v["step"] for v in run["val_losses"]] == [0, 2] and run["samples"] and all(
        Path(p).is_file() for p in run["samples"][0])
    weights = load_file(str(out / EXPORT))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_a_checkpoint_that_cannot_be_written_leaves_no_process_waiting(fsdp_runs) -> None:
    """The staging folder cannot be made (a file holds its parent's name): every process hears of it, the run
    finishes (the launch returned) and nothing claims a checkpoint."""
    run = json.loads((fsdp_runs / "blocked" / "run.json").read_text())
    assert run["status"] == "finished" and run["step"] == 1 and run["last_checkpoint"] is None
    assert (fsdp_runs / "blocked" / "checkpoints").is_file()


def test_half_written_checkpoint_is_refused(shapes_dir, shared_cache, tmp_path) -> None:
    """A save cut off before its COMPLETE marker: neither export nor resume takes it."""
    from cascade_lab.cli import main

    folder = tmp_path / "out" / "checkpoints" / "step-00000004"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "__0_0.distcp").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        export_checkpoint(folder, tmp_path / "x.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "export", str(folder), "-o", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2 and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ConfigError, match="not a complete"):
        train(**settings(shapes_dir, shared_cache, tmp_path / "out", resume=str(folder)))


def test_a_sharded_checkpoint_resumes_on_one_process(fsdp_runs, shapes_dir, shared_cache, tmp_path) -> None:
    """2 processes x batch 4 stopped at step 2, continued by 1 process x batch 8 (the same global batch): DCP
    reads the shards into the whole model and optimizer, so steps 3-4 match to float32 rounding."""
    shutil.copytree(fsdp_runs / "two" / STEP2, tmp_path / STEP2)
    with pytest.warns(UserWarning, match="saved by 2 process"):
        one = train(**settings(shapes_dir, shared_cache, tmp_path, train_batch_size=8, resume="auto"))
    two = json.loads((fsdp_runs / "two" / "run.json").read_text())
    assert one.status == "finished" and [r["step"] for r in one.losses] == [1, 2, 3, 4]
    for a, b in zip(one.losses[2:], two["losses"][2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                    rel=1e-4)
    expected = load_file(str(fsdp_runs / "two" / EXPORT))
    for key, value in load_file(str(one.output_file)).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)


def test_strategy_from_the_config_and_from_accelerate_launch() -> None:
    from cascade_lab.training.distributed import resolve_strategy
    from cascade_lab.training.kohya_args import parse_kohya

    assert resolve_strategy("auto", "full", 2, {}) == "ddp"
    assert resolve_strategy("fsdp", "full", 2, {}) == "fsdp"
    assert resolve_strategy("auto", "full", 2, {"ACCELERATE_USE_FSDP": "true"}) == "fsdp"  # accelerate --use_fsdp
    assert resolve_strategy("auto", "lora", 2, {"ACCELERATE_USE_FSDP": "false"}) == "ddp"
    with pytest.raises(ConfigError, match="strategy='ddp' but accelerate launch --use_fsdp"):
        resolve_strategy("ddp", "full", 2, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ConfigError, match="mode='lora' is not supported.*use strategy='ddp'"):
        resolve_strategy("auto", "lora", 2, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.warns(UserWarning, match="one process: nothing to shard over"):
        assert resolve_strategy("fsdp", "full", 1, {}) == "single"
    fields, _, _ = parse_kohya(["stable_cascade_train_stage_c.py", "--model", "tiny", "--train_data_dir", "x",
                                "--output_dir", "out", "--strategy", "fsdp"], {})
    assert fields["strategy"] == "fsdp" and fields["mode"] == "full"  # kohya's command line with ours
    with pytest.raises(ConfigError, match="strategy='sharded': use one of auto, ddp, fsdp"):
        TrainConfig(train_data_dir="x", strategy="sharded").validate()
    with pytest.raises(ConfigError, match="mode='lora' is not supported"):
        TrainConfig(train_data_dir="x", strategy="fsdp").validate()  # mode defaults to lora
