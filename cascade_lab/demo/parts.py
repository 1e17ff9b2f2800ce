"""The demo's other trainees on `cascade_lab.training`'s loop: Stage A, the semantic encoder, Stage B.

`training.loop.Trainer` owns one optimizer step (gradient accumulation, clipping, NaN guard, AdamW, LR
schedule) and the deterministic data plan; it was written for Stage C, whose inputs and loss live in its
`inputs(counter)` and `forward(model, batch)`. Each class here overrides only those two methods, so every
part trains through the same `train_step`:

* `StageATrainer`: Stage A as an autoencoder (MSE on random 32 px crops; the quantizer is unused, as at
  inference) whose BatchNorm-whitened bottleneck becomes Stage B's latent space. Half of each batch is decoded
  from a latent with Gaussian noise added (std up to `LATENT_NOISE`), so the decoder turns Stage B's small
  errors into clean flat colour instead of speckle (measured: clean decodes with latent noise of std 0.4,
  against 0.1 without).
* `EncoderTrainer`: the semantic encoder with the Previewer as its decoder (MSE against the image at 64 px),
  and the text tower regressing the encoder latent from the caption, so its features name what is drawn
  (a stand-in for CLIP's image-text pretraining; both stay frozen for Stage C and Stage B, as officially).
* `StageBTrainer`: the GDF ε-loss on Stage A latents, conditioned on the encoder latent (dropped to zeros
  10 % of the time, Stage B's unconditional input for CFG) and the pooled caption. Its loss weight is P2 with
  k = 1e-4 (≈ 1/SNR): the ε error becomes the x0 error, so the noisy steps, where the conditioning decides
  the picture, count as much as the clean ones (with the official P2 k = 1 a model this small learns to
  denoise and ignores the conditioning: measured, the same x0 error with the true, zeroed or shuffled one).
  With the plan's ``noise_shift`` 4 it also trains more at high noise, where only the conditioning shows the
  shape (see `train.Plan`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import P2LossWeight, train_t
from ..models.stage_a import StageA
from ..training import distributed as dist
from ..training.cache import LatentCache, TextCache
from ..training.config import TrainConfig
from ..training.data import TrainingData, derive_seed
from ..training.loop import Trainer
from ..training.models import TrainingModels, module_fingerprint
from .world import BACKGROUNDS, POSITIONS, SHAPE_COLOURS, SHAPES, parse_caption

Tensor = torch.Tensor
CROP = 32  # Stage A trains on crops: the world is flat colour and edges, and full images cost 16× more
EFFNET_DROPOUT = 0.1
FOREGROUND_WEIGHT = 10.0
LATENT_NOISE = 0.6  # Stage A's decoder learns to ignore latent noise of up to this std (the latent's is ~1)
STAGE_B_WEIGHT_K = 1e-4  # P2 k of Stage B's loss weight 1/(k + SNR): the x0 error
# what the encoder learns to tell apart, as ImageNet classes taught EfficientNet: scene field → names
LABELS = {"shape": SHAPES, "colour": SHAPE_COLOURS, "position": tuple(POSITIONS), "background": BACKGROUNDS}


class PartTrainer(Trainer):
    """`Trainer` with another model and loss; `run()` steps it to the configured number of steps."""

    def __init__(self, config: TrainConfig, model: nn.Module, data: TrainingData) -> None:
        # Trainer's `model` is the trained network; here it is whichever part this class trains
        super().__init__(config, TrainingModels(model, {}, source="demo"), data, dist.setup(config.device))

    def run(self, log: Callable[[dict[str, float]], Any] | None = None) -> list[dict[str, float]]:
        history = []
        while self.step < self.total_steps:
            history.append(self.train_step())
            if log is not None:
                log(history[-1])
        self.model.eval().requires_grad_(False)
        return history

    def images(self, counter: int) -> tuple[Tensor, list[str], list[random.Random]]:
        """This batch's images [B, 3, H, W] in [0, 1], captions as trained (dropout applied) and per-sample RNGs."""
        indices, positions, epoch = self.local_batch(counter)
        rngs = [self.data.sample_rng(counter, pos) for pos in positions]
        captions = [self.data.caption(i, epoch, rng) for i, rng in zip(indices, rngs, strict=True)]
        images = torch.stack([self.data.image(i) for i in indices])
        return images, captions, rngs

    @staticmethod
    def unweighted(raw: Tensor) -> tuple[Tensor, Tensor, Any]:
        return raw, torch.ones_like(raw), None


