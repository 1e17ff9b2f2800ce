"""Interrupt and resume: bit-identical to an uninterrupted run; a crash while saving keeps the last checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_run

from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.training import checkpoint as checkpoint_module
from cascade_lab.training import train


class Crash(Exception):
    """The process dying mid-write (power loss, kill): nothing in the run catches it."""

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def dropout_stage_c():
    """The tiny Stage C with its dropout on, so the restored RNG state matters too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return replace(StageCConfig.tiny(), dropout=[0.1, 0.1]).build()


def settings(shapes_dir, cache, out, **changes):
    """Every piece of state a resume must restore: Adafactor moments, a warm-up + cosine schedule, adaptive
    buckets, caption dropout and flips from the data seeds, and dropout from the global RNG."""
    return tiny_run(shapes_dir, cache, out, mode="full", max_train_steps=12, train_batch_size=4,
                    optimizer_type="Adafactor", optimizer_args=["scale_parameter=False", "relative_step=False",
                                                                "warmup_init=False", "beta1=0.9"],
                    lr_scheduler="cosine_with_warmup", lr_warmup_steps=3, adaptive_loss_weight=True, dropout=True,
                    caption_dropout_rate=0.3, flip_aug=True, val_every_n_steps=4, gradient_accumulation_steps=2,
                    ) | changes


def test_stopped_and_resumed_run_is_bit_identical(shapes_dir, shared_cache, tmp_path) -> None:
    whole = train(**settings(shapes_dir, shared_cache, tmp_path / "whole"), stage_c=dropout_stage_c())

    def stop_at_5(event):
        if event.kind == "step" and event.step == 5:
            event.run.stop()

    first = train(**settings(shapes_dir, shared_cache, tmp_path / "split"), stage_c=dropout_stage_c(),
                  callback=stop_at_5)
    assert first.status == "stopped" and first.step == 5 and first.last_checkpoint_step == 5
    second = train(**settings(shapes_dir, shared_cache, tmp_path / "split", resume="auto"), stage_c=dropout_stage_c())
    assert second.status == "finished" and second.step == 12
    expected, got = load_file(str(whole.output_file)), load_file(str(second.output_file))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["loss"] for r in second.losses] == [r["loss"] for r in whole.losses]
    assert second.val_losses == whole.val_losses
    halfway = load_file(str(first.last_checkpoint / "stage_c_finetune.safetensors"))
    assert not torch.equal(expected["clf.1.weight"], halfway["clf.1.weight"])


@pytest.mark.parametrize("changes, optimizer", [
    ({"optimizer_type": "Lion", "learning_rate": 1e-4, "optimizer_args": ["weight_decay=0.1"],
      "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 2, "lr_warmup_steps": 2}, "Lion"),
    ({"optimizer_type": "RAdam", "optimizer_args": ["betas=0.8,0.99"], "lr_scheduler_type": "StepLR",
      "lr_scheduler_args": ["step_size=2", "gamma=0.5"]}, "torch.optim.radam.RAdam(betas=(0.8, 0.99))"),
    ({"optimizer_type": "SGDNesterov", "learning_rate": 0.05, "lr_scheduler": "polynomial",
      "lr_scheduler_power": 2.0, "lr_warmup_steps": 3}, "torch.optim.sgd.SGD(momentum=0.9)")])
def test_other_optimizers_and_schedules_resume_bit_identical(shapes_dir, shared_cache, tmp_path, changes,
                                                             optimizer) -> None:
    """kohya's other optimizers (a momentum the checkpoint must carry) and schedules (their step count) resume as if
    the run had never stopped; the LoRA's ss_optimizer names the class that trained it, as kohya's does."""
    def run(out, **more):
        return train(**tiny_run(shapes_dir, shared_cache, out, max_train_steps=8, network_dim=2, **changes, **more))

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            event.run.stop()

    whole = run(tmp_path / "whole")
    first = run(tmp_path / "split", callback=stop_at_3)
    assert first.status == "stopped" and first.last_checkpoint_step == 3
    second = run(tmp_path / "split", resume="auto")
    assert [r["loss"] for r in second.losses] == [r["loss"] for r in whole.losses]
    assert [r["lr"] for r in second.losses] == [r["lr"] for r in whole.losses]
    expected, got = load_file(str(whole.output_file)), load_file(str(second.output_file))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    from safetensors import safe_open

    with safe_open(str(second.output_file), "pt") as f:
        meta = f.metadata()
    assert meta["ss_lr_scheduler"] == ("StepLR(step_size=2,gamma=0.5)" if "lr_scheduler_type" in changes
                                       else changes["lr_scheduler"])
    if optimizer == "Lion":  # lion-pytorch's class when it is installed, else cascade_lab's
        assert meta["ss_optimizer"] in ("lion_pytorch.lion_pytorch.Lion(weight_decay=0.1)",
                                        "cascade_lab.training.lion.Lion(weight_decay=0.1)")
    else:
        assert meta["ss_optimizer"] == optimizer


def test_resume_refuses_other_settings(shapes_dir, shared_cache, tmp_path) -> None:
    train(**settings(shapes_dir, shared_cache, tmp_path, max_train_steps=2))
    with pytest.raises(ValueError, match="adaptive_loss_weight"):
        train(**settings(shapes_dir, shared_cache, tmp_path, max_train_steps=4, adaptive_loss_weight=False,
                         resume="auto"))
    with pytest.raises(ValueError, match="lr_scheduler_type: '' → 'StepLR'"):
        train(**settings(shapes_dir, shared_cache, tmp_path, max_train_steps=4, lr_warmup_steps=0,
                         lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"], resume="auto"))


@pytest.mark.parametrize("fail_at", [3, 4])
def test_crash_while_saving_keeps_the_previous_checkpoint(shapes_dir, shared_cache, tmp_path, monkeypatch,
                                                          fail_at) -> None:
    """Each save writes the checkpoint's model file, then the exported copy: call 3 dies inside the
    step-4 checkpoint, call 4 while writing the step-4 export after step 4 was published. The process dies
    (`Crash`); a mere OSError is survived, see test_training_run_errors."""
    real = checkpoint_module._save_safetensors
    calls = []

    def flaky(tensors, path, metadata):
        calls.append(path)
        if len(calls) == fail_at:
            path.write_bytes(b"\x00" * 100)  # half a file, then the disk fills up
            raise Crash("killed while writing")
        real(tensors, path, metadata)

    monkeypatch.setattr(checkpoint_module, "_save_safetensors", flaky)
    with pytest.raises(Crash, match="killed"):
        train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=6, save_every_n_steps=2))
    root = tmp_path / "checkpoints"
    good = "step-00000002" if fail_at == 3 else "step-00000004"
    assert json.loads((root / "latest.json").read_text())["folder"] == good
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest.json", "step-00000002"] + (
        ["step-00000004"] if fail_at == 4 else []))  # no temporary leftovers
    step2 = load_file(str(root / "step-00000002" / "stage_c_finetune.safetensors"))
    exported = load_file(str(tmp_path / "stage_c_finetune-step00000002.safetensors"))  # step 2's export, whole
    assert all(torch.equal(exported[k], v) for k, v in step2.items())
    assert not (tmp_path / "stage_c_finetune-step00000004.safetensors").exists()  # the one it died writing
    assert not list(tmp_path.glob(".*tmp*"))
    monkeypatch.setattr(checkpoint_module, "_save_safetensors", real)
    resumed = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=6,
                               save_every_n_steps=2, resume="auto"))
    assert resumed.status == "finished" and resumed.losses[0]["step"] == 1 and len(resumed.losses) == 6
