"""Previewer: a Stage C latent [B, 16, h, w] -> a rough RGB image [B, 3, 8h, 8w] in about [0, 1].

Used for live previews while Stage C samples (24x24 latent -> 192 px). Keys equal the official
``previewer.safetensors``: one ``blocks`` Sequential, indices 0..24.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class PreviewerConfig:
    """Constructor arguments of `Previewer`."""

    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3

    @classmethod
    def full(cls) -> PreviewerConfig:
        """The shipped previewer (3,983,755 values)."""
        return cls()

    @classmethod
    def tiny(cls) -> PreviewerConfig:
        """A small random-weight previewer for tests and the tiny variant."""
        return cls(c_hidden=32)

    def build(self) -> Previewer:
        return Previewer(**asdict(self))


def _stage(conv: nn.Module, c_out: int) -> list[nn.Module]:
    # conv -> GELU -> BatchNorm: the official order (the norm comes after the activation).
    return [conv, nn.GELU(), nn.BatchNorm2d(c_out)]


class Previewer(nn.Module):
    """Official ``Previewer``: 1x1 in, then three (conv 3x3, ConvTranspose 2x up) pairs, a conv 3x3, 1x1 out."""

    def __init__(self, *, c_in: int = 16, c_hidden: int = 512, c_out: int = 3):
        super().__init__()
        c1, c2, c3 = c_hidden, c_hidden // 2, c_hidden // 4
        self.blocks = nn.Sequential(
            *_stage(nn.Conv2d(c_in, c1, kernel_size=1), c1),  # 0-2
            *_stage(nn.Conv2d(c1, c1, kernel_size=3, padding=1), c1),  # 3-5
            *_stage(nn.ConvTranspose2d(c1, c2, kernel_size=2, stride=2), c2),  # 6-8: 2x
            *_stage(nn.Conv2d(c2, c2, kernel_size=3, padding=1), c2),  # 9-11
            *_stage(nn.ConvTranspose2d(c2, c3, kernel_size=2, stride=2), c3),  # 12-14: 4x
            *_stage(nn.Conv2d(c3, c3, kernel_size=3, padding=1), c3),  # 15-17
            *_stage(nn.ConvTranspose2d(c3, c3, kernel_size=2, stride=2), c3),  # 18-20: 8x
            *_stage(nn.Conv2d(c3, c3, kernel_size=3, padding=1), c3),  # 21-23
            nn.Conv2d(c3, c_out, kernel_size=1),  # 24
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, c_in, h, w) -> (B, c_out, 8h, 8w)
        return self.blocks(x)