class StageATrainer(PartTrainer):
    def inputs(self, counter: int) -> dict[str, Tensor]:
        images, _, rngs = self.images(counter)
        size = images.shape[-1]
        crops, noise = [], []
        for pos, (image, rng) in enumerate(zip(images, rngs, strict=True)):
            x, y = rng.randrange(size - CROP + 1), rng.randrange(size - CROP + 1)
            crops.append(image[:, y:y + CROP, x:x + CROP])
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "latent-noise", counter, pos))
            std = LATENT_NOISE * rng.random() if pos % 2 else 0.0  # every other sample decodes a clean latent
            stage_a = cast(StageA, self.model)  # the latent of a crop: Stage A's channels at its downscale
            shape = (stage_a.c_latent, CROP // stage_a.downscale, CROP // stage_a.downscale)
            noise.append(std * torch.randn(shape, generator=generator))
        return {"images": torch.stack(crops), "noise": torch.stack(noise)}

    def forward(self, model: nn.Module, batch: dict[str, Tensor], t: Tensor | None = None,
                epsilon: Tensor | None = None) -> tuple[Tensor, Tensor, Any]:
        stage_a = cast(StageA, getattr(model, "module", model))  # DDP wraps it in a `module`
        images = batch["images"].to(self.device)
        latent = stage_a.encode(images)[0]  # (B, 4, 8, 8)
        recon = stage_a.decode(latent + batch["noise"].to(self.device).view_as(latent))  # (B, 3, 32, 32)
        return self.unweighted(((recon - images) ** 2).mean(dim=(1, 2, 3)))


class SemanticPretraining(nn.Module):
    """What `EncoderTrainer` trains: the encoder, the Previewer decoding it, the text tower and its probe."""

    def __init__(self, effnet: nn.Module, previewer: nn.Module, text_model: Any, c_latent: int = 16,
                 latent_hw: int = 4) -> None:
        super().__init__()
        self.effnet, self.previewer, self.text_model = effnet, previewer, text_model
        self.latent_shape = (c_latent, latent_hw, latent_hw)
        width, flat = text_model.config.projection_dim, c_latent * latent_hw * latent_hw
        self.probe = nn.Linear(width, flat)  # pooled text → latent (discarded after training)
        self.heads = nn.Linear(flat, sum(len(v) for v in LABELS.values()))  # latent → labels (discarded too)


class EncoderTrainer(PartTrainer):
    text_weight, label_weight = 0.5, 0.1

    def __init__(self, config: TrainConfig, model: SemanticPretraining, data: TrainingData,
                 text_encoder: Any) -> None:
        self.text_encoder = text_encoder
        super().__init__(config, model, data)

    def inputs(self, counter: int) -> dict[str, Tensor]:
        images, captions, _ = self.images(counter)
        input_ids, mask = self.text_encoder.tokenize(captions)  # (B, 1, T) each: one window per caption
        scenes = [parse_caption(c) for c in captions]
        labels = torch.tensor([[names.index(getattr(scene, field)) for field, names in LABELS.items()]
                               for scene in scenes])  # (B, 4)
        return {"images": images, "input_ids": input_ids[:, 0], "attention_mask": mask[:, 0], "labels": labels}

    def forward(self, model: nn.Module, batch: dict[str, Tensor], t: Tensor | None = None,
                epsilon: Tensor | None = None) -> tuple[Tensor, Tensor, Any]:
        model = cast(SemanticPretraining, getattr(model, "module", model))  # DDP wraps it in a `module`
        images = batch["images"].to(self.device)
        latent = model.effnet(images * 2 - 1)  # (B, 16, 8, 8)
        preview = model.previewer(latent)  # (B, 3, 64, 64)
        target = F.interpolate(images, size=preview.shape[-2:], mode="area")  # (B, 3, 64, 64)
        # the shape covers ~20 % of the pixels: weigh what differs from the background (the border's median) more,
        # else the cheapest fit is a plain background
        border = torch.cat([target[..., 0, :], target[..., -1, :], target[..., 0], target[..., -1]], dim=-1)
        background = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
        weight = 1 + FOREGROUND_WEIGHT * ((target - background).norm(dim=1, keepdim=True) > 0.15).float()
        recon = (weight * (preview - target) ** 2).mean(dim=(1, 2, 3))
        out = model.text_model(input_ids=batch["input_ids"].to(self.device),
                               attention_mask=batch["attention_mask"].to(self.device))
        predicted = model.probe(out.text_embeds).view(-1, *model.latent_shape)  # (B, 16, 8, 8)
        text = ((predicted - latent.detach()) ** 2).mean(dim=(1, 2, 3))
        logits = model.heads(latent.flatten(1)).split([len(v) for v in LABELS.values()], dim=1)
        labels = batch["labels"].to(self.device)
        supervised = sum(F.cross_entropy(lg, labels[:, k], reduction="none") for k, lg in enumerate(logits))
        return self.unweighted(recon + self.text_weight * text + self.label_weight * supervised)


class _StageAEncoder:
    """Stage A's encoder under the `encode_image` name `LatentCache` calls."""

    def __init__(self, stage_a: nn.Module) -> None:
        self.stage_a = stage_a

    def to(self, device: Any) -> _StageAEncoder:
        self.stage_a.to(device)
        return self

    def parameters(self) -> Any:  # where it is: a cache puts it back there after encoding
        return self.stage_a.parameters()

    def encode_image(self, img01: Tensor) -> Tensor:
        return self.stage_a.encode(img01)[0]  # type: ignore[operator,no-any-return]


class StageBTrainer(PartTrainer):
    def __init__(self, config: TrainConfig, stage_b: nn.Module, data: TrainingData, *, effnet: nn.Module,
                 stage_a: nn.Module, text_encoder: Any, cache_dir: Any = None) -> None:
        super().__init__(config, stage_b, data)
        self.weighting = P2LossWeight(k=STAGE_B_WEIGHT_K)
        dev = self.device
        # the three are frozen while Stage B trains: fingerprint them once, not on every cache lookup
        prints = {"effnet": module_fingerprint(effnet), "stage_a": "stage_a-" + module_fingerprint(stage_a),
                  "text": module_fingerprint(text_encoder)}
        self.effnet_latents = LatentCache(cache_dir, data, lambda: effnet, lambda: prints["effnet"], dev)
        self.stage_a_latents = LatentCache(cache_dir, data, lambda: _StageAEncoder(stage_a), lambda: prints["stage_a"],
                                           dev)
        self.pooled = TextCache(cache_dir, lambda: text_encoder, lambda: prints["text"], dev)

    def prepare_caches(self, indices: list[int]) -> None:
        self.effnet_latents.prepare(indices)
        self.stage_a_latents.prepare(indices)
        self.pooled.prepare({self.data.caption_text(i) for i in indices} | {""})

    def inputs(self, counter: int) -> dict[str, Tensor]:
        indices, positions, epoch = self.local_batch(counter)
        latents, effnet, captions, ts, eps = [], [], [], [], []
        for index, pos in zip(indices, positions, strict=True):
            rng = self.data.sample_rng(counter, pos)
            captions.append(self.data.caption(index, epoch, rng))
            latents.append(self.stage_a_latents.get(index))
            cond = self.effnet_latents.get(index)
            effnet.append(torch.zeros_like(cond) if rng.random() < EFFNET_DROPOUT else cond)
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "noise", counter, pos))
            ts.append(train_t(1, generator=generator))
            eps.append(torch.randn(latents[-1].shape, generator=generator))
        _, pooled = self.pooled.get(captions)
        return {"latents": torch.stack(latents), "effnet": torch.stack(effnet), "clip": pooled,
                "t": torch.cat(ts), "epsilon": torch.stack(eps)}

    def forward(self, model: nn.Module, batch: dict[str, Tensor], t: Tensor | None = None,
                epsilon: Tensor | None = None) -> tuple[Tensor, Tensor, Any]:
        d = self.diffused(batch, t, epsilon)
        return self.loss_terms(model(d.noised, d.noise_cond, batch["effnet"].to(self.device),
                                     batch["clip"].to(self.device)), d)


__all__ = ["EncoderTrainer", "PartTrainer", "SemanticPretraining", "StageATrainer", "StageBTrainer"]
