"""`Cascade`: the one object the notebook, the command line and scripts call."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .params import GenerationParams
from .plugins import get_sampler, get_scheduler, get_variant

ImageLike = Any  # a path, a PIL image, an HWC array or a [B, 3, H, W] tensor in [0, 1]


def _image_tensor(image: ImageLike) -> Any:
    """Any image input → float32 [B, 3, H, W] in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(image, (str, Path)):
        from .images import open_image

        image = open_image(image).convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.permute(2, 0, 1)[None] if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
        return tensor[:, :3].contiguous()
    if isinstance(image, torch.Tensor):
        tensor = image.float()
        return tensor[None] if tensor.dim() == 3 else tensor
    raise TypeError(f"cannot read an image from {type(image).__name__}; pass a path, a PIL image, an array or a tensor")


def _check_lora_strength(path: str, strength: Any) -> None:
    import math

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"LoRA {path!r} strength={strength!r}: use a finite number (1.0 = as trained, 0 = off, "
                         "negative inverts it)")


def check_device(device: str) -> None:
    """Refuse a device this machine cannot run on, before anything loads: CUDA without a CUDA build or GPU, a GPU
    index beyond the ones present, MPS off Apple silicon, or a name torch does not know."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: not a device name; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={device!r}: {why} (torch {torch.__version__}); use device='cpu', or install a "
                             "CUDA build of torch on a machine with an NVIDIA GPU")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r}: MPS (Apple silicon) is not available here; use device='cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r}: cascade_lab runs on cpu, cuda or mps")


def _is_lazy(part: Any) -> bool:
    from .pipeline import Lazy

    return isinstance(part, Lazy)


def _fits(lora: Any, model: Any) -> bool:
    from .models.lora import LoraError

    try:
        lora.patches(model)
    except LoraError:
        return False
    return True


def _describe(image: ImageLike) -> str:
    """A short stable description of an input image for the PNG metadata: its path, else a content hash."""
    if isinstance(image, (str, Path)):
        return str(image)
    data = _image_tensor(image).numpy().tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


class Cascade:
    """Stable Cascade with loaded stages, a device and a memory policy.

    ``variant="auto"`` picks the best real variant available locally; with none it falls back to the
    built-in ``demo`` cascade (trained offline on a synthetic world) with a one-line notice. Models load
    on first use and stay loaded.
    """

    def __init__(self, variant: str = "auto", *, device: str | None = None, dtype: str | None = None,
                 offload: bool | None = None, compile: bool = False, **weights_options: Any) -> None:
        """``compile=True`` runs the Stage C and Stage B networks through ``torch.compile`` (the first step of
        each new image size compiles; it pays off on GPUs for repeated generations, see benchmarks/RESULTS.md)."""
        if variant != "auto":
            get_variant(variant)  # unknown names fail here, listing the available ones
        if device is not None:
            check_device(device)
        if dtype in ("float16", "fp16", "half"):
            raise ValueError(f"dtype={dtype!r}: Stage C gives black/NaN images in float16; use 'bfloat16' or "
                             "'float32'")
        self.variant, self.device, self.dtype, self.offload, self.compile = variant, device, dtype, offload, compile
        self.weights_options = weights_options
        self._pipeline: Any = None
        self.loras: list[tuple[str, float, Any]] = []
        self._training: Any = None  # the TrainingRun working on this cascade's Stage C

    # -- loading ---------------------------------------------------------------------------------------
    def resolve_variant(self, controls: Sequence[Any] = ()) -> str:
        """The concrete variant `auto` stands for on this machine (with ``controls``, ControlNet kinds or files,
        among the variants whose Stage C they fit: the shipped ControlNets rule out lite)."""
        if self.variant != "auto":
            return self.variant
        from .weights import WeightsNotFoundError, choose_variant, locate
        from .weights.memory import real_variants

        present = []
        for variant in real_variants():
            try:
                locate(variant, download=False, **self.weights_options)
                present.append(variant)
            except WeightsNotFoundError:
                continue
        choice = choose_variant(self.device or "cpu", variants=present, controls=controls) if present else None
        if choice is not None and choice.variant is not None:
            return choice.variant
        reason = choice.reason if choice is not None else "no real Stable Cascade weights found on this machine"
        warnings.warn(f"cascade_lab: {reason}; using the built-in 'demo' cascade (128 px coloured shapes, trained "
                      "offline). For real images: `hf download stabilityai/stable-cascade` (or a ComfyUI folder via "
                      "CASCADE_LAB_COMFYUI), then variant='auto' or 'lite_bf16'.", stacklevel=3)
        return "demo"

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            self._pipeline = self._load()
        return self._pipeline

    def _load(self, controls: Sequence[Any] = ()) -> Any:
        import torch

        from .pipeline import Pipeline

        name = self.resolve_variant(controls)
        variant = get_variant(name)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if variant.build is not None:
            stages = variant.build()
        else:
            stages = load_stages(variant, **self.weights_options)
        self.variant_name = name
        dtype_c = getattr(torch, self.dtype) if self.dtype else torch.float32
        if self.dtype is None and device != "cpu":
            from .weights.memory import compute_dtypes

            dtype_c = compute_dtypes(device).stage_c
        offload = self.offload if self.offload is not None else device != "cpu"
        return Pipeline(stages, device=device, dtype_c=dtype_c, dtype_b=dtype_c, offload=offload,
                        compile=self.compile)

    # -- LoRA ----------------------------------------------------------------------------------------------
    def load_lora(self, path: str | Path, strength: float = 1.0) -> None:
        """Merge a LoRA: Stage C (kohya ``lora_unet_*``, OneTrainer ``lora_prior_unet_*`` and its newer layouts,
        ComfyUI, official ``weights.N``; a text-encoder part ``lora_te_*`` is merged into CLIP-G at the same
        strength) or Stage B (cascade_lab's Stage B training, or any ``lora_unet_*`` file over Stage B's layers),
        routed by the file's ``cascade_lab.stage`` header, else by which stage has the layers it names."""
        from .models.lora import LoraError, apply_lora, load_lora_file

        key = str(path)
        _check_lora_strength(key, strength)
        if any(p == key for p, _, _ in self.loras):
            raise ValueError(f"LoRA {key!r} is already loaded; use unload_lora({key!r}) first or set_lora_strength")
        lora = load_lora_file(path)  # fails on a bad file before the model is touched
        stages = self.pipeline.stages
        stage = lora.stage
        if stage is None:  # layers both stages have and no header: the stage whose layers and shapes fit
            try:
                lora.patches(stages.stage_c)
                stage = "c"
            except LoraError:
                stage = "b" if not _is_lazy(stages.stage_b) and _fits(lora, stages.stage_b) else "c"
        if stage == "b":
            if _is_lazy(stages.stage_b):
                raise ValueError(f"LoRA {key!r} is a Stage B LoRA, but this cascade loads Stage B per use (CPU stage "
                                 "swapping); use offload=True or a device with room for Stage B to keep it loaded")
            handle = apply_lora(stages.stage_b, lora, strength)
        else:
            text_encoder = stages.text_encoder  # a kohya/OneTrainer file's lora_te_* part goes to CLIP-G
            loaded = text_encoder if hasattr(getattr(text_encoder, "model", None), "named_modules") else None
            handle = apply_lora(stages.stage_c, lora, strength, text_encoder=loaded)
        self.loras.append((key, float(strength), handle))

    def set_lora_strength(self, path: str | Path, strength: float) -> None:
        _check_lora_strength(str(path), strength)
        for i, (p, _, handle) in enumerate(self.loras):
            if p == str(path):
                handle.set_strength(strength)
                self.loras[i] = (p, float(strength), handle)
                return
        raise ValueError(f"LoRA {str(path)!r} is not loaded; loaded: {[p for p, _, _ in self.loras] or 'none'}")

    def unload_lora(self, path: str | Path | None = None) -> None:
        """Remove one LoRA (or all with no argument); the base weights come back bit-exactly."""
        keep = []
        for p, s, handle in self.loras:
            if path is None or p == str(path):
                handle.remove()
            else:
                keep.append((p, s, handle))
        if path is not None and len(keep) == len(self.loras):
            raise ValueError(f"LoRA {str(path)!r} is not loaded; loaded: {[p for p, _, _ in self.loras] or 'none'}")
        self.loras = keep

    # -- jobs ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
                 width: int | None = None, height: int | None = None, batch_size: int | None = None,
                 seed: int | None = None, *,
                 image: ImageLike | None = None, strength: float = 1.0, variations: Sequence[ImageLike] = (),
                 variation_weights: Sequence[float] | None = None, compat: str = "official",
                 noise: Any = None, initial_noise: Any = None, init_latent: Any = None,
                 controls: Sequence[Any] = (), callback: Callable[[Any], Any] | None = None,
                 cancel: Callable[[], bool] | None = None, keep_trajectory: bool = False, **options: Any) -> Any:
        """Text to image (or img2img with ``image`` and ``strength`` < 1, variations with ``variations``).

        ``prompt`` may be a list: one prompt per image (the batch size is its length). ``options`` are the other
        `GenerationParams` fields: ``steps_c``/``steps_b``, ``cfg_c``/``cfg_b``, ``shift_c``/``shift_b``,
        ``sampler_c``/``sampler_b``, ``scheduler_c``/``scheduler_b``, ``cfg_rho``, ``compression``,
        ``denoise`` (ComfyUI's partial schedule), ``seed_b``. Every value is checked before any model loads.

        ``compat="comfyui"`` reproduces ComfyUI for the same seed and settings: its seeding (`ComfyNoise`), latent
        sizes (floor(size / compression), compression 42), model call and CFG without rescale; unset sampler and
        scheduler names default to ComfyUI's euler_ancestral + simple and resolve to ComfyUI's samplers. The size
        defaults to 1024², or under ``compat="comfyui"`` with an ``image`` to the image's own size (as ComfyUI).
        ``noise`` (a `cascade_lab.diffusion.noise.NoiseSource`) replaces the seed's random numbers;
        ``initial_noise`` (a Stage C tensor, or ``{"c": ..., "b": ...}``) only the initial noise. ``init_latent``
        starts Stage C from a given Stage C latent (with ``strength`` or ``denoise`` < 1).

        ``controls``: `cascade_lab.controls.Control` records (canny, inpainting, super_resolution ControlNets on
        Stage C); each is filtered as the official code does, run once, scaled by its strength and applied on its
        start/end fraction of the steps. Inpainting results are composited over the original outside the mask.
        """
        weights = list(variation_weights) if variation_weights is not None else [1.0] * len(variations)
        if len(weights) != len(variations):
            raise ValueError(f"{len(variations)} variation image(s) but {len(weights)} weight(s); give one each")
        import math

        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
        if bad:
            raise ValueError(f"variation_weights {bad}: use finite numbers (1.0 each by default)")
        if compat == "comfyui":
            from .params import COMFYUI_DEFAULTS

            options = {**COMFYUI_DEFAULTS, **options}
        if (width is None or height is None) and compat == "comfyui" and image is not None:
            size = _image_tensor(image).shape[-2:]  # ComfyUI's StageC_VAEEncode sizes everything from the image
            height, width = height or int(size[0]), width or int(size[1])
        width, height = width or 1024, height or 1024
        prompt = _prompt_value("prompt", prompt)
        negative_prompt = _prompt_value("negative_prompt", negative_prompt)
        if batch_size is None:
            batch_size = len(prompt) if isinstance(prompt, tuple) else 1
        params = GenerationParams(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, batch_size=batch_size,
            seed=seed, strength=strength, init_image=None if image is None else _describe(image),
            variations=tuple((_describe(v), float(w)) for v, w in zip(variations, weights, strict=True)),
            loras=tuple((path, strength_) for path, strength_, _ in self.loras), compat=compat,
            controls=tuple(_control_record(c) for c in controls), **options,
        )
        if init_latent is not None and params.init_image is None:
            params = params.replace(init_image="latent:" + _tensor_hash(init_latent))
        return self.run(params, image=image, variations=variations, callback=callback, cancel=cancel,
                        keep_trajectory=keep_trajectory, noise=noise, initial_noise=initial_noise,
                        init_latent=init_latent, controls=controls)

    def img2img(self, image: ImageLike, prompt: str, strength: float = 0.8, **kwargs: Any) -> Any:
        """Start from ``image`` noised to ``strength`` (official: 0.8, i.e. 16 of 20 Stage C steps)."""
        return self.generate(prompt, image=image, strength=strength, **kwargs)

    def upscale(self, image: ImageLike, prompt: str = "", *, strength: float = 1.0, controlnet: Any = None,
                **options: Any) -> Any:
        """A 2x upscale of ``image`` with the super-resolution ControlNet, at the official SR notebook's settings
        (Stage C DDPM, 20 steps, CFG 1; `controls.super_resolution_settings`); ``options`` of `generate` win over
        them. ``prompt`` may describe the picture (the official notebook's CFG 1 ignores a negative prompt);
        ``strength`` scales the ControlNet; ``controlnet``: its file or module (default: found like the stages)."""
        from .controls import Control, upscale_options

        size = _image_tensor(image).shape[-2:]
        controls = [*options.pop("controls", ()), Control("super_resolution", image, strength, model=controlnet)]
        return self.generate(prompt, controls=controls, **upscale_options((int(size[1]), int(size[0])), options))

    def run(self, params: GenerationParams, *, image: ImageLike | None = None, variations: Sequence[ImageLike] = (),
            callback: Callable[[Any], Any] | None = None, cancel: Callable[[], bool] | None = None,
            keep_trajectory: bool = False, noise: Any = None, initial_noise: Any = None,
            init_latent: Any = None, controls: Sequence[Any] | None = None) -> Any:
        """Run fully specified parameters (e.g. read back from a PNG with `read_png_params`; its controls are
        rebuilt from their recorded files unless ``controls`` gives them)."""
        from .results import Result, to_pil

        if self._training is not None and self._training.running:
            raise RuntimeError("this cascade's Stage C is being trained; wait for the run (run.wait()) or stop it "
                               "(run.stop()) before generating")
        params.validate()
        get_sampler(params.sampler_c, params.compat), get_sampler(params.sampler_b, params.compat)
        get_scheduler(params.scheduler_c, params.compat), get_scheduler(params.scheduler_b, params.compat)
        if params.negative_prompt and _at_most_one(params.cfg_c) and _at_most_one(params.cfg_b):
            warnings.warn("a negative prompt has no effect without classifier-free guidance (cfg_c and cfg_b ≤ 1)",
                          stacklevel=3)
        start = "an input image" if image is not None else "init_latent" if init_latent is not None else None
        if start is not None and params.strength >= 1 and params.denoise >= 1:
            raise ValueError(f"{start} was given with strength=1.0 and denoise=1.0, which ignores it; use strength < 1 "
                             "(official img2img: 0.8) or denoise < 1 (ComfyUI's img2img example: 0.6)")
        if params.strength < 1 and params.denoise < 1:
            raise ValueError(f"strength={params.strength} and denoise={params.denoise}: give one of the two partial "
                             "schedules (strength: the official one, denoise: ComfyUI's)")
        source = _noise_source(params, noise, initial_noise)
        init = _image_tensor(image) if image is not None else None
        if controls is None:
            controls = [_control_from_record(r) for r in params.controls]
        for control in controls:
            control.validate()
        if self._pipeline is None:  # `auto` picks among the variants the controls' ControlNets fit
            self._pipeline = self._load([c.kind if c.model is None else str(c.model) for c in controls
                                         if c.model is None or isinstance(c.model, (str, Path))])
        pipeline = self.pipeline
        params = self._native(params, warn=True)
        from .weights.memory import check_generation_fits

        check_generation_fits(pipeline.stages.stage_a, pipeline.stages.stage_b, params.width, params.height,
                              params.batch_size, pipeline.device)
        clip_img = None
        if variations:
            encoder = pipeline.stages.image_encoder
            if encoder is None:
                raise ValueError(f"variant {self.variant_name!r} has no CLIP image encoder; variations need one")
            clip_img = encoder.encode_variations([_image_tensor(v) for v in variations],
                                                 [w for _, w in params.variations], batch_size=params.batch_size)
            clip_img = clip_img.float().cpu()
        prepared = [self._control_input(c, params) for c in controls]
        out = pipeline.run(params, init_images=init, clip_img=clip_img, callback=callback, cancel=cancel,
                           keep_trajectory=keep_trajectory, noise=source, init_latent=_latent_tensor(init_latent),
                           controls=[p for p, _, _ in prepared])
        for control, (_, keep, _) in zip(controls, prepared, strict=True):
            if control.kind == "inpainting" and keep is not None:  # the original outside the mask, as official
                from .controls.filters import composite

                original, mask = keep
                out.images = composite(out.images, original.expand_as(out.images), mask)
        final = params.replace(seed=out.seed, variant=self.variant_name if params.variant == "auto" else params.variant)
        rounding = "truncate" if params.compat == "comfyui" else "round"  # ComfyUI's SaveImage truncates
        return Result(to_pil(out.images, rounding), final, out.latent_c, out.latent_b, out.trajectory_c,
                      out.trajectory_b, out.timings, control_images=[view for _, _, view in prepared])

    # -- training --------------------------------------------------------------------------------------
    def train(self, config: Any = None, **kwargs: Any) -> Any:
        """Fine-tune this cascade's Stage C (or its Stage B with ``stage="b"``): `cascade_lab.training.train` on the
        loaded stages; a `TrainingRun`.

        ``mode="lora"`` (the default) leaves Stage C's weights as they were: the LoRA is ``run.output_file``
        (apply it with `load_lora`) and ``run.network``. ``mode="full"`` trains Stage C in place, in float32,
        so later generations use the new weights (reload the variant to get the originals back). Afterwards
        Stage C is in eval mode without gradients. ``kwargs`` are TrainConfig fields (unless given here,
        ``model`` becomes this variant, ``device`` the pipeline's and, for a bf16 Stage C, ``mixed_precision``
        bf16) and `training.train`'s ``callback``, ``stop``, ``background``, ``text_encoder``, ``effnet``. Refused while
        LoRAs are loaded (they are merged into the weights); no generation while a background run trains.
        """
        import torch

        from .training import TrainConfig, train

        if self.loras:
            raise ValueError(f"LoRAs are merged into Stage C ({', '.join(p for p, _, _ in self.loras)}); "
                             "unload_lora() before training, or a full fine-tune would be undone by the unload")
        if self._training is not None and self._training.running:
            raise RuntimeError("this cascade's Stage C is already being trained; wait for that run or stop it")
        options = {k: kwargs.pop(k) for k in ("callback", "stop", "background", "text_encoder", "effnet")
                   if k in kwargs}
        callback = options.pop("callback", None)
        pipeline = self.pipeline
        cfg = TrainConfig.coerce(config, **kwargs)
        trained = pipeline.stages.stage_b if cfg.stage == "b" else pipeline.stages.stage_c
        kwargs.setdefault("model", self.variant_name)  # the run's metadata names what was trained
        kwargs.setdefault("device", str(pipeline.device))
        if not _is_lazy(trained) and next(trained.parameters()).dtype == torch.bfloat16:
            kwargs.setdefault("mixed_precision", "bf16")  # a LoRA on a bf16 base computes under bf16 autocast
        cfg = TrainConfig.coerce(config, **kwargs)

        def restore() -> None:
            if _is_lazy(trained):
                return
            trained.eval().requires_grad_(False)  # no dropout in generations, no gradients kept
            if pipeline.offloading:
                trained.to("cpu")

        def on_event(event: Any) -> None:
            if event.kind == "end":  # also ends a background run, in its thread
                restore()
            if callback is not None:
                callback(event)

        try:
            self._training = train(cfg, stages=pipeline.stages, callback=on_event, **options)
        finally:
            if not options.get("background"):
                restore()
        return self._training

    # -- ControlNets --------------------------------------------------------------------------------------
    def _control_input(self, control: Any, params: GenerationParams) -> tuple[Any, Any, Any]:
        """A `Control` as the pipeline's `ControlInput` (filtered input, loaded and checked ControlNet), for
        inpainting the (original, mask) to composite the result with, and what the result shows of the input
        (`Result.control_images`)."""
        import torch

        from .controls import filters
        from .pipeline import ControlInput

        size = (params.width, params.height)
        image = _image_tensor(control.image)  # [B, 3, H, W] in [0, 1]
        keep = None
        if control.kind == "canny":
            x = filters.canny(filters.resize_to(image, size))
        elif control.kind == "inpainting":
            original = filters.resize_to(image, size)
            mask = filters.grow_mask(filters.load_mask(control.mask, size), control.grow)
            filters.check_mask(mask)
            x, keep = filters.inpainting(original, mask), (original, filters.feather_mask(mask, control.feather))
        else:  # super_resolution: the low-resolution image's EfficientNet latent, 2× nearest
            effnet = self.pipeline.stages.effnet
            if effnet is None:
                raise ValueError(f"variant {self.variant_name!r} has no EfficientNet encoder; super-resolution "
                                 "needs one")
            low = filters.resize_to(image, (params.width // 2, params.height // 2))
            with self.pipeline.use(effnet) as encoder, torch.inference_mode():  # a Lazy encoder loads here
                x = filters.super_resolution(low.to(self.pipeline.device), encoder.encode_image).float().cpu()
        shown = low if control.kind == "super_resolution" else x  # effnet features are no picture: the low image
        view = shown.detach().float().clamp(0, 1).mul(255).round().to("cpu", torch.uint8)  # [B, C, H, W]
        return ControlInput(self._controlnet(control), x.float(), float(control.strength), float(control.start),
                            float(control.end), control.kind), keep, view

    def _controlnet(self, control: Any) -> Any:
        """The ControlNet module of a control: given, the variant's own (``Stages.controlnets``, the demo's), or its
        file (given, or found like the stages: folders, ComfyUI's models/controlnet, the Hub cache, a one-file
        download), checked against its kind and the loaded Stage C (a file from its header alone) before anything
        loads or runs."""
        import torch

        from .weights import load_stage
        from .weights.controlnets import check_controlnet, locate_controlnet

        stage_c = self.pipeline.stages.stage_c
        model = control.model
        stages = self.pipeline.stages
        own = getattr(stages, "controlnets", None) or {}  # kind -> loader: the demo's ControlNets
        if model is None and control.kind in own:
            model = own[control.kind]()
        elif isinstance(model, (str, Path)) and hasattr(stages, "load_controlnet"):  # the demo's own file format
            model = stages.load_controlnet(control.kind, model)
        if isinstance(model, torch.nn.Module):
            check_controlnet(model, control.kind, stage_c)
            return model.eval().requires_grad_(False)
        if model is None:
            options = {k: v for k, v in self.weights_options.items() if k in ("folders", "comfyui", "download")}
            model = locate_controlnet(control.kind, **options).path
        check_controlnet(model, control.kind, stage_c)
        return load_stage("controlnet", model).eval().requires_grad_(False)

    def encode_image(self, image: ImageLike, width: int | None = None, height: int | None = None) -> Any:
        """An image → Stage C latent [B, 16, h, w] (EfficientNet at the official 768-px scale for 1024²)."""
        tensor = _image_tensor(image)
        params = GenerationParams("", width=width or tensor.shape[-1], height=height or tensor.shape[-2])
        return self.pipeline.encode_image_latent(tensor, self._native(params).latent_size_c)

    def _native(self, params: GenerationParams, warn: bool = False) -> GenerationParams:
        """A variant trained at one size (``Stages.native``: the demo's 128 px, compression 16) generates at it."""
        native = getattr(self.pipeline.stages, "native", None)
        if not native:
            return params
        default = GenerationParams("")
        if warn and (params.width, params.height) not in ((default.width, default.height),
                                                          (native["width"], native["height"])):
            warnings.warn(f"variant {self.variant_name!r} makes {native['width']}x{native['height']} images only; "
                          f"generating that size instead of {params.width}x{params.height}", stacklevel=4)
        return params.replace(**native)

    def preview(self, latent_c: Any) -> Any:
        """Stage C latent → small RGB through the Previewer ([B, 3, 8h, 8w] in [0, 1])."""
        return self.pipeline.preview_c(latent_c)


def load_stages(variant: Any, **locate_options: Any) -> Any:
    """Every stage of a file-based variant, located (folder, ComfyUI, Hub cache, download) and lean-loaded."""
    from .models.clip import ImageEncoder, TextEncoder
    from .pipeline import Stages
    from .weights import load_stage, locate

    found = locate(variant, **locate_options)

    def stage(name: str) -> Any:
        return load_stage(name, found[name].path, config=variant.preset(name)) if name in found else None

    comfyui = locate_options.get("comfyui")  # a single-file text encoder may take ComfyUI's bundled tokenizer
    text = TextEncoder.from_path(found["text_encoder"].path, comfyui=comfyui) if "text_encoder" in found else None
    image = ImageEncoder.from_path(found["image_encoder"].path) if "image_encoder" in found else None
    return Stages(stage_c=stage("stage_c"), stage_b=stage("stage_b"), stage_a=stage("stage_a"),
                  text_encoder=text, previewer=stage("previewer"), effnet=stage("effnet"), image_encoder=image,
                  variant=variant.name)


def _control_record(control: Any) -> tuple[str, str, float, float, float, str, str, int, int]:
    """What a PNG keeps of a `Control`: kind, image description, strength, start, end, mask description, model
    file, mask grow and feather (pixels)."""
    from .controls import Control

    if not isinstance(control, Control):
        raise TypeError(f"controls takes cascade_lab.controls.Control records, got {type(control).__name__}")
    control.validate()
    mask = "" if control.mask is None else (control.mask if isinstance(control.mask, str) else
                                            _describe(control.mask) if not isinstance(control.mask, (list, tuple))
                                            else repr(list(control.mask)))
    model = control.model if isinstance(control.model, (str, Path)) else ""
    return (control.kind, _describe(control.image), float(control.strength), float(control.start),
            float(control.end), str(mask), str(model), int(control.grow), int(control.feather))


def _control_from_record(record: tuple[str, str, float, float, float, str, str, int, int]) -> Any:
    """A recorded control back as a `Control` (its image and mask must be files; a content hash is refused)."""
    import ast

    from .controls import Control

    kind, image, strength, start, end, mask, model, grow, feather = record
    for what, value in (("image", image), ("mask", mask)):
        if value.startswith("sha256:"):
            raise ValueError(f"the {kind} control's {what} was an in-memory image ({value}); pass controls=[...] "
                             "to run these parameters again")
    mask_value: Any = ast.literal_eval(mask) if mask.startswith("[") else (mask or None)
    return Control(kind, image, strength, start, end, mask_value, model or None, grow=grow, feather=feather)


def _at_most_one(cfg: Any) -> bool:
    return all(v <= 1 for v in (cfg if isinstance(cfg, tuple) else (cfg,)))


def _prompt_value(name: str, value: Any) -> str | tuple[str, ...]:
    """A prompt argument as GenerationParams takes it: a string, or a tuple with one string per image."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise ValueError(f"{name}={value!r}: give a string, or a non-empty list of strings (one per image)")


def _tensor_hash(tensor: Any) -> str:
    return hashlib.sha256(_latent_tensor(tensor).numpy().tobytes()).hexdigest()[:16]


def _latent_tensor(value: Any) -> Any:
    if value is None:
        return None
    import torch

    tensor = torch.as_tensor(value).detach().float().cpu()
    if tensor.dim() == 3:
        tensor = tensor[None]
    if tensor.dim() != 4:
        raise ValueError(f"init_latent has shape {tuple(tensor.shape)}; give a Stage C latent [B, 16, h, w]")
    return tensor


def _noise_source(params: GenerationParams, noise: Any, initial_noise: Any) -> Any:
    """The `NoiseSource` for a run: the caller's, or the seed's (official or ComfyUI's) with given initial noise."""
    if noise is None and initial_noise is None:
        return None
    from .diffusion.noise import ComfyNoise, NoiseSource, OfficialNoise, RecordedNoise

    if noise is not None and not isinstance(noise, NoiseSource):
        raise TypeError(f"noise={noise!r}: pass a cascade_lab.diffusion.noise.NoiseSource (OfficialNoise, ComfyNoise, "
                        "RecordedNoise or your own subclass)")
    if initial_noise is None:
        return noise
    if params.seed is None and noise is None:
        raise ValueError("initial_noise needs a seed for the rest of the random numbers (per-step noise, Stage B); "
                         "pass seed=... or a full noise=NoiseSource")
    fallback = noise or (ComfyNoise(params.seed, params.seed_b) if params.compat == "comfyui"  # type: ignore[arg-type]
                         else OfficialNoise(params.seed))  # type: ignore[arg-type]
    initial = initial_noise if isinstance(initial_noise, dict) else {"c": initial_noise}
    return RecordedNoise(initial={k: _latent_tensor(v) for k, v in initial.items()}, fallback=fallback)


_default: Cascade | None = None


def generate(prompt: str, **kwargs: Any) -> Any:
    """`Cascade().generate(...)` on a shared default `Cascade` (variant ``auto``)."""
    global _default
    if _default is None:
        _default = Cascade()
    return _default.generate(prompt, **kwargs)
