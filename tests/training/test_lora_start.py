"""kohya's --network_weights / --dim_from_weights: a LoRA run that starts from a file, and the files it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from training_helpers import comfyui_lora_names, tiny_run

from cascade_lab.models.stage_c import StageCConfig
from cascade_lab.training import train
from cascade_lab.training.config import ConfigError

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(shapes_dir, shared_cache, tmp_path_factory):
    """A short cascade_lab LoRA run (all_linear, rank 4, alpha 2): its run and its file's tensors."""
    out = tmp_path_factory.mktemp("first")
    with torch.random.fork_rng(devices=[]):
        run = train(**tiny_run(shapes_dir, shared_cache, out, mode="lora", network_target="all_linear", network_dim=4,
                               network_alpha=2, max_train_steps=3, learning_rate=1e-2, seed=1))
    with safe_open(str(run.output_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert sum(bool(v.any()) for k, v in tensors.items() if "lora_up" in k) > 10
    return run, tensors


def written(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def kohya_file(tensors, path):
    """The same LoRA as kohya's LoRA script writes it: ``lora_unet_`` + each Stage C module path with ``_``
    (attention split into to_q/k/v, kohya's naming rule, written out in `comfyui_lora_names`), alphas as 0-dim
    tensors, 1x1 convs 4-D, and the text-encoder LoRA it also creates without --network_train_unet_only (untrained
    with cached text: lora_up zero)."""
    names = comfyui_lora_names(StageCConfig.tiny().build())
    modules = {k.split(".")[0] for k in tensors}
    assert modules <= names.keys()  # cascade_lab's names are kohya's
    out = {k: v.clone() for k, v in tensors.items()}
    for i in range(2):
        for proj in ("q_proj", "out_proj", "fc1"):
            name = f"lora_te_text_model_encoder_layers_{i}_self_attn_{proj}"
            out |= {f"{name}.lora_down.weight": torch.randn(4, 24), f"{name}.lora_up.weight": torch.zeros(24, 4),
                    f"{name}.alpha": torch.tensor(2.0)}
    return written(path, out, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})


def starting(shapes_dir, cache, out, weights, **changes):
    return tiny_run(shapes_dir, cache, out, mode="lora", network_target="all_linear", network_dim=4, network_alpha=2,
                    max_train_steps=1, seed=9, network_weights=weights) | changes


def test_a_run_starts_from_cascade_labs_kohyas_and_onetrainers_file(trained, shapes_dir, shared_cache,
                                                                   tmp_path) -> None:
    first, tensors = trained
    own = str(first.output_file)
    kohya = kohya_file(tensors, tmp_path / "kohya.safetensors")
    onetrainer = written(tmp_path / "onetrainer.safetensors",
                         {k.replace("lora_unet_", "lora_prior_unet_"): v for k, v in tensors.items()})
    with pytest.warns(UserWarning, match="6 text-encoder modules .all zero"):
        runs = [train(**starting(shapes_dir, shared_cache, tmp_path / f"run{i}", f))
                for i, f in enumerate((own, kohya, onetrainer))]
    # where the first run stopped: its last validation (after its last step) is the new runs' first. Equal to
    # float32 rounding only: with 2 threads MKL's products may round differently for differently aligned tensors
    assert math.isclose(runs[0].val_losses[0]["val_loss"], first.val_losses[-1]["val_loss"], rel_tol=1e-6)
    assert all(math.isclose(r.losses[0]["loss"], runs[0].losses[0]["loss"], rel_tol=1e-6) for r in runs)

    # the first step's loss is that of the file's weights on the run's first batch: a Trainer set to them by hand
    from cascade_lab.training import distributed as dist
    from cascade_lab.training.config import TrainConfig
    from cascade_lab.training.data import TrainingData
    from cascade_lab.training.loop import Trainer
    from cascade_lab.training.metadata import scale_factor
    from cascade_lab.training.models import build_models
    from cascade_lab.training.toml_config import dataset_config_for

    config = TrainConfig(**starting(shapes_dir, shared_cache, tmp_path / "ref", None)).validate()
    models = build_models(config)
    data = TrainingData(dataset_config_for(config), scale=scale_factor(config, models), seed=config.seed)
    trainer = Trainer(config, models, data, dist.setup("cpu"))
    trainer.prepare_caches(list(range(len(data.records))))
    fresh = trainer.train_step()["loss"]
    trainer = Trainer(config, build_models(config), data, dist.setup("cpu"))
    trainer.network.load_kohya_state_dict(tensors)
    by_hand = trainer.train_step()["loss"]
    assert math.isclose(by_hand, runs[0].losses[0]["loss"], rel_tol=1e-6) and abs(by_hand - fresh) > 1e-6 * fresh

    # dim_from_weights: rank and alpha from the file, whatever network_dim / network_alpha say
    from_dims = train(**starting(shapes_dir, shared_cache, tmp_path / "dims", own, dim_from_weights=True,
                                 network_dim=16, network_alpha=1))
    assert math.isclose(from_dims.losses[0]["loss"], runs[0].losses[0]["loss"], rel_tol=1e-6)
    assert (from_dims.network.rank, from_dims.network.alpha) == (4, 2.0)

    # another alpha: the file's scale is folded into lora_up, so the run starts from the file's LoRA
    with pytest.warns(UserWarning, match="rescaled so the run starts from the file's LoRA"):
        other_alpha = train(**starting(shapes_dir, shared_cache, tmp_path / "alpha", own, network_alpha=1))
    assert math.isclose(other_alpha.losses[0]["loss"], runs[0].losses[0]["loss"], rel_tol=1e-6)
    with safe_open(str(other_alpha.output_file), "pt") as f:
        assert float(f.get_tensor("lora_unet_clf_1.alpha")) == 1.0 and f.metadata()["ss_network_alpha"] == "1"


def test_dim_from_weights_trains_the_files_layers(trained, shapes_dir, shared_cache, tmp_path) -> None:
    _, tensors = trained
    attention = {k: v for k, v in tensors.items() if "_attention_attn_" in k}
    part = written(tmp_path / "attention.safetensors", attention)
    run = train(**starting(shapes_dir, shared_cache, tmp_path / "run", part, dim_from_weights=True))
    with safe_open(str(run.output_file), "pt") as f:
        assert set(f.keys()) == set(attention)
    with pytest.warns(UserWarning, match=r"43 of the network's 67 modules are not in the file and start as new"):
        train(**starting(shapes_dir, shared_cache, tmp_path / "all", part))


def test_files_that_do_not_fit_are_refused_before_training(trained, shapes_dir, shared_cache, tmp_path) -> None:
    first, tensors = trained
    own = str(first.output_file)

    def refused(weights, match, **changes):
        with pytest.raises(ConfigError, match=match) as err:
            train(**starting(shapes_dir, shared_cache, tmp_path / "out", weights, **changes))
        assert not (tmp_path / "out" / "run.json").exists()
        return str(err.value)

    message = refused(own, r"lora_unet_\w+\.lora_down\.weight has rank 4, the network 8", network_dim=8)
    assert own in message and "--dim_from_weights" in message
    message = refused(own, r"network_target='attention' leaves out", network_target="attention")
    assert own in message and "target=all_linear" in message
    wider = dict(tensors) | {"lora_unet_clf_1.lora_down.weight": torch.zeros(4, 48, 1, 1)}
    path = written(tmp_path / "other_model.safetensors", wider)
    assert path in refused(path, r"lora_unet_clf_1 has lora_down \[4, 48, 1, 1\]")
    stage_b = written(tmp_path / "stage_b.safetensors", tensors, {"cascade_lab.stage": "b"})
    assert stage_b in refused(stage_b, "is a Stage B LoRA .its header says so. but this run trains Stage C")
    uneven = dict(tensors) | {"lora_unet_clf_1.alpha": torch.tensor(1.0)}
    path = written(tmp_path / "uneven.safetensors", uneven)
    refused(path, "one rank and alpha per network", dim_from_weights=True)
    refused(str(tmp_path / "missing.safetensors"), "no such file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "empty.safetensors" in refused(str(tmp_path / "empty.safetensors"), "^network_weights: ")
    plain = written(tmp_path / "checkpoint.safetensors", {"clf.1.weight": torch.zeros(16, 32, 1, 1)})
    refused(plain, "look like plain model weights")
    with pytest.raises(ConfigError, match="dim_from_weights=true needs network_weights"):
        train(**starting(shapes_dir, shared_cache, tmp_path / "out", None, dim_from_weights=True))


def test_an_official_file_lands_on_the_split_attention_pairs(tmp_path) -> None:
    """Official train_c_lora files: per attention out_proj, then the packed in_proj [3c, r] with one down; the
    network's to_q/k/v pairs get that down and the up's row blocks, so the attached network computes what the
    merged file does."""
    import warnings

    from training_helpers import stage_c_inputs

    from cascade_lab.models.lora import apply_lora, official_lora_targets
    from cascade_lab.training.config import TrainConfig
    from cascade_lab.training.lora_start import network_from_file

    torch.manual_seed(5)
    model = StageCConfig.tiny().build().requires_grad_(False)
    with torch.no_grad():
        model.clf[1].weight.normal_(0, 0.05)
    entries = {}
    for i, param in enumerate(official_lora_targets(model)):
        n_out, n_in = model.get_parameter(param).shape
        entries |= {f"weights.{i}.lora_down": torch.randn(3, n_in) * 0.3,
                    f"weights.{i}.lora_up": torch.randn(n_out, 3) * 0.3}
    path = written(tmp_path / "lora.safetensors", entries)
    config = TrainConfig(mode="lora", network_weights=path, network_dim=3, network_alpha=1, network_target="attention",
                         train_data_dir=str(tmp_path)).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alpha 1, rank 3 as the file's scale: nothing to say
        network = network_from_file(model, config)
    assert len(network.targets) == 4 * len(official_lora_targets(model)) // 2  # to_q, to_k, to_v, out_proj
    inputs = stage_c_inputs()
    with torch.no_grad():
        plain = model(**inputs)
        network.attach(model)
        attached = model(**inputs)
        network.detach()
        handle = apply_lora(model, path)
        merged = model(**inputs)
        handle.remove()
    assert (attached - plain).abs().max() > 1e-2
    torch.testing.assert_close(attached, merged, rtol=1e-4, atol=1e-5)
