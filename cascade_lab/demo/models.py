"""The ``demo`` cascade: Stable Cascade's architecture at a small size, trained on the synthetic world.

Stage C (text → 16×8×8 latent), Stage B (→ Stage A latent 4×32×32), Stage A (→ 128 px RGB), a small
convolutional encoder in the EfficientNet encoder's role (RGB → 16×8×8, whitened by a non-affine BatchNorm),
the Previewer (16×8×8 → 64 px) and a small CLIP text tower with a word-level tokenizer; no file is
downloaded. Stage C and Stage B are the official classes predicting v instead of ε (`DemoStageC`,
`DemoStageB`: same keys, ε still what `forward` returns); Stage C also sees two coordinate channels.
`build_demo` loads the shipped weights from ``cascade_lab/demo/weights/`` (fp16 on disk), with the demo's
ControlNets (`DemoControlNet`: the official module behind a strided stem, ``controlnet_<kind>.safetensors``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.controlnet import ControlNet
from ..models.previewer import PreviewerConfig
from ..models.stage_a import StageAConfig
from ..models.stage_b import StageB, StageBConfig
from ..models.stage_c import StageC, StageCConfig
from .world import COLOURS, POSITIONS, SHAPES, SIZE

WEIGHTS = Path(__file__).parent / "weights"
TEXT_WIDTH = 64  # CLIP hidden size = projection size


@dataclass
class DemoConfig:
    """The sizes of every demo model (the presets of the official classes, plus the encoder and text tower)."""

    stage_c: StageCConfig = field(default_factory=lambda: StageCConfig(
        c_in=16 + 2, c_cond=64, c_hidden=[64, 64], nhead=[2, 2], blocks=[[2, 2], [2, 2]], c_clip_text=TEXT_WIDTH,
        c_clip_text_pooled=TEXT_WIDTH, c_clip_img=16, dropout=[0.0, 0.0]))
    stage_b: StageBConfig = field(default_factory=lambda: StageBConfig(
        c_cond=64, c_hidden=[32, 64, 64, 64], nhead=[-1, -1, 2, 2], blocks=[[1, 1, 1, 1], [1, 1, 1, 1]],
        block_repeat=[[1, 1, 1, 1], [1, 1, 1, 1]], c_clip=TEXT_WIDTH, dropout=[0.0, 0.0, 0.0, 0.0]))
    # scale_factor 1: the BatchNorm output (std ~1) is Stage B's latent as is (the official 0.43 suits its VQGAN)
    stage_a: StageAConfig = field(default_factory=lambda: StageAConfig(
        levels=2, bottleneck_blocks=2, c_hidden=48, c_latent=4, codebook_size=16, scale_factor=1.0))
    previewer: PreviewerConfig = field(default_factory=lambda: PreviewerConfig(c_hidden=64))
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig())
    text: TextConfig = field(default_factory=lambda: TextConfig())


# ------------------------------------------------------------------------------------------------ stages


def eps_from_v(v: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """ε = a·v + b·x_t for a network predicting v = a·ε − b·x0 at noise condition r (x_t = a·x0 + b·ε)."""
    from ..diffusion.schedule import noise_cond_to_logsnr, vp_scalers

    a, b = vp_scalers(noise_cond_to_logsnr(r))  # [B] each
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (a.view(shape) * v.float() + b.view(shape) * x.float()).to(x.dtype)


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] with two fixed channels appended: the row and column coordinate, each in [-1, 1]."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, ys, xs], dim=1)


class DemoStageC(StageC):
    """`StageC` (same keys and classes) whose network predicts v and sees where each latent pixel is.

    `forward` still returns ε, as every caller expects. With ε-prediction a network this small never learns
    the near-identity ε ≈ x_t of the noisiest steps precisely enough (measured: x0 recovered at t = 0.97 had
    14× the latent's variance as error), and there the conditioning is worth almost nothing to the ε-loss, so
    it is ignored. Predicting v keeps the identity exact (the b·x_t term) and makes the noisy steps a
    prediction of the image, which the conditioning decides.

    The input gets two coordinate channels (`with_coordinates`; ``c_in`` = 16 + 2). The official Stage C has no
    position embedding and learns where things are from the zero padding of its convolutions, which a big model
    on real data can. This one, at 8×8, could not: trained with ``noise_shift`` 4 alone, its x0 prediction at
    t = 0.99 put the shape at the prompt's position for 33 % of held-out prompts, with the coordinates 100 %.
    """

    def forward(self, x: torch.Tensor, r: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return eps_from_v(super().forward(with_coordinates(x), r, *args, **kwargs), x, r)


class DemoStageB(StageB):
    """`StageB` predicting v, `forward` returning ε (see `DemoStageC`)."""

    def forward(self, x: torch.Tensor, r: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return eps_from_v(super().forward(x, r, *args, **kwargs), x, r)


# ------------------------------------------------------------------------------------------------ encoder


@dataclass
class EncoderConfig:
    """A 2× average pool, one stride-2 conv per width (3 → 16× in all), 1×1 to the latent, non-affine BatchNorm.

    16×: 128 px → 8×8, where EfficientNet's 32× would give 4×4. Measured with Stage B given the true latent
    (shape and colour right, 32 held-out prompts, 2000 Stage B steps): 56 % at 8×8 against 38 % at 4×4, and
    88 % once Stage B also trains with ``noise_shift`` 4. At 4×4 no Stage B variant drew the shape (19–41 %,
    ``noise_shift`` 4 included): a 4×4 latent says "a cross at the top left" as a code, not as a picture
    Stage B can follow.
    """

    c_hidden: list[int] = field(default_factory=lambda: [32, 64, 128])
    c_latent: int = 16

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.c_hidden) + 1)

    def build(self) -> DemoEncoder:
        return DemoEncoder(**asdict(self))


def downsampling(c_in: int, c_hidden: Sequence[int]) -> list[nn.Module]:
    """Per width: a stride-2 4×4 conv, GroupNorm, GELU, a 3×3 conv, GELU (each halves the size)."""
    layers: list[nn.Module] = []
    for c in c_hidden:
        layers += [nn.Conv2d(c_in, c, kernel_size=4, stride=2, padding=1), nn.GroupNorm(8, c), nn.GELU(),
                   nn.Conv2d(c, c, kernel_size=3, padding=1), nn.GELU()]
        c_in = c
    return layers


class DemoEncoder(nn.Module):
    """The EfficientNet encoder's role at demo size: RGB [B, 3, H, W] in [0, 1] → latent [B, 16, H/16, W/16]."""

    def __init__(self, *, c_hidden: Sequence[int] = (32, 64, 128), c_latent: int = 16):
        super().__init__()
        self.downscale = 2 ** (len(c_hidden) + 1)  # image pixels per latent pixel (the pipeline resizes by it)
        # flat shapes need no full-resolution features: a 2x average pool first
        self.backbone = nn.Sequential(nn.AvgPool2d(2), *downsampling(3, c_hidden))
        # as the official mapper: whiten the latent so Stage C sees roughly unit variance
        self.mapper = nn.Sequential(nn.Conv2d(c_hidden[-1], c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(c_latent, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) in [-1, 1] -> (B, c_hidden[-1], H/16, W/16) -> (B, c_latent, H/16, W/16)
        return self.mapper(self.backbone(x))  # type: ignore[no-any-return]

    def encode_image(self, img01: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] → latent, as `EfficientNetEncoder.encode_image` (the pipeline's img2img calls this)."""
        weight = next(self.parameters())
        return self(img01.to(weight.device, weight.dtype) * 2 - 1)


COMPRESSION = float(EncoderConfig().downscale)  # image pixels per Stage C latent pixel: 128 px → 8×8
NATIVE = {"width": SIZE, "height": SIZE, "compression": COMPRESSION}  # what `Cascade` generates with


# ------------------------------------------------------------------------------------------------ ControlNets

CONTROLNET_C_IN = {"canny": 1, "inpainting": 4}  # channels of the official filters' outputs (`controls.filters`)


@dataclass
class DemoControlNetConfig:
    """A `DemoControlNet`: the control image's channels, the strided stem's widths, the Stage C calls it feeds.

    Four stride-2 convs take the 128 px control image to the 8×8 latent grid (16×, as the encoder) before the
    official 'simple' bottleneck. The official canny ControlNet's EfficientNetV2-S (stride 32) is 4000× the demo
    Stage C's cost; 'simple' alone runs at stride 1, and bilinear resizing of its 128 px output to 8×8 blocks
    keeps 1 pixel in 256, so thin edges fall between the samples. ``proj_blocks``: all 8 ResBlock calls of the
    demo Stage C (2 per level, down then up), all 64 wide.
    """

    c_in: int = 1
    c_hidden: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    c_proj: int = 64
    proj_blocks: list[int] = field(default_factory=lambda: list(range(8)))

    @classmethod
    def of(cls, kind: str) -> DemoControlNetConfig:
        if kind not in CONTROLNET_C_IN:
            raise ValueError(f"demo ControlNet kind {kind!r}: use one of {', '.join(CONTROLNET_C_IN)}")
        return cls(c_in=CONTROLNET_C_IN[kind])

    def build(self) -> DemoControlNet:
        return DemoControlNet(**asdict(self))


class DemoControlNet(ControlNet):
    """The official `ControlNet` ('simple' bottleneck, `projections`, zero-initialised last convs) behind a
    strided stem: control [B, c_in, 128, 128] → features [B, 64, 8, 8] for each ResBlock call in proj_blocks."""

    def __init__(self, *, c_in: int = 1, c_hidden: Sequence[int] = (16, 32, 64, 64), c_proj: int = 64,
                 proj_blocks: Sequence[int] = tuple(range(8))):
        # the official module at width c_hidden[-1]: its 'simple' backbone and projections run on the 8×8 grid
        super().__init__(c_in=c_hidden[-1], c_proj=c_proj, proj_blocks=proj_blocks, bottleneck_mode="simple")
        self.c_in, self.c_hidden = c_in, list(c_hidden)  # `check_controlnet` compares c_in with the kind
        # (B, c_in, 128, 128) -> (B, c_hidden[-1], 8, 8) -> the 'simple' bottleneck, same shape
        self.backbone = nn.Sequential(*downsampling(c_in, c_hidden), *self.backbone)


def controlnet_file(kind: str, folder: str | Path | None = None) -> Path:
    return Path(folder or WEIGHTS) / f"controlnet_{kind}.safetensors"


def save_controlnet(net: DemoControlNet, kind: str, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """``controlnet_<kind>.safetensors`` in `dtype`, its config in the metadata (`load_controlnet` reads it)."""
    from safetensors.torch import save_file

    path = controlnet_file(kind, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"c_in": net.c_in, "c_hidden": net.c_hidden, "c_proj": net.c_proj, "proj_blocks": net.proj_blocks}
    tensors = {k: v.to(dtype).contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"cascade_lab.demo": f"controlnet_{kind}", "config": json.dumps(config)})
    return path


def load_controlnet(kind: str = "canny", path: str | Path | None = None) -> DemoControlNet:
    """The demo's `kind` ControlNet (float32, eval, frozen) from `path` (default: the shipped file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else controlnet_file(kind)
    if not path.is_file():
        raise FileNotFoundError(f"demo ControlNet {path} is missing; train it with "
                                f"`python -m cascade_lab.demo.train_controlnet --kind {kind} --out {path.parent}`")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("cascade_lab.demo") != f"controlnet_{kind}":
        raise ValueError(f"{path} is not a demo {kind} ControlNet (its metadata says "
                         f"{metadata.get('cascade_lab.demo')!r}); give a file `save_controlnet` wrote")
    net = DemoControlNetConfig(**json.loads(metadata["config"])).build()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return net.eval().requires_grad_(False)


def shipped_controlnets(folder: str | Path | None = None) -> dict[str, Callable[[], DemoControlNet]]:
    """kind → loader of each demo ControlNet file present in `folder`: what `Cascade` uses when a control of the
    demo variant names no model (``Stages.controlnets``)."""
    return {kind: partial(load_controlnet, kind, controlnet_file(kind, folder))
            for kind in CONTROLNET_C_IN if controlnet_file(kind, folder).is_file()}


# ------------------------------------------------------------------------------------------------ text


class WordTokenizer:
    """A word-level tokenizer over the demo world's vocabulary (no files); other words become ``<unk>``.

    It answers the subset of the ``transformers`` tokenizer call that `TextEncoder` uses.
    """

    specials = ("<start>", "<end>", "<unk>")
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 0, 1, 1, 2

    def __init__(self) -> None:
        words = {"a", "an", "at", "the", "in", "on", "of", "background", "center", "centre", "middle"}
        words |= set(COLOURS) | set(SHAPES) | {w for name in POSITIONS for w in name.split()}
        self.vocab = {w: i for i, w in enumerate([*self.specials, *sorted(words)])}

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, prompts: str | Sequence[str], **_: Any) -> dict[str, list[list[int]]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return {"input_ids": [[self.vocab.get(w, self.unk_token_id) for w in re.findall(r"[a-z]+", p.lower())]
                              for p in prompts]}


@dataclass
class TextConfig:
    """A small CLIP text tower: 16-token windows (a demo caption has at most 12 words)."""

    hidden: int = TEXT_WIDTH
    layers: int = 2
    heads: int = 2
    max_tokens: int = 16

    def build(self) -> Any:
        """A `TextEncoder` around a fresh `CLIPTextModelWithProjection` and the `WordTokenizer`."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from ..models.clip import TextEncoder

        tokenizer = WordTokenizer()
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.hidden * 4,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, max_position_embeddings=self.max_tokens,
            projection_dim=self.hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
        )  # fmt: skip
        return TextEncoder(CLIPTextModelWithProjection(config).eval(), tokenizer)


# ------------------------------------------------------------------------------------------------ build

PARTS = ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "text_encoder")


def fresh_stages(config: DemoConfig | None = None, seed: int = 0) -> Any:
    """Untrained demo models (`pipeline.Stages`) from a seed: the starting point of `cascade_lab.demo.train`."""
    from ..pipeline import Stages

    config = config or DemoConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stage_b = DemoStageB(**config.stage_b.kwargs())
        # The official init (std 0.02) leaves the conditioning ~1 % of the effnet mapper's output after its
        # LayerNorm; Xavier init lets the latent through from step 0 (the recipe's experiments all used it).
        for i in (0, 2):
            conv = stage_b.effnet_mapper[i]
            assert isinstance(conv, nn.Conv2d)
            nn.init.xavier_uniform_(conv.weight)
        return Stages(stage_c=DemoStageC(**config.stage_c.kwargs()), stage_b=stage_b, stage_a=config.stage_a.build(),
                      text_encoder=config.text.build(), previewer=config.previewer.build(),
                      effnet=config.encoder.build(), variant="demo")


def module_of(stages: Any, part: str) -> nn.Module:
    """The `nn.Module` holding a part's weights (the text encoder wraps a transformers model)."""
    value = getattr(stages, part)
    return value.model if part == "text_encoder" else value  # type: ignore[no-any-return]


def save_weights(stages: Any, folder: str | Path, dtype: torch.dtype = torch.float16,
                 parts: Sequence[str] = PARTS) -> list[Path]:
    """One safetensors file per part (``stage_c.safetensors``, ...), stored in `dtype`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in parts:
        state = module_of(stages, part).state_dict()
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / f"{part}.safetensors"), metadata={"cascade_lab.demo": part})
        paths.append(folder / f"{part}.safetensors")
    return paths


def load_weights(stages: Any, folder: str | Path, parts: Sequence[str] = PARTS) -> Any:
    """Fill `stages` from the files `save_weights` wrote (in float32); missing files name the retrain command."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for part in parts:
        path = folder / f"{part}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"demo weights {path} are missing; rebuild them with "
                                    f"`python -m cascade_lab.demo.train --out {folder}`")
        module = module_of(stages, part)
        module.load_state_dict({k: v.float() if v.is_floating_point() else v
                                for k, v in load_file(str(path)).items()}, strict=True)
        module.float().eval().requires_grad_(False)
    return stages


def build_demo(weights: str | Path | None = None, **_: Any) -> Any:
    """The trained demo cascade (`pipeline.Stages`, variant ``demo``) from the shipped weights (or `weights`)."""
    stages = load_weights(fresh_stages(), weights or WEIGHTS)
    stages.native = dict(NATIVE)  # `Cascade` generates at this size and compression
    stages.controlnets = shipped_controlnets(weights or WEIGHTS)  # a control naming no model uses these
    stages.load_controlnet = load_controlnet  # (kind, path): a control naming a file (the official loader cannot)
    return stages


__all__ = ["COMPRESSION", "CONTROLNET_C_IN", "DemoConfig", "DemoControlNet", "DemoControlNetConfig", "DemoEncoder",
           "DemoStageB", "DemoStageC", "EncoderConfig", "NATIVE", "PARTS", "TextConfig", "WEIGHTS", "WordTokenizer",
           "build_demo", "controlnet_file", "downsampling", "eps_from_v", "fresh_stages", "load_controlnet",
           "load_weights", "module_of", "save_controlnet", "save_weights", "shipped_controlnets", "with_coordinates"]
