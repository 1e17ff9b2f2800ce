"""Stage A: the Paella-style VQGAN that maps RGB <-> the 4-channel Stage B latent (4x downsampling).

Keys equal the official ``stage_a.safetensors`` (``in_block``, ``down_blocks``, ``vquantizer``, ``up_blocks``,
``out_block``). Stage B's latent space is the encoder's BatchNorm output divided by ``scale_factor`` (0.43):
``encode`` divides, ``decode`` multiplies first. The quantizer is used only by ``encode(x, quantize=True)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StageAConfig:
    """Constructor arguments of `StageA`."""

    levels: int = 2
    bottleneck_blocks: int = 12
    c_hidden: int = 384
    c_latent: int = 4
    codebook_size: int = 8192
    scale_factor: float = 0.43

    @classmethod
    def full(cls) -> StageAConfig:
        """The shipped Stage A (stage_a.safetensors, 18,406,903 values)."""
        return cls()

    @classmethod
    def tiny(cls) -> StageAConfig:
        """The ``stage_a_tiny`` reference fixture's architecture: same latent, 32 hidden channels."""
        return cls(bottleneck_blocks=2, c_hidden=32, codebook_size=64)

    def build(self) -> StageA:
        return StageA(**asdict(self))


class StageAResBlock(nn.Module):
    """Stage A's ResBlock: gated depthwise conv and MLP, each after a non-affine LayerNorm over channels.

    ``gammas`` [6] = (scale, shift, gate) for each half:
    x += dwconv(LN1(x)·(1+g0) + g1)·g2;  x += MLP(LN2(x)·(1+g3) + g4)·g5.
    """

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))  # zero: every block starts as the identity
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        # LayerNorm over channels: (B, C, H, W) -> (B, H, W, C) -> back
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dtype == torch.float32 and self._foldable():
            return self._forward_folded(x)
        g = self.gammas
        h = self._norm(x, self.norm1) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self._norm(x, self.norm2) * (1 + g[3]) + g[4]
        h = self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # MLP in (B, H, W, C)
        return x + h * g[5]

    def _foldable(self) -> bool:
        """The plain layers `_forward_folded` reads the weights of (no LoRA wrapper, hook or replaced module)."""
        layers: list[nn.Module] = [*self.depthwise, *self.channelwise]
        kinds = [nn.ReplicationPad2d, nn.Conv2d, nn.Linear, nn.GELU, nn.Linear]
        return [type(m) for m in layers] == kinds and not any(m._forward_hooks or m._forward_pre_hooks for m in layers)

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward (float32) with the scalar gammas folded into the conv and linear weights.

        dwconv(pad(a·h + b))·g = conv(pad(h); w·a·g, (bias + b·Σw)·g), replication padding commuting with
        the affine, and MLP(a·h + b)·g likewise (first weight ·a, bias + b·ΣW; last weight and bias ·g): the
        same numbers up to float32 rounding without four passes over the activations. Where x is
        channels_last (`StageA.decode` makes it so), both LayerNorms read and the residuals write NHWC
        without a copy; the MLP runs in blocks of `_MLP_ROWS` pixels, each row computed as in one pass.
        """
        g = self.gammas
        pad, conv = self.depthwise[0], self.depthwise[1]
        first, last = self.channelwise[0], self.channelwise[2]
        assert isinstance(conv, nn.Conv2d) and isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        C = x.shape[1]
        h = F.layer_norm(x.permute(0, 2, 3, 1), (C,), eps=self.norm1.eps).permute(0, 3, 1, 2)  # (B, C, H, W)
        weight = conv.weight * ((1 + g[0]) * g[2])
        bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(C)
        bias = (bias + g[1] * conv.weight.sum(dim=(1, 2, 3))) * g[2]
        x = F.conv2d(pad(h), weight, bias, groups=conv.groups).add_(x)
        B, _, H, W = x.shape
        x_rows = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view where x is channels_last
        h = F.layer_norm(x_rows, (C,), eps=self.norm2.eps)  # (BHW, C)
        w1, b1 = first.weight * (1 + g[3]), first.bias + g[4] * first.weight.sum(dim=1)
        w2, b2 = last.weight * g[5], last.bias * g[5]
        out = torch.empty_like(x_rows)
        for start in range(0, h.shape[0], _MLP_ROWS):  # the 4C-wide hidden rows stay in cache
            rows = slice(start, start + _MLP_ROWS)
            out[rows] = _linear_add(_linear_gelu(h[rows], w1, b1), w2, b2, x_rows[rows])
        return out.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last memory


_MLP_ROWS = 512  # the MLP of `StageAResBlock._forward_folded` in row blocks: 13-17 % faster than one pass


_onednn_fusion: bool | None = None  # None: not tried yet; False: unavailable on this build


def _onednn_ok(h: torch.Tensor, w: torch.Tensor) -> bool:
    return (_onednn_fusion is not False and h.device.type == "cpu" and h.dtype in (torch.float32, torch.bfloat16)
            and w.dtype == h.dtype and not torch.compiler.is_compiling())


def _linear_gelu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GELU(h @ w.T + b), bias and GELU fused into one oneDNN matmul on CPU where it can be."""
    global _onednn_fusion
    if _onednn_ok(h, w):
        try:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(h, w, b, "gelu", [], "none")
            _onednn_fusion = True
            return out
        except (AttributeError, RuntimeError, NotImplementedError):
            _onednn_fusion = False
    return F.gelu(F.linear(h, w, b))


