"""EfficientNetV2-S encoder: RGB image -> Stage C latent [B, 16, H/32, W/32].

The backbone is torchvision's ``efficientnet_v2_s().features`` (Tan & Le 2021, "EfficientNetV2"), written
here with torchvision's module layout so that ``state_dict()`` keys equal the official
``effnet_encoder.safetensors`` (``backbone.0.0.weight``, ``backbone.1.0.block.0.0.weight``, ...).
Nothing here downloads weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BN_EPS = 1e-3  # torchvision uses eps 1e-3 for every EfficientNetV2 BatchNorm
_STOCHASTIC_DEPTH_PROB = 0.2  # torchvision's efficientnet_v2_s default

# (block, expand_ratio, kernel, stride, c_in, c_out, num_layers): the EfficientNetV2-S table.
_V2_S_STAGES = (
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mb", 4, 3, 2, 64, 128, 6),
    ("mb", 6, 3, 1, 128, 160, 9),
    ("mb", 6, 3, 2, 160, 256, 15),
)
_C_STEM = 24
_C_FEATURES = 1280


def _conv_bn(
    c_in: int, c_out: int, kernel_size: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm [-> SiLU]; torchvision's Conv2dNormActivation keys ``0``, ``1``."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=_BN_EPS),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class StochasticDepth(nn.Module):
    """Drop the whole residual branch per sample with probability p (Huang et al. 2016); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(survival)
        return x * keep.div_(survival) if survival > 0.0 else x * keep


class SqueezeExcitation(nn.Module):
    """Channel gating x * sigmoid(fc2(silu(fc1(avgpool(x))))) (Hu et al. 2018), torchvision key names."""

    def __init__(self, c: int, c_squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)  # (B, c, 1, 1)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return scale * x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, squeeze-excitation, 1x1 project (MobileNetV2)."""

    def __init__(self, c_in: int, c_out: int, expand_ratio: int, kernel: int, stride: int, sd_prob: float):
        super().__init__()
        c_mid = c_in * expand_ratio
        layers: list[nn.Module] = []
        if c_mid != c_in:
            layers.append(_conv_bn(c_in, c_mid, 1))
        layers += [
            _conv_bn(c_mid, c_mid, kernel, stride, groups=c_mid),
            SqueezeExcitation(c_mid, max(1, c_in // 4)),
            _conv_bn(c_mid, c_out, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        return x + self.stochastic_depth(h) if self.use_res_connect else h


class FusedMBConv(nn.Module):
    """MBConv with the expand and depthwise convs fused into one kxk conv (EfficientNetV2's early stages)."""

    def __init__(self, c_in: int, c_out: int, expand_ratio: int, kernel: int, stride: int, sd_prob: float):
        super().__init__()
        c_mid = c_in * expand_ratio
        if c_mid != c_in:
            layers = [_conv_bn(c_in, c_mid, kernel, stride), _conv_bn(c_mid, c_out, 1, act=False)]
        else:
            layers = [_conv_bn(c_in, c_out, kernel, stride)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        return x + self.stochastic_depth(h) if self.use_res_connect else h


def _init_like_torchvision(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def efficientnet_v2_s_features(in_channels: int = 3) -> nn.Sequential:
    """torchvision ``efficientnet_v2_s().features``, random init: [B, c, H, W] -> [B, 1280, H/32, W/32].

    Keys: ``0`` stem conv-bn-silu (stride 2), ``1``..``6`` the MBConv stages, ``7`` the 1x1 head conv to 1280.
    Stochastic depth grows linearly from 0 to 0.2 over the 40 blocks and is active only in training mode.
    """
    total_blocks = sum(stage[-1] for stage in _V2_S_STAGES)
    features: list[nn.Module] = [_conv_bn(in_channels, _C_STEM, 3, stride=2)]
    block_id = 0
    for kind, expand, kernel, stride, c_in, c_out, num_layers in _V2_S_STAGES:
        block_cls = FusedMBConv if kind == "fused" else MBConv
        stage: list[nn.Module] = []
        for i in range(num_layers):
            sd_prob = _STOCHASTIC_DEPTH_PROB * block_id / total_blocks
            # Only the first block of a stage changes width and stride.
            first = i == 0
            stage.append(block_cls(c_in if first else c_out, c_out, expand, kernel, stride if first else 1, sd_prob))
            block_id += 1
        features.append(nn.Sequential(*stage))
    features.append(_conv_bn(_V2_S_STAGES[-1][5], _C_FEATURES, 1))
    backbone = nn.Sequential(*features)
    _init_like_torchvision(backbone)
    return backbone


def imagenet_normalize(img01: torch.Tensor) -> torch.Tensor:
    """(img - mean) / std with ImageNet statistics, for RGB [B, 3, H, W] in [0, 1] (torchvision Normalize)."""
    # The statistics are applied in at least float32, so a bf16 image is rounded only once.
    dtype = torch.promote_types(img01.dtype, torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=img01.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=img01.device).view(3, 1, 1)
    return ((img01.to(dtype) - mean) / std).to(img01.dtype)


@dataclass
class EfficientNetEncoderConfig:
    """Constructor arguments of `EfficientNetEncoder`; the backbone itself is fixed (EfficientNetV2-S)."""

    c_latent: int = 16

    @classmethod
    def full(cls) -> EfficientNetEncoderConfig:
        """The shipped encoder (effnet_encoder.safetensors): 16 latent channels."""
        return cls()

    def build(self) -> EfficientNetEncoder:
        return EfficientNetEncoder(**asdict(self))


class EfficientNetEncoder(nn.Module):
    """Official ``EfficientNetEncoder``: forward(x) = mapper(backbone(x)) on an ImageNet-normalised image.

    The mapper is a 1x1 conv 1280 -> c_latent and a non-affine BatchNorm that whitens the latent.
    Run it in eval mode (BatchNorm running statistics), as every official caller does.
    """

    def __init__(self, *, c_latent: int = 16):
        super().__init__()
        self.backbone = efficientnet_v2_s_features()
        self.mapper = nn.Sequential(
            nn.Conv2d(_C_FEATURES, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) normalised -> (B, 1280, H/32, W/32) -> (B, c_latent, H/32, W/32)
        return self.mapper(self.backbone(x))

    def encode_image(self, img01: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (B, 3, H, W) -> (B, c_latent, H/32, W/32), normalised like the official callers."""
        weight = next(self.parameters())
        return self(imagenet_normalize(img01.to(weight.device)).to(weight.dtype))
