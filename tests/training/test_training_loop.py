"""The loop on the tiny Stage C: it learns, logs raw and weighted losses, guards against NaN, saves official keys."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import stage_c_inputs, tiny_run

from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.training import ConfigError, train

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_full_finetune_learns_and_reloads_with_the_official_keys(shapes_dir, shared_cache, tmp_path) -> None:
    start = time.perf_counter()
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=300,
                           val_every_n_steps=100))
    elapsed = time.perf_counter() - start
    assert run.status == "finished" and run.step == 300 and len(run.losses) == 300
    before, after = run.val_losses[0]["val_loss"], run.val_losses[-1]["val_loss"]
    print(f"full fine-tune: val loss {before:.3f} -> {after:.3f} in 300 steps, {elapsed:.1f} s")
    assert 0.9 < before < 1.1  # zero-initialised output conv: ε prediction 0, unit-variance target
    assert after < 0.5 * before and [v["step"] for v in run.val_losses] == [0, 100, 200, 300]
    first, last = run.losses[:20], run.losses[-20:]
    assert 0.9 < first[0]["raw_loss"] < 1.2 and first[0]["loss"] < first[0]["raw_loss"]  # P2 weights < 1
    assert sum(r["raw_loss"] for r in last) < 0.6 * sum(r["raw_loss"] for r in first)
    tensors = load_file(str(run.output_file))
    fresh = StageCConfig.tiny().build()
    assert list(tensors) == sorted(fresh.state_dict()) and all(t.dtype == torch.float32 for t in tensors.values())
    fresh.load_state_dict(tensors, strict=True)
    inputs = stage_c_inputs()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**inputs), run.stage_c.eval()(**inputs))
    assert "official" not in run.metadata["cascade_lab.training_scale"]  # this run used the kohya scale
    assert json.loads(run.metadata["cascade_lab.latent_buckets"]) == {"4x4": 12}


def test_bf16_autocast_checkpointing_adaptive_weights_saved(shapes_dir, shared_cache, tmp_path) -> None:
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=6,
                           mixed_precision="bf16", gradient_checkpointing=True, adaptive_loss_weight=True,
                           save_precision="bf16", gradient_accumulation_steps=2))
    assert run.status == "finished" and all(torch.isfinite(torch.tensor(r["loss"])) for r in run.losses)
    info = json.loads((run.last_checkpoint / "info.json").read_text())
    buckets = info["adaptive_loss"]["bucket_losses"]
    assert len(buckets) == 300 and sum(b != 1.0 for b in buckets) >= 6
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(run.output_file)).values())
    assert (run.last_checkpoint / "trainable.safetensors").is_file()  # fp32 master weights for resuming


def test_checkpointed_bf16_steps_on_the_cpu_cast_each_weight_once(shapes_dir, shared_cache, tmp_path,
                                                                    monkeypatch) -> None:
    """With gradient checkpointing under bf16 autocast on the CPU, the recomputed blocks reuse the forward's bf16
    weight copies: the same losses and weights to the bit, one cast fewer per weight and step."""
    import contextlib

    import cascade_lab.training.loop as loop

    step = loop.Trainer.train_step

    def run(keep: bool, out: str) -> tuple[list, dict, int]:
        casts = [0]

        def profiled_step(self: loop.Trainer) -> dict:  # the optimizer steps only, not caching or saving
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = step(self)
            casts[0] += sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
            return result

        monkeypatch.setattr(loop.Trainer, "train_step", profiled_step)
        if not keep:
            monkeypatch.setattr(loop.Trainer, "_keep_weight_casts", lambda self: contextlib.nullcontext())
        result = train(**tiny_run(shapes_dir, shared_cache, tmp_path / out, mode="full", max_train_steps=3,
                                  mixed_precision="bf16", gradient_checkpointing=True))
        return [r["loss"] for r in result.losses], result.stage_c.state_dict(), casts[0]

    kept_losses, kept_weights, kept_casts = run(True, "kept")
    plain_losses, plain_weights, plain_casts = run(False, "plain")
    assert kept_losses == plain_losses
    assert all(torch.equal(kept_weights[k], plain_weights[k]) for k in plain_weights)
    weights = sum(1 for p in StageCConfig.tiny().build().parameters() if p.dim() >= 2)  # matmul/conv weights
    assert plain_casts - kept_casts >= 3 * weights, (plain_casts, kept_casts, weights)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_selective_checkpointing_on_the_cpu(shapes_dir, shared_cache, tmp_path, monkeypatch, precision) -> None:
    """gradient_checkpointing_mode "auto" is selective on the CPU: the same losses and weights to the bit as
    "full", without recomputing a single product of the forward pass in the backward."""
    from conftest import count_products

    import cascade_lab.training.loop as loop

    step = loop.Trainer.train_step

    def run(mode: str) -> tuple[list, dict, list[int], bool]:
        products: list[int] = []
        keeps = []

        def counted_step(self: loop.Trainer) -> dict:
            keeps.append(self.model.checkpoint_keeps_products)
            result: list[dict] = []
            products.append(count_products(lambda: result.append(step(self))))
            return result[0]

        monkeypatch.setattr(loop.Trainer, "train_step", counted_step)
        result = train(**tiny_run(shapes_dir, shared_cache, tmp_path / mode, mode="full", max_train_steps=3,
                                  mixed_precision=precision, gradient_checkpointing=True,
                                  gradient_checkpointing_mode=mode))
        return [r["loss"] for r in result.losses], result.stage_c.state_dict(), products, all(keeps)

    auto_losses, auto_weights, auto_products, auto_keeps = run("auto")
    full_losses, full_weights, full_products, full_keeps = run("full")
    assert auto_keeps and not full_keeps
    assert auto_losses == full_losses
    assert all(torch.equal(auto_weights[k], full_weights[k]) for k in full_weights)
    linears = sum(1 for m in StageCConfig.tiny().build().modules() if isinstance(m, torch.nn.Linear))
    # the blocks' products run once a step instead of twice; most of the model's linears are in the blocks
    pairs = list(zip(auto_products, full_products, strict=True))
    assert len(pairs) == 3 and all(f - a >= linears // 2 for a, f in pairs), pairs


def test_selective_checkpointing_on_a_small_machine_says_what_it_recomputes(shapes_dir, shared_cache, tmp_path,
                                                                            monkeypatch) -> None:
    """"auto" keeps the product outputs within a quarter of the memory available at the start; past it they are
    recomputed, and the first step says so. The losses do not change."""
    import cascade_lab.training.loop as loop

    losses = {}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this machine share its memory
    for mode in ("full", "auto"):
        monkeypatch.setattr(loop, "available_memory", lambda device: 8 * 100_000)  # 100 kB to keep each
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = train(**tiny_run(shapes_dir, shared_cache, tmp_path / mode, mode="full", max_train_steps=2,
                                   gradient_checkpointing=True, gradient_checkpointing_mode=mode))
        notices = [str(w.message) for w in caught if "selective gradient checkpointing" in str(w.message)]
        losses[mode] = [r["loss"] for r in run.losses]
        if mode == "full":
            assert notices == [] and run.stage_c.checkpoint_budget is None
            continue
        budget = run.stage_c.checkpoint_budget
        assert budget.limit == 100_000 and 0 < budget.kept <= 100_000 < budget.kept + budget.recomputed
        assert len(notices) == 1 and "within its limit here (0 MiB: a quarter of the memory" in notices[0]
        assert "'selective' keeps them all" in notices[0]
    assert losses["auto"] == losses["full"]


def test_checkpointing_mode_is_resolved_per_device() -> None:
    from cascade_lab.training.config import TrainConfig, checkpointing_mode

    config = TrainConfig(train_data_dir="x", gradient_checkpointing=True)
    assert config.gradient_checkpointing_mode == "auto"
    assert checkpointing_mode(config, "cpu") == "selective" and checkpointing_mode(config, "cuda") == "full"
    for mode in ("full", "selective"):
        explicit = TrainConfig(train_data_dir="x", gradient_checkpointing_mode=mode)
        assert checkpointing_mode(explicit, "cpu") == checkpointing_mode(explicit, "cuda") == mode
    with pytest.raises(ConfigError, match=r"gradient_checkpointing_mode='partial': use one of auto, full, selective"):
        TrainConfig(train_data_dir="x", gradient_checkpointing_mode="partial").validate()


def test_fp16_is_refused() -> None:
    with pytest.raises(ConfigError, match="float16"):
        train(train_data_dir="x", mixed_precision="fp16")


def _nan_after(model: torch.nn.Module, bad: set[int] | int) -> list[int]:
    """Make training-mode forwards number `bad` (1-based; an int: that one and all later) return NaN."""
    calls = [0]

    def hook(module, args, output):
        if not module.training:
            return None
        calls[0] += 1
        hit = calls[0] >= bad if isinstance(bad, int) else calls[0] in bad
        return output + float("nan") if hit else None

    model.register_forward_hook(hook)
    return calls


def test_one_nan_step_is_skipped_with_a_warning(shapes_dir, shared_cache, tmp_path) -> None:
    model = StageCConfig.tiny().build()
    _nan_after(model, {3})
    with pytest.warns(RuntimeWarning, match="step 3: non-finite loss"):
        run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=6), stage_c=model)
    assert run.status == "finished" and [r["skipped"] for r in run.losses] == [False] * 2 + [True] + [False] * 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:step .*(non-finite|no checkpoint)")
def test_repeated_nans_stop_without_touching_the_last_good_checkpoint(shapes_dir, shared_cache, tmp_path) -> None:
    model = StageCConfig.tiny().build()
    _nan_after(model, 5)
    with pytest.warns(RuntimeWarning, match="3 steps in a row"):
        run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=20,
                               save_every_n_steps=2, max_nan_steps=3), stage_c=model)
    assert run.status == "nan" and run.step == 7 and "non-finite" in str(run.error)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step-00000002", "step-00000004"]  # nothing saved during the NaN streak (step 6)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["folder"] == "step-00000004"
    saved = load_file(str(tmp_path / "stage_c_finetune-step00000004.safetensors"))  # kohya's step-save name
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # no update after step 4
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "nan"


def test_dropout_switch_keeps_blocks_in_training_mode() -> None:
    """LoRA default: blocks train (gradient checkpointing works) but dropout and attention dropout are off."""
    from dataclasses import replace

    from cascade_lab.training.loop import set_dropout

    model = replace(StageCConfig.tiny(), dropout=[0.5, 0.5]).build()
    with torch.no_grad():
        model.clf[1].weight.normal_(0, 0.1)  # the official zero init would hide any dropout
    set_dropout(model, False)
    attention = [m for m in model.modules() if hasattr(m, "in_proj_weight")]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert model.training and attention and dropouts
    assert not any(m.training for m in attention + dropouts)
    inputs = stage_c_inputs()
    assert torch.equal(model(**inputs), model(**inputs))  # deterministic: nothing dropped
    set_dropout(model, True)
    assert all(m.training for m in attention + dropouts)
    assert not torch.equal(model(**inputs), model(**inputs))


def test_noise_shift_moves_the_training_noise_levels(shapes_dir, shared_cache, tmp_path, monkeypatch) -> None:
    import math

    import cascade_lab.training.loop as loop
    from cascade_lab.diffusion.schedule import logsnr

    seen: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    real = loop.diffuse

    def spy(*args, **kwargs):
        d = real(*args, **kwargs)
        seen.append((kwargs["shift"], kwargs["t"], d.logsnr))
        return d

    monkeypatch.setattr(loop, "diffuse", spy)
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="full", max_train_steps=2, noise_shift=3.0))
    assert run.status == "finished" and run.metadata["cascade_lab.noise_shift"] == "3.0"
    assert seen and all(shift == 3.0 for shift, _, _ in seen)
    for _, t, got in seen:  # logSNR − 2·ln 3 wherever the clamp of the schedule does not bind
        assert torch.allclose(got, logsnr(t, shift=3.0)) and not torch.allclose(got, logsnr(t))
        inner = (t > 0.05) & (t < 0.95)
        assert torch.allclose(got[inner], logsnr(t[inner]) - 2 * math.log(3.0), atol=1e-4)
    with pytest.raises(ConfigError, match="noise_shift=0"):
        train(train_data_dir="x", noise_shift=0)


def test_encoders_leave_the_device_once_their_caches_are_filled(shapes_dir, tmp_path) -> None:
    """A cold cache lends EfficientNet and the text encoder to the training device and puts them back where they
    were (kohya moves its VAE / text encoder off the GPU after caching); an encoder that runs every step (its
    outputs not cached) stays on the training device."""
    from training_helpers import Moves

    from cascade_lab.models.tiny import calibrated_random_effnet
    from cascade_lab.training import distributed as dist
    from cascade_lab.training.config import TrainConfig
    from cascade_lab.training.data import TrainingData
    from cascade_lab.training.loop import Trainer
    from cascade_lab.training.metadata import scale_factor
    from cascade_lab.training.models import _tiny_stages, build_models
    from cascade_lab.training.toml_config import dataset_config_for

    home = torch.device("meta")
    for cache_text in (True, False):
        effnet, text = Moves(calibrated_random_effnet()), Moves(_tiny_stages(0).text_encoder)
        config = TrainConfig(**tiny_run(shapes_dir, tmp_path / f"cache{cache_text}", tmp_path / f"out{cache_text}",
                                        max_train_steps=1, cache_text_encoder_outputs=cache_text)).validate()
        models = build_models(config, effnet=effnet, text_encoder=text)
        data = TrainingData(dataset_config_for(config), scale=scale_factor(config, models), seed=0)
        trainer = Trainer(config, models, data, dist.setup("cpu"))
        trainer.prepare_caches(list(range(len(data.records))))
        assert trainer.latents.encoded == len(data.records)
        assert set(effnet.moves[:-1]) == {trainer.device} and effnet.moves[-1] == home  # back once, at the end
        if cache_text:
            assert trainer.texts.encoded > 1 and set(text.moves[:-1]) == {trainer.device} and text.device == home
        trainer.train_step()
        assert effnet.device == home  # the step reads the cache
        assert text.device == (home if cache_text else trainer.device)  # uncached: encoded every step, kept there
