"""A LoRA run that starts from a file: kohya's ``--network_weights`` (and ``--dim_from_weights``).

The file is read by the loader generation uses (`cascade_lab.models.lora`: kohya and cascade_lab
``lora_unet_*``, OneTrainer, ComfyUI, official ``weights.N``) and its modules are resolved to the model's
parameters by the same key tables and shape checks; each lands on the network's pair of that parameter (a packed
``in_proj`` LoRA on the three pairs ``to_q``, ``to_k``, ``to_v``: the same down, its up's row blocks). kohya
loads with ``load_state_dict(strict=False)``: keys that fit nothing are dropped silently, and the file's alpha
replaces the stored one while training keeps scaling by ``--network_alpha``. Here a module that fits no pair, a
rank other than the network's or a file for another model or stage is an error naming the file and the module,
before anything trains; a file alpha other than the network's is folded into ``lora_up`` (the network starts as
the file's LoRA, the saved alpha is the one trained with).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .lora_train import LoraDropout, LoraNetwork, LoraTarget, lora_targets


def read_network_weights(path: str, model: nn.Module) -> Any:
    """The file as `models.lora.LoraWeights`, refused (ConfigError) when unreadable or for the other stage."""
    from ..models.lora import LoraError, load_lora_file, model_stage

    try:
        lora = load_lora_file(path)
    except (LoraError, OSError, ValueError) as exc:
        raise ConfigError(f"network_weights: {exc}") from None
    have, want = model_stage(model), lora.stage
    if have is not None and want is not None and have != want:
        why = "its header says so" if lora.metadata.get("cascade_lab.stage") else "its layers say so"
        raise ConfigError(f"network_weights={path} is a Stage {want.upper()} LoRA ({why}) but this run trains "
                          f"Stage {have.upper()}: start from a Stage {have.upper()} LoRA, or train Stage "
                          f"{want.upper()} (stage='{want}', kohya command line: --stage {want})")
    return lora


Placed = tuple[Any, LoraTarget, torch.Tensor, torch.Tensor]  # file module, the pair's target, down, up


def _placed(lora: Any, model: nn.Module, path: str) -> list[Placed]:
    """Each file module on the training target (kohya name) of its parameter rows, with its down [r, in] and up
    [out, r] (a packed in_proj's on the three targets to_q, to_k, to_v: the same down, up's row blocks)."""
    from ..models.lora import LoraError

    try:
        patches = lora.patches(model)  # names resolved and shapes checked as for generation
    except LoraError as exc:
        raise ConfigError(f"network_weights: {exc}") from None
    where = {(f"{t.module}.{t.param}", t.rows): t for t in lora_targets(model, "all_linear")}
    placed: list[Placed] = []
    for patch in patches:
        m = patch.module
        down, up = m.down.flatten(1), m.up.flatten(1)
        rows = None if patch.rows is None else (patch.rows.start, patch.rows.stop)
        target = None if patch.branch else where.get((patch.param, rows))
        if target is not None:
            placed.append((m, target, down, up))
            continue
        c = up.shape[0] // 3
        thirds = [where.get((patch.param, (i * c, (i + 1) * c))) for i in range(3)]
        if rows is None and not patch.branch and all(t is not None for t in thirds):
            placed += [(m, t, down, up[i * c:(i + 1) * c]) for i, t in enumerate(thirds) if t is not None]
            continue
        raise ConfigError(f"network_weights={path}: {m.name} ({patch.param}, lora_down {list(m.down.shape)}) is on "
                          "a layer cascade_lab's LoRA training has no pair for (it trains Linear layers, 1x1 convs "
                          "and the attention projections); start from a LoRA without it")
    return placed


def _key(m: Any) -> str:
    return m.name if m.name.startswith("weights.") else f"{m.name}.lora_down.weight"


def network_from_file(model: nn.Module, config: TrainConfig, *, dropout: LoraDropout | None = None,
                      seed: int = 0, warn: bool = True) -> LoraNetwork:
    """The run's LoRA network on `model` (not attached) set from ``config.network_weights``: kohya's network of
    ``network_dim`` / ``network_alpha`` / ``network_target`` with the file loaded into it, or with
    ``dim_from_weights`` one of the file's rank, alpha and layers."""
    path = str(config.network_weights)
    lora = read_network_weights(path, model)
    placed = _placed(lora, model, path)
    if not placed:
        raise ConfigError(f"network_weights={path} holds no Stage {config.stage.upper()} LoRA modules (only "
                          "text-encoder or token-embedding tensors); start from a LoRA of the trained stage")
    notes = []
    if config.dim_from_weights:  # kohya create_network_from_weights: the file's modules, ranks and alphas
        first = placed[0][0]
        for m, _, _, _ in placed:
            if m.rank != first.rank or m.scale != first.scale:
                raise ConfigError(f"network_weights={path}: {_key(m)} has rank {m.rank} and alpha "
                                  f"{m.alpha or m.rank:g}, {_key(first)} rank {first.rank} and alpha "
                                  f"{first.alpha or first.rank:g}; cascade_lab trains one rank and alpha per "
                                  "network: resize the LoRA to one rank first, or train a new one")
        targets = list({t.name: t for _, t, _, _ in placed}.values())
        order = {t.name: i for i, t in enumerate(lora_targets(model, "all_linear"))}
        network = LoraNetwork(sorted(targets, key=lambda t: order[t.name]), first.rank, first.alpha or first.rank,
                              seed=seed, dropout=dropout)
    else:
        network = LoraNetwork.for_model(model, rank=config.network_dim, alpha=config.network_alpha,
                                        target=config.network_target, seed=seed, dropout=dropout)
        for m, t, _, _ in placed:
            if t.name not in network.targets:
                raise ConfigError(f"network_weights={path}: {_key(m)} trains {t.name}, which network_target="
                                  f"'{config.network_target}' leaves out (kohya drops it silently); use "
                                  "network_args target=all_linear (TOML: network_target = \"all_linear\") or "
                                  "--dim_from_weights")
            if m.rank != network.rank:
                raise ConfigError(f"network_weights={path}: {_key(m)} has rank {m.rank}, the network {network.rank} "
                                  f"(network_dim); give --network_dim {m.rank} (and its alpha), or --dim_from_weights "
                                  "to take both from the file")
    rescaled = set()
    with torch.no_grad():
        for m, t, down, up in placed:
            pair = network.pair(t.name)
            factor = m.scale / network.scale  # the file's scale folded into up: the same delta at the start
            if factor != 1:
                rescaled.add(m.name)
            pair.lora_down.copy_(down)
            pair.lora_up.copy_(up.float() * factor if factor != 1 else up)
    loaded = {t.name for _, t, _, _ in placed}
    fresh = [name for name in network.targets if name not in loaded]
    if fresh:
        notes.append(f"{len(fresh)} of the network's {len(network.targets)} modules are not in the file and start "
                     f"as new ones (lora_up zero), e.g. {fresh[0]}")
    if rescaled:
        scales = sorted({f"{m.alpha or m.rank:g}/{m.rank}" for m, _, _, _ in placed if m.name in rescaled})
        notes.append(f"{len(rescaled)} modules have alpha/rank {', '.join(scales)}, the network {network.alpha:g}/"
                     f"{network.rank}: their lora_up is rescaled so the run starts from the file's LoRA (kohya keeps "
                     "the tensors and trains at --network_alpha, a LoRA of another strength, then saves the file's "
                     "alpha)")
    if lora.text_encoder_modules or lora.embeddings:
        zero = all(not m.up.any() for m in lora.text_encoder_modules)
        what = (f"{len(lora.text_encoder_modules)} text-encoder modules"
                + (" (all zero, as kohya leaves them with cached text)" if zero and lora.text_encoder_modules else "")
                + (f", {len(lora.embeddings)} token-embedding tensors" if lora.embeddings else ""))
        notes.append(f"{what} are not trained here and not in the saved LoRA")
    if warn:
        for note in notes:
            warnings.warn(f"network_weights={path}: {note}", stacklevel=2)
    return network


__all__ = ["network_from_file", "read_network_weights"]
