"""CLIP text and image encoders for Stable Cascade, thin wrappers over `transformers` (spec §5.3).

`TextEncoder.encode` gives Stage C's `clip_text` [B, T, 1280] (CLIP-G's last hidden state *before* the
final layer norm, T = 77 per window) and `clip_text_pooled` [B, 1, 1280] (projected EOS token).
`ImageEncoder.encode` gives `clip_img` [B, 1, 768] (CLIP-L `image_embeds`). This module never downloads
files: callers hand it a local transformers folder, a single safetensors file (built-in configs below,
loaded by `cascade_lab.weights.encoders`) or ready-built `transformers` objects.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


E = TypeVar("E", bound="_Encoder")


def clip_g_text_config() -> Any:
    """CLIP ViT-bigG/14 text tower with projection, as `stabilityai/stable-cascade` text_encoder/config.json
    (spec §5.3): a `transformers.CLIPTextConfig` for `CLIPTextModelWithProjection`, 694,659,840 parameters."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def clip_l_vision_config() -> Any:
    """CLIP ViT-L/14 vision tower with projection (`openai/clip-vit-large-patch14`, the image_encoder of
    `stabilityai/stable-cascade-prior`): a `transformers.CLIPVisionConfig`, 224 px, 257 positions, 768-d embeds."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


class PromptSplitWarning(UserWarning):
    """A prompt was longer than one CLIP window and was split into several (never truncated)."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the fixed number of CLIP windows asked for; its end was dropped."""


class _Encoder:
    """Holds a `transformers` model; shared device/dtype moves and memory release."""

    _name = "encoder"

    def __init__(self, model: Any) -> None:
        self._model: Any = model.eval()  # dropout-free inference; the caller's object is reused, not copied

    @property
    def model(self) -> Any:
        if self._model is None:
            raise RuntimeError(f"this {self._name} was released; build a new one (e.g. with .from_folder(...))")
        return self._model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self: E, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> E:
        """Move/cast the wrapped model in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def release(self) -> None:
        """Drop the model and free its memory (CPU and, when used, the CUDA cache)."""
        self._model = None
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _load_kwargs(dtype: torch.dtype | str | None) -> dict[str, Any]:
    """`from_pretrained` keywords: offline only, dtype under the name this transformers version expects."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {"local_files_only": True, dtype_key: "auto" if dtype is None else dtype}


def _model_dir(path: str | Path, subfolder: str) -> Path:
    """`path/subfolder` when it holds a config.json (HF repo layout), else `path` itself."""
    path = Path(path)
    if (path / subfolder / "config.json").is_file():
        return path / subfolder
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"no CLIP config.json in {path} or {path / subfolder}: pass the folder of a transformers "
        f"export (config.json + model.safetensors), e.g. the '{subfolder}' folder of stabilityai/stable-cascade"
    )


# --------------------------------------------------------------------------------------------- text


