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

from cascade_lab.training import ConfigError, train
from cascade_lab.training.export import export_checkpoint

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")
STEP3 = "checkpoints/step-00000003"


def settings(shapes_dir, cache, out, **changes):
    """Adafactor with a first moment and parameter scaling (its DTensor path), a warm-up + cosine schedule,
    adaptive buckets, accumulation and clipping: everything an exact resume must restore."""
    return tiny_run(shapes_dir, cache, out, mode="full", max_train_steps=6, optimizer_type="Adafactor",
                    optimizer_args=["relative_step=False", "scale_parameter=True", "beta1=0.9", "weight_decay=0.01"],
                    lr_scheduler="cosine_with_warmup", lr_warmup_steps=2, adaptive_loss_weight=True,
                    gradient_accumulation_steps=2, max_grad_norm=0.05, caption_dropout_rate=0.3, flip_aug=True,
                    save_every_n_steps=3, keep_checkpoints=3) | changes


def torchrun(config: dict, folder: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """`cascade-lab train` under torchrun with 2 CPU processes (gloo)."""
    toml = folder / "train.toml"
    toml.parent.mkdir(parents=True, exist_ok=True)
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cascade_lab.cli", "train", str(toml), "--quiet", *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.perf_counter() - start


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_matches_one_process_resumes_exactly_and_exports(shapes_dir, shared_cache, tmp_path) -> None:
    one = train(**settings(shapes_dir, shared_cache, tmp_path / "one", train_batch_size=8))

    _, elapsed = torchrun(settings(shapes_dir, shared_cache, tmp_path / "two", train_batch_size=4),
                          tmp_path / "two", "--strategy", "fsdp")
    print(f"torchrun FSDP, 2 processes x batch 4, 6 steps: {elapsed:.1f} s")
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert two["status"] == "finished" and two["metadata"]["cascade_lab.strategy"] == "fsdp"
    for a, b in zip(one.losses, two["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["raw_loss"] == pytest.approx(b["raw_loss"],
                                                                                                   rel=1e-5)
    exported = tmp_path / "two" / "stage_c_finetune.safetensors"
    w_one, w_two = load_file(str(one.output_file)), load_file(str(exported))
    assert w_one.keys() == w_two.keys()
    for key, value in w_one.items():
        torch.testing.assert_close(w_two[key], value, rtol=1e-4, atol=1e-6)

    # the sharded step-3 checkpoint, as a run stopped there leaves it: each process's shard, no single file
    ckpt = tmp_path / "two" / STEP3
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed_dir / STEP3)
    torchrun(settings(shapes_dir, shared_cache, resumed_dir, train_batch_size=4, resume="auto"), resumed_dir,
             "--strategy", "fsdp")
    resumed = json.loads((resumed_dir / "run.json").read_text())
    assert [r["loss"] for r in resumed["losses"]] == [r["loss"] for r in two["losses"]]  # bit-identical
    assert [r["grad_norm"] for r in resumed["losses"][3:]] == [r["grad_norm"] for r in two["losses"][3:]]
    assert tensors_equal(load_file(str(resumed_dir / "stage_c_finetune.safetensors")), w_two)

    # after the fact, without a process group: the step-6 checkpoint → the file the run exported at step 6
    final = tmp_path / "two" / "checkpoints" / "step-00000006"
    out = export_checkpoint(final, tmp_path / "converted.safetensors")
    assert tensors_equal(load_file(str(out)), w_two)
    with safe_open(str(out), "pt") as a, safe_open(str(exported), "pt") as b:
        assert a.metadata() == b.metadata() and a.metadata()["cascade_lab.step"] == "6"
    half = export_checkpoint(ckpt, tmp_path / "half.safetensors", save_precision="bf16")  # step 3, in bf16
    step3 = load_file(str(half))
    assert step3["clf.1.weight"].dtype == torch.bfloat16 and not torch.equal(step3["clf.1.weight"].float(),
                                                                             w_two["clf.1.weight"].to(torch.bfloat16
                                                                                                      ).float())


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


def test_fsdp_bf16_with_checkpointing_validation_and_samples(shapes_dir, shared_cache, tmp_path) -> None:
    """bf16 mixed precision (bf16 all-gathers, fp32 reduce-scatter and masters), gradient checkpointing through
    the sharded blocks, AdamW on the shards, collective validation and sampling, a bf16 export."""
    out = tmp_path / "bf16"
    config = tiny_run(shapes_dir, shared_cache, out, mode="full", max_train_steps=2, train_batch_size=4,
                      mixed_precision="bf16", gradient_checkpointing=True, save_precision="bf16", strategy="fsdp",
                      sample_prompts=["a red circle --w 128 --h 128 --s 2"], sample_every_n_steps=2)
    proc, elapsed = torchrun(config, out)
    print(f"torchrun FSDP bf16, 2 processes x batch 4, 2 steps with samples: {elapsed:.1f} s")
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and len(run["losses"]) == 2
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in run["losses"])
    assert [v["step"] for v in run["val_losses"]] == [0, 2] and run["samples"] and all(
        Path(p).is_file() for p in run["samples"][0])
    weights = load_file(str(out / "stage_c_finetune.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
