"""The training loop: GDF noising, ε target, P2 or adaptive weights, accumulation, clipping, NaN guard.

Stage C (the default) or Stage B (``stage="b"``, the official train_b recipe: `training.stage_b`).

One optimizer step = `gradient_accumulation_steps` global batches. Sample j of global batch k gets its
t and ε from a seed derived from (seed, k, j), and its caption dropout / flip from another; so the data,
the noise and therefore the losses do not depend on how many processes share the batch, and a resumed
run continues exactly where the checkpoint stopped (spec/training.md §1.3, spec/stable-cascade.md §6).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..diffusion import AdaptiveLossWeight, P2LossWeight, diffuse, train_t
from ..pipeline import release_freed_memory
from ..weights.memory import available_memory
from . import distributed as dist
from .cache import LatentCache, TextCache, TextLayout, check_cache_options, encode_images, encode_text
from .config import FULL_BF16_FSDP, ConfigError, TrainConfig, checkpointing_mode
from .data import TrainingData, derive_seed
from .models import TrainingModels
from .optim import clip_grad_norm, optimizer_step
from .stage_b import StageBCache, batch_factor, effnet_size, encode_effnet, encode_stage_a, keeps_effnet, pyramid_noise

Tensor = torch.Tensor


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def set_dropout(model: nn.Module, enabled: bool) -> None:
    """Training mode for the blocks (gradient checkpointing needs it) with dropout on or off."""
    model.train()
    if not enabled:
        for m in model.modules():
            if isinstance(m, nn.Dropout) or hasattr(m, "in_proj_weight"):  # attention dropout is gated on .training
                m.eval()


class Trainer:
    """Holds everything of one run between steps; `run.py` drives it."""

    def __init__(self, config: TrainConfig, models: TrainingModels, data: TrainingData, info: dist.DistInfo) -> None:
        self.config, self.models, self.data, self.info = config, models, data, info
        self.device = info.device
        self.stage = config.stage
        self.model = models.model  # the trained network: Stage C, or Stage B
        self.network: Any = None
        check_cache_options(config, data)
        self._setup_model()
        self.weighting: Any = AdaptiveLossWeight() if config.adaptive_loss_weight else P2LossWeight()
        cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "cache"
        self.latents: Any = None
        if config.cache_latents and self.stage == "b":
            self.latents = StageBCache(cache_dir, data, lambda: models.get("effnet"), lambda: models.get("stage_a"),
                                       lambda: (models.fingerprint("effnet"), models.fingerprint("stage_a")),
                                       self.device)
        elif config.cache_latents:
            self.latents = LatentCache(cache_dir, data, lambda: models.get("effnet"),
                                       lambda: models.fingerprint("effnet"), self.device)
        self.text_layout = TextLayout.of(config)  # how long captions are encoded
        self.texts = TextCache(cache_dir, lambda: models.get("text_encoder"),
                               lambda: models.fingerprint("text_encoder"), self.device,
                               self.text_layout) if config.cache_text_encoder_outputs else None
        self.step = 0  # optimizer steps done
        self.counter = 0  # global batches consumed
        self.nan_streak = 0
        self.total_steps = self._total_steps()
        # on the CPU, whether each micro-step hands the forward's freed temporaries back to the OS before backward
        # allocates the gradients (~85 MiB of the mid-size full fine-tune's 3.1 GiB peak; run.py turns it off
        # where it keeps glibc's heap steady instead)
        self.trim_before_backward = self.device.type == "cpu"

    # -- set-up ----------------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        from .lora_train import LoraDropout, LoraNetwork
        from .optim import build_optimizer
        from .schedules import build_scheduler

        config, model = self.config, self.model
        rounding = None
        if config.full_bf16:  # kohya --full_bf16: the trained weights (and so their gradients) in bf16
            from .bf16_weights import Rounding

            if self.sharded:
                raise ConfigError(FULL_BF16_FSDP)
            rounding = Rounding(config.bf16_rounding, derive_seed(config.seed, "bf16_rounding"), self.device)
        trained_dtype = torch.bfloat16 if config.full_bf16 else torch.float32
        if config.mode == "full":
            model.to(self.device, trained_dtype).requires_grad_(True)  # fp32 master weights unless full_bf16
            params = list(model.parameters())
        else:
            model.to(self.device).requires_grad_(False)
            lora_dropout = LoraDropout(config.network_dropout or 0.0, config.rank_dropout or 0.0,
                                       config.module_dropout or 0.0)
            if config.network_weights:  # kohya --network_weights (--dim_from_weights): checked before training
                from .lora_start import network_from_file

                self.network = network_from_file(model, config, dropout=lora_dropout, seed=config.seed,
                                                 warn=self.info.is_main)
            else:
                self.network = LoraNetwork.for_model(model, rank=config.network_dim, alpha=config.network_alpha,
                                                     target=config.network_target, seed=config.seed,
                                                     dropout=lora_dropout)
            self.network.to(dtype=trained_dtype)  # kohya: network.to(weight_dtype) with --full_bf16
            self.network.attach(model)
            params = list(self.network.parameters())
        if config.gradient_checkpointing:
            selective = checkpointing_mode(config, self.device.type) == "selective"
            keep_bytes = None  # "selective" asked for: every product output kept
            if selective and config.gradient_checkpointing_mode == "auto":  # the CPU's default: within a quarter
                # of the memory available now, shared by the training processes on this machine (torchrun's count)
                keep_bytes = available_memory(self.device) // (4 * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
            model.enable_gradient_checkpointing(True, keep_products=selective,  # type: ignore[operator]
                                                keep_bytes=keep_bytes)
        dropout = config.dropout if config.dropout is not None else config.mode == "full"
        set_dropout(model, dropout)
        if self.sharded:  # FSDP2: the parameters become DTensor shards, so collect them after sharding
            from .fsdp import shard

            shard(model, self.device, self.info.world_size, config.mixed_precision)
            params, self.ddp_model = list(model.parameters()), model
        else:
            # module dropout leaves a skipped pair without a gradient in that step, which DDP must be told
            unused = self.network is not None and bool(config.module_dropout)
            self.ddp_model = dist.wrap(model, self.info, find_unused_parameters=unused)
        self.params = params
        self.optimizer = build_optimizer(config.optimizer_type, params, config.learning_rate, config.optimizer_args,
                                         rounding)
        self.scheduler = build_scheduler(self.optimizer, config.lr_scheduler, config.lr_warmup_steps,
                                         self._total_steps(), num_cycles=config.lr_scheduler_num_cycles,
                                         power=config.lr_scheduler_power, scheduler_type=config.lr_scheduler_type,
                                         scheduler_args=config.lr_scheduler_args)

    @property
    def sharded(self) -> bool:
        """FSDP: the trained stage's parameters, gradients and optimizer states are split over the processes."""
        return self.info.strategy == "fsdp"

    def _total_steps(self) -> int:
        c = self.config
        if c.max_train_epochs:
            return math.ceil(c.max_train_epochs * self.data.batches_per_epoch() / c.gradient_accumulation_steps)
        return c.max_train_steps

    def prepare_caches(self, indices: list[int]) -> None:
        """Fill the caches (the main process encodes, the others read what it wrote)."""
        captions = {self.data.caption_text(i) for i in indices} | {""}
        for rank_turn in (True, False):
            if self.info.is_main == rank_turn:
                if self.latents is not None:
                    self.latents.prepare(indices)
                if self.texts is not None:
                    self.texts.prepare(captions)
            dist.barrier(self.info)

    # -- one batch -------------------------------------------------------------------------------------
    def local_batch(self, counter: int) -> tuple[list[int], list[int], int]:
        """(record indices, global positions) of this process's slice of global batch `counter`, and its epoch."""
        epoch, batch = self.data.batch(counter)
        per_rank = len(batch) // self.info.world_size
        start = self.info.rank * per_rank
        return batch[start:start + per_rank], list(range(start, start + per_rank)), epoch

    def inputs(self, counter: int) -> dict[str, Tensor]:
        """Latents (the targets' x0), conditions, t and ε of this process's slice of global batch `counter`."""
        indices, positions, epoch = self.local_batch(counter)
        captions, flips, rngs = [], [], []
        step = counter // self.config.gradient_accumulation_steps  # the optimizer step this batch trains in
        for index, pos in zip(indices, positions, strict=True):
            rng = self.data.sample_rng(counter, pos)
            captions.append(self.data.caption(index, epoch, rng, step, self.total_steps))
            flips.append(self.data.flip(index, rng))
            rngs.append(rng)
        batch = self._images(indices, flips, rngs, counter, positions)
        batch["clip_text"], batch["clip_text_pooled"] = self._text(captions)
        latents = batch["latents"]
        ts, eps = [], []
        for pos in positions:  # per-sample noise: independent of the batch split
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "noise", counter, pos))
            ts.append(train_t(1, generator=generator))
            eps.append(self._noise(latents.shape[1:], generator))
        batch["t"], batch["epsilon"] = torch.cat(ts), torch.stack(eps)
        return batch

    def _noise(self, shape: Any, generator: torch.Generator) -> Tensor:
        """ε of one sample: N(0, 1), made pyramid noise for Stage B (official train_b)."""
        epsilon = torch.randn(shape, generator=generator)
        return pyramid_noise(epsilon, generator) if self.stage == "b" else epsilon

    def _text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        if self.texts is not None:
            return self.texts.get(captions)  # type: ignore[no-any-return]
        return encode_text(self.models.get("text_encoder"), captions, self.device, self.text_layout)

    def _images(self, indices: list[int], flips: list[bool], rngs: list[Any], counter: int | None,
                positions: list[int]) -> dict[str, Tensor]:
        """The image side of a one-bucket batch: Stage C's EfficientNet latents, or Stage B's target and condition
        (`counter` None: validation)."""
        if self.stage == "b":
            return self._stage_b_images(indices, flips, rngs, counter, positions)
        if self.latents is not None:
            return {"latents": torch.stack([self.latents.get(i, f) for i, f in zip(indices, flips, strict=True)])}
        images = torch.stack([self.data.image(i, flip=f, rng=r) for i, f, r in zip(indices, flips, rngs,
                                                                                    strict=True)])
        return {"latents": encode_images(self.models.get("effnet"), images, self.device)}

    def _stage_b_images(self, indices: list[int], flips: list[bool], rngs: list[Any], counter: int | None,
                        positions: list[int]) -> dict[str, Tensor]:
        """Stage A latents (target) and EfficientNet latents (condition) of a one-bucket batch: at the batch's
        effnet factor with the 10 % dropout (training), or of the whole image (`counter` None: validation)."""
        bucket = self.data.records[indices[0]].bucket
        seed = self.config.seed
        size = effnet_size(bucket, 1.0 if counter is None else batch_factor(seed, counter))
        keep = [counter is None or keeps_effnet(seed, counter, pos) for pos in positions]
        if self.latents is not None:
            targets = torch.stack([self.latents.target(i, f) for i, f in zip(indices, flips, strict=True)])
            effnets = [self.latents.effnet(i, size, f) for i, f in zip(indices, flips, strict=True)]
        else:
            images = torch.stack([self.data.image(i, flip=f, rng=r) for i, f, r in zip(indices, flips, rngs,
                                                                                        strict=True)])
            targets = encode_stage_a(self.models.get("stage_a"), images, self.device)
            kept = [j for j, k in enumerate(keep) if k]
            encoded: Iterator[Tensor] = iter(encode_effnet(self.models.get("effnet"), images[kept], size, self.device)
                                             if kept else [])
            effnets = [next(encoded) if k else None for k in keep]
        stride = self.models.downscale  # EfficientNet's (32; the demo's encoder 16)
        shape = (self.model.effnet_mapper[0].in_channels, size[0] // stride, size[1] // stride)  # type: ignore
        effnet = torch.stack([e if k and e is not None else torch.zeros(shape)
                              for e, k in zip(effnets, keep, strict=True)])
        return {"latents": targets, "effnet": effnet}

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16")

    def _keep_weight_casts(self) -> Any:
        """Around a micro-step's forward and backward: autocast's bf16 weight copies made in the forward are kept
        for gradient checkpointing's recomputation in the backward (CPU only).

        autocast caches its casts of the weights until its outermost region ends: the forward's region, so the
        recomputed blocks cast every weight again (~0.09 s of a 2.4 s step of the mid-size model). An outer region
        that leaves autocast off keeps backward itself uncast while the cache lives through it. The copies then
        stay until the backward ends, instead of one block's at a time: on a GPU, where checkpointing is there to
        save memory, they are made twice as before.
        """
        if not (self.device.type == "cpu" and self.config.gradient_checkpointing
                and self.config.mixed_precision == "bf16"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def diffused(self, batch: dict[str, Tensor], t: Tensor | None = None, epsilon: Tensor | None = None) -> Any:
        """The batch's latents noised at its t and ε (or the given ones), with this run's loss weights."""
        return diffuse(batch["latents"].to(self.device), t=batch["t"] if t is None else t,
                       epsilon=(batch["epsilon"] if epsilon is None else epsilon).to(self.device),
                       shift=self.config.noise_shift, loss_weight=self.weighting)

    def loss_terms(self, pred: Tensor, d: Any) -> tuple[Tensor, Tensor, Any]:
        """(raw per-sample MSE [B], loss weights [B], Diffused) of a prediction against the GDF target."""
        raw = ((pred.float() - d.target.float()) ** 2).mean(dim=(1, 2, 3))  # [B]
        return raw, d.loss_weight.to(self.device).float(), d

    def forward(self, model: nn.Module, batch: dict[str, Tensor], t: Tensor | None = None,
                epsilon: Tensor | None = None) -> tuple[Tensor, Tensor, Any]:
        """(raw per-sample MSE [B], loss weights [B], Diffused) of one forward pass."""
        dev = self.device
        d = self.diffused(batch, t, epsilon)
        n = d.noised.size(0)
        with self._autocast():
            if self.stage == "b":  # official train_b: generator(noised, noise_cond, effnet=..., clip=pooled text)
                pred = model(d.noised, d.noise_cond, batch["effnet"].to(dev), batch["clip_text_pooled"].to(dev))
            else:
                clip_img = torch.zeros(n, 1, self.model.clip_img_mapper.in_features, device=dev)  # type: ignore
                pred = model(d.noised, d.noise_cond, batch["clip_text"].to(dev), batch["clip_text_pooled"].to(dev),
                             clip_img)
        return self.loss_terms(pred, d)

    # -- one optimizer step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Accumulate, clip, step; a non-finite loss or gradient skips the update (and counts toward a stop)."""
        accum = self.config.gradient_accumulation_steps
        finite, loss_sum, raw_sum = True, 0.0, 0.0
        for micro in range(accum):
            batch = self.inputs(self.counter)
            self.counter += 1
            with self._keep_weight_casts():
                raw, weight, d = self.forward(self.ddp_model, batch)
                loss = (raw * weight).mean()
                if self.trim_before_backward:
                    release_freed_memory()
                sync = contextlib.nullcontext()
                if self.info.strategy == "ddp" and micro < accum - 1:
                    sync = self.ddp_model.no_sync()  # type: ignore[operator]
                with sync:
                    (loss / accum).backward()
            stats = dist.mean(self.info, torch.stack([loss.detach(), raw.detach().mean()]))
            if not torch.isfinite(stats).all():
                finite = False
                continue
            loss_sum, raw_sum = loss_sum + float(stats[0]), raw_sum + float(stats[1])
            if isinstance(self.weighting, AdaptiveLossWeight):  # every rank sees the whole global batch
                self.weighting.update_buckets(dist.gather(self.info, d.logsnr.detach().float()),
                                              dist.gather(self.info, raw.detach()))
        grad_norm = float("nan")
        if finite:
            max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
            norm = clip_grad_norm(self.optimizer, self.params, max_norm)
            grad_norm = float(norm.full_tensor() if self.sharded else norm)  # type: ignore[attr-defined]
            finite = math.isfinite(grad_norm)
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"] or 0.0)
        d = group.get("d")  # D-Adaptation / Prodigy: the step size they found; this step's update uses it
        if finite:
            optimizer_step(self.optimizer)
            self.scheduler.step()
            self.nan_streak = 0
        else:
            self.nan_streak += 1
            if self.info.is_main:
                warnings.warn(f"step {self.step + 1}: non-finite loss or gradient, update skipped "
                              f"({self.nan_streak} in a row; the run stops at {self.config.max_nan_steps})",
                              RuntimeWarning, stacklevel=2)
        self.optimizer.zero_grad(set_to_none=True)
        norms: dict[str, Any] = {}
        if d is not None and finite:  # kohya's lr/d*lr, of the d and lr this step used (kohya logs the next step's)
            norms["d_lr"] = float(d) * lr
        if self.network is not None and self.config.scale_weight_norms:  # kohya: after every step, with its figures
            keys, mean, top = self.network.apply_max_norm(self.config.scale_weight_norms)
            norms.update(keys_scaled=keys, average_key_norm=mean, max_key_norm=top)
        self.step += 1
        if self.step == 1:
            self._report_checkpoint_budget()
        if self.nan_streak >= self.config.max_nan_steps:
            raise NonFiniteLoss(f"{self.nan_streak} steps in a row had a non-finite loss or gradient (last at step "
                                f"{self.step}); the run stopped without saving, the last good checkpoint is kept. "
                                "Lower the learning rate, keep max_grad_norm > 0, or use mixed_precision='no'.")
        return {"step": self.step, "loss": loss_sum / accum if finite else float("nan"),
                "raw_loss": raw_sum / accum if finite else float("nan"), "lr": lr, "grad_norm": grad_norm,
                "skipped": not finite, "time": time.time(), **norms}

    # -- validation ------------------------------------------------------------------------------------
    def _report_checkpoint_budget(self) -> None:
        """After the first step: say so when "auto" selective checkpointing could not keep every product output."""
        budget = getattr(self.model, "checkpoint_budget", None)
        if budget is None or not budget.recomputed:  # recomputed only past a limit
            return
        mib = 2**20
        warnings.warn(f"selective gradient checkpointing keeps {budget.kept / mib:.0f} MiB of the blocks' product "
                      f"outputs, within its limit here ({budget.limit / mib:.0f} MiB: a quarter of the memory "
                      f"available at the start, shared by this machine's training processes); the other "
                      f"{budget.recomputed / mib:.0f} MiB are recomputed in the backward as with full checkpointing. "
                      "gradient_checkpointing_mode='selective' keeps them all, 'full' none", RuntimeWarning,
                      stacklevel=3)

    def val_indices(self) -> list[int]:
        return list(range(min(self.config.val_items, len(self.data.records))))

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Raw MSE at fixed t with fixed noise on the first `val_items` images (real captions, eval mode)."""
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        per_t: dict[float, list[float]] = {t: [] for t in self.config.val_timesteps}
        try:
            groups: dict[tuple[int, int], list[int]] = {}
            for i in self.val_indices():
                groups.setdefault(self.data.records[i].bucket, []).append(i)
            for indices in groups.values():
                captions = [self.data.caption_text(i) for i in indices]
                batch = self._images(indices, [False] * len(indices), [None] * len(indices), None,
                                     list(range(len(indices))))
                batch["clip_text"], batch["clip_text_pooled"] = self._text(captions)
                latents = batch["latents"]
                for k, t in enumerate(self.config.val_timesteps):
                    eps = torch.stack([self._noise(latents.shape[1:], torch.Generator().manual_seed(
                        derive_seed(self.config.val_seed, "val", i, k))) for i in indices])
                    raw, _, _ = self.forward(model, batch, t=torch.full((len(indices),), float(t)), epsilon=eps)
                    per_t[t].extend(raw.cpu().tolist())
        finally:
            for module, mode in modes:
                module.training = mode
        means = {f"{t:g}": sum(v) / len(v) for t, v in per_t.items()}
        return {"step": self.step, "val_loss": sum(means.values()) / len(means), "per_t": means}

    # -- state -----------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Tensor]:
        """The trained tensors in fp32 (LoRA pairs by kohya name, or the stage's official keys)."""
        if self.network is not None:
            return dict(self.network.kohya_state_dict(torch.float32))
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}

    def load_trainable_state(self, tensors: dict[str, Tensor]) -> None:
        if self.network is not None:
            self.network.load_kohya_state_dict(tensors)
        else:
            self.model.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=True)

    def rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


__all__ = ["NonFiniteLoss", "Trainer", "set_dropout"]
