"""Noise sources: where a generation's random numbers come from, per stage (the official stream, ComfyUI's, recorded).

A `NoiseSource` hands the pipeline two things per stage (``"c"``, ``"b"``): the initial noise of a latent
shape (`initial`) and the per-step noise a sampler draws (`steps`: ``noise(like) -> Tensor``, optionally
with ``brownian`` for the SDE samplers). The pipeline asks in a fixed order, Stage C's initial noise, its
steps, then Stage B's, so a single stateful generator reproduces the official stream exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Noise = Callable[[Tensor], Tensor]


class NoiseSource:
    """The random numbers of one generation (subclass and override `initial` and `steps`)."""

    seed: int | None = None

    def initial(self, stage: str, shape: Sequence[int]) -> Tensor:
        """Standard-normal float32 noise [B, C, H, W] that starts `stage`'s sampling (CPU)."""
        raise NotImplementedError

    def steps(self, stage: str) -> Noise:
        """The per-step source the stage's sampler draws from."""
        raise NotImplementedError


def generator_noise(generator: torch.Generator) -> Noise:
    """A seeded noise source: randn like the given tensor, drawn from `generator` (on its device)."""

    def noise(like: Tensor) -> Tensor:
        z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
        return z.to(like.device)

    return noise


class OfficialNoise(NoiseSource):
    """The official notebooks' stream: ONE CPU generator seeded once, drawn in pipeline order for both stages."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._steps = generator_noise(self.generator)

    def initial(self, stage: str, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator)

    def steps(self, stage: str) -> Noise:
        return self._steps


class _SeededSteps:
    """ComfyUI's per-step noise on the CPU: a generator seeded seed + 1; `brownian` for the SDE samplers."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed + 1)

    def __call__(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def brownian(self, x: Tensor, sigma_min: Tensor | float, sigma_max: Tensor | float) -> Callable[..., Tensor]:
        return brownian_tree(x, sigma_min, sigma_max, self.seed)


class ComfyNoise(NoiseSource):
    """ComfyUI's seeding: each KSampler seeds the global CPU generator with its seed for the initial noise (one
    draw for the whole batch), draws per-step noise from a generator seeded seed + 1, and Brownian trees with
    the seed. ``seed_b`` is Stage B's KSampler seed (ComfyUI workflows give each sampler its own; default: seed).
    """

    def __init__(self, seed: int, seed_b: int | None = None) -> None:
        self.seed = int(seed)
        self.seeds = {"c": self.seed, "b": self.seed if seed_b is None else int(seed_b)}

    def initial(self, stage: str, shape: Sequence[int]) -> Tensor:
        generator = torch.Generator().manual_seed(self.seeds[stage])  # = torch.manual_seed(seed) + torch.randn
        return torch.randn(tuple(shape), generator=generator)

    def steps(self, stage: str) -> Noise:
        return _SeededSteps(self.seeds[stage])


class RecordedNoise(NoiseSource):
    """Given tensors: ``initial={"c": x, "b": x}`` and ``steps={"c": [z0, z1, ...]}``; a missing entry falls
    back to ``fallback`` (another source, e.g. `OfficialNoise(seed)`), else it is an error naming it."""

    def __init__(self, initial: Mapping[str, Tensor] | None = None, steps: Mapping[str, Iterable[Tensor]] | None = None,
                 fallback: NoiseSource | None = None) -> None:
        self._initial = dict(initial or {})
        self._steps = {k: list(v) for k, v in (steps or {}).items()}
        self.fallback = fallback
        self.seed = fallback.seed if fallback is not None else None

    def initial(self, stage: str, shape: Sequence[int]) -> Tensor:
        if stage in self._initial:
            z = self._initial[stage]
            if tuple(z.shape) != tuple(shape):
                raise ValueError(f"initial noise for stage {stage.upper()} has shape {tuple(z.shape)}, the latent is "
                                 f"{tuple(shape)}; pass noise of the latent's shape")
            return z.detach().float().cpu().clone()
        if self.fallback is None:
            raise ValueError(f"no initial noise given for stage {stage.upper()} and no fallback source; pass "
                             f"initial={{'{stage}': tensor}} or fallback=OfficialNoise(seed)")
        return self.fallback.initial(stage, shape)

    def steps(self, stage: str) -> Noise:
        if stage in self._steps:
            return replay_noise(self._steps[stage])
        if self.fallback is None:
            return torch.randn_like
        return self.fallback.steps(stage)


def replay_noise(tensors: Iterable[Tensor]) -> Noise:
    """A noise source handing out recorded tensors in order (shape-checked), for exact replays in tests."""
    it = iter(tensors)

    def noise(like: Tensor) -> Tensor:
        try:
            z = next(it)
        except StopIteration:
            raise RuntimeError("replay_noise ran out of recorded noise tensors") from None
        if z.shape != like.shape:
            raise ValueError(f"recorded noise has shape {tuple(z.shape)}, the sampler asked for {tuple(like.shape)}")
        return z.to(device=like.device, dtype=like.dtype)

    return noise


def brownian_tree(x: Tensor, sigma_min: Tensor | float, sigma_max: Tensor | float, seed: int) -> Callable[..., Tensor]:
    """ComfyUI's Brownian-tree noise: a torchsde BrownianTree on [σ_min, σ_max] (CPU, w0 = 0, entropy = seed);
    the noise of a step (σ, σ') is (W(σ') − W(σ)) / √|σ' − σ|. Needs torchsde (``pip install cascade-lab[comfyui]``)."""
    try:
        import torchsde
    except ImportError as exc:
        raise ImportError("the SDE samplers' Brownian-tree noise needs torchsde, as ComfyUI's does: "
                          "pip install 'cascade-lab[comfyui]' (or torchsde)") from exc
    t0 = torch.as_tensor(sigma_min).detach().float().cpu()
    t1 = torch.as_tensor(sigma_max).detach().float().cpu()
    t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
    tree = torchsde.BrownianTree(t0, torch.zeros_like(x).cpu(), t1, entropy=seed)

    def sample(sigma: Any, sigma_next: Any) -> Tensor:
        a = torch.as_tensor(sigma).detach().float().cpu()
        b = torch.as_tensor(sigma_next).detach().float().cpu()
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = tree(lo, hi).to(device=x.device, dtype=x.dtype) * sign
        return w / (torch.as_tensor(sigma_next) - torch.as_tensor(sigma)).abs().sqrt().to(x.device)

    return sample


__all__ = ["ComfyNoise", "NoiseSource", "OfficialNoise", "RecordedNoise", "brownian_tree", "generator_noise",
           "replay_noise"]