class TextEncoder(_Encoder):
    """CLIP-G text encoder as Stable Cascade uses it: pre-final-LN hidden states + projected EOS token.

    Every window is `<|startoftext|>` + up to 75 tokens + `<|endoftext|>`, padded to 77 with the end token
    (id 49407 in CLIP) whatever the tokenizer's own pad token is; the attention mask is passed to the model,
    so pads are masked as keys (spec §5.3, gotcha 1).
    """

    _name = "TextEncoder"

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int | None = None) -> None:
        """`model`: a `CLIPTextModelWithProjection`; `tokenizer`: its CLIP tokenizer (slow or fast)."""
        super().__init__(model)
        self.tokenizer = tokenizer
        self.max_length = int(max_length or model.config.max_position_embeddings)  # 77
        self.bos_id: int = tokenizer.bos_token_id
        self.eos_id: int = tokenizer.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no bos/eos token "
                f"(bos={self.bos_id}, eos={self.eos_id}); a CLIP tokenizer needs <|startoftext|> and <|endoftext|>"
            )

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        *,
        tokenizer_path: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TextEncoder:
        """Load from local files: `path` is a text-encoder folder or a repo root with `text_encoder/` and
        `tokenizer/`. `dtype=None` keeps the stored dtype (bf16 for stable-cascade, as the official code)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        model_dir = _model_dir(path, "text_encoder")
        if tokenizer_path is None:  # tokenizer files next to the model, else the repo's sibling tokenizer/
            own = any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json"))
            sibling = model_dir.parent / "tokenizer"
            tokenizer_path = sibling if not own and sibling.is_dir() else model_dir
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        model = CLIPTextModelWithProjection.from_pretrained(str(model_dir), **_load_kwargs(dtype))
        return cls(model, tokenizer).to(device)

    @classmethod
    def from_file(
        cls,
        path: str | PathLike[str],
        *,
        prefix: str | None = None,
        tokenizer_path: str | PathLike[str] | None = None,
        config: Any = None,
        comfyui: str | PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TextEncoder:
        """Load CLIP-G from one safetensors file without config.json: a bare export (transformers or ComfyUI
        `clip_g.` names) or the `text_encoder.` section of a ComfyUI all-in-one checkpoint (`prefix=None`
        detects it). `config` defaults to `clip_g_text_config()`; the tokenizer is searched for as
        `weights.encoders.find_tokenizer` says. `dtype=None` keeps the stored dtype."""
        from ..weights.encoders import find_tokenizer, load_clip_file, load_tokenizer
        from ..weights.safetensors_io import read_header

        read_header(path)  # a missing or broken file is named as such, then no tokenizer fails before reading GBs
        tokenizer = load_tokenizer(find_tokenizer(path, tokenizer_path, comfyui=comfyui))
        config = config if config is not None else clip_g_text_config()
        model = load_clip_file("text_encoder", path, config, prefix=prefix, device=device, dtype=dtype)
        return cls(model, tokenizer)

    @classmethod
    def from_path(
        cls,
        path: str | PathLike[str],
        *,
        comfyui: str | PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TextEncoder:
        """A transformers folder (or a file next to its config.json) with `from_folder`, else `from_file`."""
        from ..weights.encoders import transformers_folder

        folder = transformers_folder(path)
        if folder is None:
            return cls.from_file(path, comfyui=comfyui, device=device, dtype=dtype)
        return cls.from_folder(folder, device=device, dtype=dtype)

    def tokenize(self, prompts: str | Sequence[str], *, windows: int | None = None) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        """(input_ids, attention_mask), both [B, n_windows, 77] int64.

        A prompt longer than 75 tokens is split into consecutive windows (with a `PromptSplitWarning`);
        batch entries with fewer windows get extra windows of the empty prompt "", the official
        unconditional caption, so they add "no content" tokens rather than repeating text. `windows`: exactly
        that many windows, the tokens past them dropped (`PromptTruncatedWarning`; 1 is the official trainer's
        truncation to 75 tokens).
        """
        return self._tokenize(prompts, windows=windows)

    def _tokenize(self, prompts: str | Sequence[str], *, windows: int | None = None) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        span = self.max_length - 2  # content tokens per window: 75
        ids = self.tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        chunks = [[toks[i : i + span] for i in range(0, len(toks), span)] or [[]] for toks in ids]
        if windows is not None:
            if windows < 1:
                raise ValueError(f"windows={windows}: use 1 or more (75 tokens each), or None for as many as needed")
            if any(len(c) > windows for c in chunks):  # one text for every length: Python shows it once, not
                # once per caption length (training encodes caption by caption)
                warnings.warn(f"CLIP prompt longer than {windows * span} tokens truncated to {windows} window(s): "
                              f"the tokens after the first {windows * span} are not seen",
                              PromptTruncatedWarning, stacklevel=3)
            chunks = [c[:windows] for c in chunks]
        n_windows = windows or max(len(c) for c in chunks)
        split = {i: (len(ids[i]), len(c)) for i, c in enumerate(chunks) if len(c) > 1}
        if split and windows is None:
            parts = ", ".join(f"prompt {i}: {n} tokens -> {k} windows" for i, (n, k) in split.items())
            warnings.warn(
                f"CLIP prompt longer than {span} tokens split into {self.max_length}-token windows ({parts}); "
                f"clip_text has T={n_windows * self.max_length}, pooled comes from the first window",
                PromptSplitWarning,
                stacklevel=3,
            )
        input_ids = torch.full((len(prompts), n_windows, self.max_length), self.eos_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, chunk in enumerate(chunks):
            chunk = chunk + [[]] * (n_windows - len(chunk))  # pad the batch with "" windows
            for w, toks in enumerate(chunk):
                row = [self.bos_id, *toks, self.eos_id]  # pads after it are already eos_id
                input_ids[b, w, : len(row)] = torch.tensor(row)
                mask[b, w, : len(row)] = 1
        return input_ids, mask

    def encode(self, prompts: str | Sequence[str], *, windows: int | None = None) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        """(clip_text [B, 77·n_windows, C], clip_text_pooled [B, 1, C]) in the model's dtype and device;
        `windows` as in `tokenize`."""
        input_ids, mask = self._tokenize(prompts, windows=windows)  # warns from here: the notice names our caller
        B, n, L = input_ids.shape
        model = self.model
        with torch.no_grad():
            out = model(
                input_ids=input_ids.view(B * n, L).to(self.device),
                attention_mask=mask.view(B * n, L).to(self.device),
                output_hidden_states=True,
            )
        hidden = out.hidden_states[-1]  # (B*n, L, C) last layer output, before final_layer_norm
        clip_text = hidden.reshape(B, n * L, hidden.shape[-1])  # windows side by side along T

        # Pool ourselves at the FIRST eos of each first window: transformers picks argmax(input_ids) instead
        # when config.eos_token_id == 2 (pre-#24773 configs), which is wrong once an added token (id > eos) is
        # present. last_hidden_state is already final-LN'd.
        first = out.last_hidden_state.view(B, n, L, -1)[:, 0]  # (B, L, C)
        eos_pos = (input_ids[:, 0] == self.eos_id).int().argmax(dim=-1).to(first.device)  # (B,)
        with torch.no_grad():
            pooled = model.text_projection(first[torch.arange(B, device=first.device), eos_pos])  # (B, P)
        return clip_text, pooled.unsqueeze(1)  # (B, 1, P)


# -------------------------------------------------------------------------------------------- image


def _to_batch(image: Any) -> torch.Tensor:
    """One input (PIL image, HWC/BHWC numpy array, [3,H,W]/[B,3,H,W] tensor) as float32 [b, 3, H, W] in [0, 1]."""
    import numpy as np

    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image without importing PIL here
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        array = image[..., None] if image.ndim == 2 else image  # grey HW -> HW1
        x = torch.from_numpy(np.array(array, dtype=np.float32)).div(scale)  # a copy: PIL arrays are read-only
        x = x.unsqueeze(0) if x.ndim == 3 else x
        x = x.permute(0, 3, 1, 2)  # (b, H, W, c) -> (b, c, H, W)
    elif isinstance(image, torch.Tensor):
        x = image.float().div(255.0) if image.dtype == torch.uint8 else image.float()
        x = x.unsqueeze(0) if x.ndim == 3 else x
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, an HWC numpy array "
            "(uint8 or float in [0, 1]) or a [B, 3, H, W] tensor in [0, 1]"
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"image of shape {tuple(image.shape)}: expected HWC (numpy) or [B, 3, H, W] (tensor)")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3]  # drop alpha


def preprocess_images(images: Any, size: int = 224) -> torch.Tensor:
    """CLIP preprocessing of the official code: short side to `size` (bicubic, antialiased), center crop,
    normalise with CLIP mean/std. `images`: one input or a list of them (sizes may differ). -> [B, 3, size, size]."""
    items = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for item in items:
        x = _to_batch(item)  # (b, 3, H, W)
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        if short != size:  # torchvision Resize(size): long side truncated, like int(size * long / short)
            new_long = int(size * long / short)
            new_hw = (size, new_long) if h <= w else (new_long, size)
            x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
        h, w = x.shape[-2:]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision CenterCrop
        out.append(x[:, :, top : top + size, left : left + size])
    x = torch.cat(out)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageEncoder(_Encoder):
    """CLIP-L vision encoder (Stage C image conditioning): preprocessing + projected `image_embeds`."""

    _name = "ImageEncoder"

    def __init__(self, model: Any) -> None:
        """`model`: a `CLIPVisionModelWithProjection` (224 px for openai/clip-vit-large-patch14)."""
        super().__init__(model)
        self.size = int(model.config.image_size)

    @classmethod
    def from_folder(
        cls, path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ImageEncoder:
        """Load from local files: an image-encoder folder or a repo root with `image_encoder/`."""
        from transformers import CLIPVisionModelWithProjection

        model_dir = _model_dir(path, "image_encoder")
        model = CLIPVisionModelWithProjection.from_pretrained(str(model_dir), **_load_kwargs(dtype))
        return cls(model).to(device)

    @classmethod
    def from_file(
        cls,
        path: str | PathLike[str],
        *,
        prefix: str | None = None,
        config: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageEncoder:
        """Load CLIP ViT-L/14 vision from one safetensors file without config.json: a bare export (ComfyUI
        `clip_vision`, a full CLIPModel) or the `clip_l_vision.` section of a ComfyUI all-in-one checkpoint."""
        from ..weights.encoders import load_clip_file

        config = config if config is not None else clip_l_vision_config()
        return cls(load_clip_file("image_encoder", path, config, prefix=prefix, device=device, dtype=dtype))

    @classmethod
    def from_path(
        cls,
        path: str | PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageEncoder:
        """A transformers folder (or a file next to its config.json) with `from_folder`, else `from_file`."""
        from ..weights.encoders import transformers_folder

        folder = transformers_folder(path)
        if folder is None:
            return cls.from_file(path, device=device, dtype=dtype)
        return cls.from_folder(folder, device=device, dtype=dtype)

    @torch.no_grad()
    def encode(self, images: Any) -> torch.Tensor:
        """clip_img [B, 1, 768] for one image or a list of images (see `preprocess_images`)."""
        pixels = preprocess_images(images, self.size).to(self.device, self.dtype)
        return self.model(pixel_values=pixels).image_embeds.unsqueeze(1)  # (B, 1, 768)

    def encode_variations(
        self, images: Any, weights: Sequence[float] | None = None, *, batch_size: int = 1
    ) -> torch.Tensor:
        """Several weighted reference images as one clip_img [batch_size, N, 768]; see `image_conditioning`."""
        return image_conditioning(self.encode(images), weights, batch_size=batch_size)


def image_conditioning(
    embeds: torch.Tensor, weights: Sequence[float] | None = None, *, batch_size: int = 1
) -> torch.Tensor:
    """Stack N image embeddings, each times its weight, as clip_img [batch_size, N, D] (unCLIP-style concat).

    `embeds`: [N, 1, D] or [N, D] (N images shared by the whole batch). Stage C maps every embedding to 4
    tokens, so it must accept clip_img [B, N, D] and give 4·N image tokens (the official mapper does
    `view(B, N * 4, c_cond)`). For CFG pair it with zeros of the same shape.
    """
    embeds = embeds.reshape(embeds.shape[0], embeds.shape[-1])  # (N, D)
    n = embeds.shape[0]
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} image embeddings: give one weight per image")
    w = torch.tensor(list(weights), dtype=embeds.dtype, device=embeds.device)
    return (embeds * w[:, None]).unsqueeze(0).expand(batch_size, n, -1).contiguous()  # (B, N, D)


def empty_clip_img(
    batch_size: int,
    dim: int = 768,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """clip_img when no image is used: zeros [B, 1, dim] (they still give Stage C its mapper-bias tokens)."""
    return torch.zeros(batch_size, 1, dim, device=device, dtype=dtype)