def _linear_add(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x + (h @ w.T + b) for rows h [N, K] and x [N, C], the residual add fused into the oneDNN matmul on CPU."""
    global _onednn_fusion
    if _onednn_ok(h, w) and x.is_contiguous():
        try:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(h, x, w, b, "add")
            return out
        except (AttributeError, RuntimeError, NotImplementedError):
            _onednn_fusion = False
    return F.linear(h, w, b).add_(x)


class _StraightThrough(torch.autograd.Function):
    """Returns the codebook vectors q but passes the gradient to the encoder output x unchanged (VQ-VAE)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each row of x (N, C) -> (N,), torchtools' exact arithmetic.

    The squared distance is ‖c‖² + ‖x‖² − 2x·c computed with one addmm, so ties and near-ties resolve
    exactly as the official VectorQuantize does.
    """
    codebook_sqr = torch.sum(codebook**2, dim=1)  # (K,)
    x_sqr = torch.sum(x**2, dim=1, keepdim=True)  # (N, 1)
    dist = torch.addmm(codebook_sqr + x_sqr, x, codebook.t(), alpha=-2.0, beta=1.0)  # (N, K)
    return dist.min(dim=1).indices


class VectorQuantize(nn.Module):
    """torchtools' VectorQuantize: nearest-neighbour lookup in ``codebook`` (an Embedding [k, c])."""

    def __init__(self, embedding_size: int, k: int):
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)
        nn.init.uniform_(self.codebook.weight, -1.0 / k, 1.0 / k)

    def forward(
        self, x: torch.Tensor, dim: int = -1
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """x with its vectors along ``dim`` -> (quantized x, (vq_loss, commit_loss), indices x.shape minus dim)."""
        z_e = x.movedim(dim, -1)  # (..., C)
        flat = z_e.reshape(-1, z_e.shape[-1])  # (N, C)
        weight = self.codebook.weight
        indices = nearest_code(flat.detach(), weight.detach())  # (N,)
        z_q_grad = torch.index_select(weight, 0, indices)  # (N, C), carries the codebook gradient
        # Numerically the same MSE; vq_loss trains the codebook, commit_loss the encoder.
        vq_loss = (z_q_grad - flat.detach()).pow(2).mean()
        commit_loss = (flat - z_q_grad.detach()).pow(2).mean()
        z_q = _StraightThrough.apply(flat, z_q_grad.detach())
        z_q = z_q.view(z_e.shape).movedim(-1, dim)
        return z_q, (vq_loss, commit_loss), indices.view(z_e.shape[:-1])


class StageA(nn.Module):
    """Official ``StageA``: RGB [B, 3, H, W] in [0, 1] <-> latent [B, c_latent, H/4, W/4] (Paella VQGAN)."""

    def __init__(
        self,
        *,
        levels: int = 2,
        bottleneck_blocks: int = 12,
        c_hidden: int = 384,
        c_latent: int = 4,
        codebook_size: int = 8192,
        scale_factor: float = 0.43,
    ):
        super().__init__()
        self.c_latent = c_latent
        self.scale_factor = scale_factor
        self.codebook_size = codebook_size
        self.downscale = 2**levels  # image pixels per latent pixel (4 for every official Stage A)
        c_levels = [c_hidden // (2**i) for i in reversed(range(levels))]  # full: [192, 384]

        # Encoder: pixel-unshuffle 2x, then one stride-2 conv per extra level, then 1x1 -> c_latent + BN.
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down: list[nn.Module] = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(StageAResBlock(c_levels[i], c_levels[i] * 4))
        down.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False),
                nn.BatchNorm2d(c_latent),  # whitens the latent: mean 0, std 1
            )
        )
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantize(c_latent, k=codebook_size)

        # Decoder: 1x1 in, bottleneck ResBlocks at the deepest level, one ResBlock per shallower level.
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in range(levels):
            c = c_levels[levels - 1 - i]
            up.extend(StageAResBlock(c, c * 4) for _ in range(bottleneck_blocks if i == 0 else 1))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    def encode(
        self, x: torch.Tensor, quantize: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """RGB (B, 3, H, W) in [0, 1] -> (latent / scale_factor, None, None, None), latent (B, c, H/4, W/4).

        With ``quantize=True``: (codebook vectors / scale_factor, latent / scale_factor, indices (B, H/4, W/4),
        vq_loss + 0.25 * commit_loss).
        """
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(
                f"Stage A needs an even image size, got {tuple(x.shape[-2:])} (H, W); "
                "resize or crop to multiples of 4 (multiples of 128 for the full pipeline)"
            )
        x = self.in_block(x)  # (B, c0, H/2, W/2)
        x = self.down_blocks(x)  # (B, c_latent, H/4, W/4)
        if quantize:
            qe, (vq_loss, commit_loss), indices = self.vquantizer(x, dim=1)
            return qe / self.scale_factor, x / self.scale_factor, indices, vq_loss + commit_loss * 0.25
        return x / self.scale_factor, None, None, None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Stage B latent (B, c_latent, h, w) -> RGB (B, 3, 4h, 4w) in about [0, 1] (callers clamp)."""
        x = x * self.scale_factor
        if not torch.is_grad_enabled() and x.dtype == torch.float32:  # NHWC memory: the ResBlocks' folded
            # inference forward then copies nothing
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.up_blocks(x)  # (B, c0, 2h, 2w)
        return self.out_block(x).contiguous()  # (B, 3, 4h, 4w)

    def forward(self, x: torch.Tensor, quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reconstruct: (decode(encode(x, quantize)[0]), vq loss or None)."""
        qe, _, _, vq_loss = self.encode(x, quantize)
        return self.decode(qe), vq_loss
