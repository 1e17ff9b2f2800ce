"""The ComfyUI nodes cascade_lab runs: their inputs (name, type, default, widget order) and outputs, as ComfyUI
declares them. The table drives reading the UI form (``widgets_values`` order), the graph checks and the runner.
No torch here; what each node does is in `cascade_lab.comfyui.execute`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SAMPLERS = ("euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
            "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
            "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
            "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
            "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
            "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
            "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim",
            "uni_pc", "uni_pc_bh2")
SCHEDULERS = ("simple", "normal", "karras", "exponential", "sgm_uniform", "ddim_uniform", "beta", "linear_quadratic",
              "kl_optimal")
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp", "lanczos")
CROP_METHODS = ("disabled", "center")
MASK_CHANNELS = ("alpha", "red", "green", "blue")


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # a ComfyUI type: MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE, MASK, ..., or a widget type
    default: Any = None
    optional: bool = False
    choices: tuple[str, ...] = ()  # COMBO values checked (empty: any string, e.g. a file name)
    seed: bool = False  # followed by the UI's hidden control_after_generate widget

    @property
    def widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class Node:
    inputs: tuple[Input, ...]
    outputs: tuple[tuple[str, str], ...] = ()  # (name, type)
    output: bool = False  # an output node (SaveImage, PreviewImage): what the run is for
    extra_widgets: tuple[str, ...] = ()  # UI-only widgets after the inputs' (LoadImage's "upload")

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)


def _i(name: str, kind: str, default: Any = None, **kw: Any) -> Input:
    return Input(name, kind, default, **kw)


def _combo(name: str, choices: tuple[str, ...] = (), default: Any = None, **kw: Any) -> Input:
    return Input(name, "COMBO", default if default is not None else (choices[0] if choices else None),
                 choices=choices, **kw)


_SAMPLING = (_i("steps", "INT", 20), _i("cfg", "FLOAT", 8.0), _combo("sampler_name", SAMPLERS),
             _combo("scheduler", SCHEDULERS), _i("positive", "CONDITIONING"), _i("negative", "CONDITIONING"),
             _i("latent_image", "LATENT"))
NODES: dict[str, Node] = {
    # models
    "CheckpointLoaderSimple": Node((_combo("ckpt_name"),), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))),
    "unCLIPCheckpointLoader": Node((_combo("ckpt_name"),), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"),
                                                            ("CLIP_VISION", "CLIP_VISION"))),
    "UNETLoader": Node((_combo("unet_name"), _combo("weight_dtype", ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast",
                                                                     "fp8_e5m2"))), (("MODEL", "MODEL"),)),
    "CLIPLoader": Node((_combo("clip_name"), _combo("type", (), "stable_cascade"),
                        _combo("device", ("default", "cpu"), optional=True)), (("CLIP", "CLIP"),)),
    "VAELoader": Node((_combo("vae_name"),), (("VAE", "VAE"),)),
    "CLIPVisionLoader": Node((_combo("clip_name"),), (("CLIP_VISION", "CLIP_VISION"),)),
    "LoraLoader": Node((_i("model", "MODEL"), _i("clip", "CLIP"), _combo("lora_name"),
                        _i("strength_model", "FLOAT", 1.0), _i("strength_clip", "FLOAT", 1.0)),
                       (("MODEL", "MODEL"), ("CLIP", "CLIP"))),
    "LoraLoaderModelOnly": Node((_i("model", "MODEL"), _combo("lora_name"), _i("strength_model", "FLOAT", 1.0)),
                                (("MODEL", "MODEL"),)),
    "ModelSamplingStableCascade": Node((_i("model", "MODEL"), _i("shift", "FLOAT", 2.0)), (("MODEL", "MODEL"),)),
    "ControlNetLoader": Node((_combo("control_net_name"),), (("CONTROL_NET", "CONTROL_NET"),)),
    # conditioning
    "CLIPTextEncode": Node((_i("text", "STRING", ""), _i("clip", "CLIP")), (("CONDITIONING", "CONDITIONING"),)),
    "CLIPVisionEncode": Node((_i("clip_vision", "CLIP_VISION"), _i("image", "IMAGE"),
                              _combo("crop", ("center", "none"))), (("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT"),)),
    "unCLIPConditioning": Node((_i("conditioning", "CONDITIONING"), _i("clip_vision_output", "CLIP_VISION_OUTPUT"),
                                _i("strength", "FLOAT", 1.0), _i("noise_augmentation", "FLOAT", 0.0)),
                               (("CONDITIONING", "CONDITIONING"),)),
    "ConditioningZeroOut": Node((_i("conditioning", "CONDITIONING"),), (("CONDITIONING", "CONDITIONING"),)),
    "ConditioningCombine": Node((_i("conditioning_1", "CONDITIONING"), _i("conditioning_2", "CONDITIONING")),
                                (("CONDITIONING", "CONDITIONING"),)),
    "ConditioningSetTimestepRange": Node((_i("conditioning", "CONDITIONING"), _i("start", "FLOAT", 0.0),
                                          _i("end", "FLOAT", 1.0)), (("CONDITIONING", "CONDITIONING"),)),
    "ControlNetApply": Node((_i("conditioning", "CONDITIONING"), _i("control_net", "CONTROL_NET"),
                             _i("image", "IMAGE"), _i("strength", "FLOAT", 1.0)), (("CONDITIONING", "CONDITIONING"),)),
    "ControlNetApplyAdvanced": Node((_i("positive", "CONDITIONING"), _i("negative", "CONDITIONING"),
                                     _i("control_net", "CONTROL_NET"), _i("image", "IMAGE"),
                                     _i("strength", "FLOAT", 1.0), _i("start_percent", "FLOAT", 0.0),
                                     _i("end_percent", "FLOAT", 1.0), _i("vae", "VAE", optional=True)),
                                    (("positive", "CONDITIONING"), ("negative", "CONDITIONING"))),
    "StableCascade_StageB_Conditioning": Node((_i("conditioning", "CONDITIONING"), _i("stage_c", "LATENT")),
                                              (("CONDITIONING", "CONDITIONING"),)),
    # latents and sampling
    "StableCascade_EmptyLatentImage": Node((_i("width", "INT", 1024), _i("height", "INT", 1024),
                                            _i("compression", "INT", 42), _i("batch_size", "INT", 1)),
                                           (("stage_c", "LATENT"), ("stage_b", "LATENT"))),
    "StableCascade_StageC_VAEEncode": Node((_i("image", "IMAGE"), _i("vae", "VAE"), _i("compression", "INT", 42)),
                                           (("stage_c", "LATENT"), ("stage_b", "LATENT"))),
    "StableCascade_SuperResolutionControlnet": Node((_i("image", "IMAGE"), _i("vae", "VAE")),
                                                    (("controlnet_input", "IMAGE"), ("stage_c", "LATENT"),
                                                     ("stage_b", "LATENT"))),
    "KSampler": Node((_i("model", "MODEL"), _i("seed", "INT", 0, seed=True), *_SAMPLING, _i("denoise", "FLOAT", 1.0)),
                     (("LATENT", "LATENT"),)),
    "KSamplerAdvanced": Node((_i("model", "MODEL"), _combo("add_noise", ("enable", "disable")),
                              _i("noise_seed", "INT", 0, seed=True), *_SAMPLING, _i("start_at_step", "INT", 0),
                              _i("end_at_step", "INT", 10000),
                              _combo("return_with_leftover_noise", ("disable", "enable"))), (("LATENT", "LATENT"),)),
    "VAEDecode": Node((_i("samples", "LATENT"), _i("vae", "VAE")), (("IMAGE", "IMAGE"),)),
    # images and masks
    "LoadImage": Node((_combo("image"),), (("IMAGE", "IMAGE"), ("MASK", "MASK")), extra_widgets=("upload",)),
    "LoadImageMask": Node((_combo("image"), _combo("channel", MASK_CHANNELS)), (("MASK", "MASK"),),
                          extra_widgets=("upload",)),
    "EmptyImage": Node((_i("width", "INT", 512), _i("height", "INT", 512), _i("batch_size", "INT", 1),
                        _i("color", "INT", 0)), (("IMAGE", "IMAGE"),)),
    "ImageScale": Node((_i("image", "IMAGE"), _combo("upscale_method", UPSCALE_METHODS), _i("width", "INT", 512),
                        _i("height", "INT", 512), _combo("crop", CROP_METHODS)), (("IMAGE", "IMAGE"),)),
    "Canny": Node((_i("image", "IMAGE"), _i("low_threshold", "FLOAT", 0.4), _i("high_threshold", "FLOAT", 0.8)),
                  (("IMAGE", "IMAGE"),)),
    "JoinImageWithAlpha": Node((_i("image", "IMAGE"), _i("alpha", "MASK")), (("IMAGE", "IMAGE"),)),
    "GrowMask": Node((_i("mask", "MASK"), _i("expand", "INT", 0), _i("tapered_corners", "BOOLEAN", True)),
                     (("MASK", "MASK"),)),
    "InvertMask": Node((_i("mask", "MASK"),), (("MASK", "MASK"),)),
    "ThresholdMask": Node((_i("mask", "MASK"), _i("value", "FLOAT", 0.5)), (("MASK", "MASK"),)),
    "MaskToImage": Node((_i("mask", "MASK"),), (("IMAGE", "IMAGE"),)),
    "ImageToMask": Node((_i("image", "IMAGE"), _combo("channel", ("red", "green", "blue", "alpha"))),
                        (("MASK", "MASK"),)),
    "ImageBlur": Node((_i("image", "IMAGE"), _i("blur_radius", "INT", 1), _i("sigma", "FLOAT", 1.0)),
                      (("IMAGE", "IMAGE"),)),
    "ImageCompositeMasked": Node((_i("destination", "IMAGE"), _i("source", "IMAGE"), _i("x", "INT", 0),
                                  _i("y", "INT", 0), _i("resize_source", "BOOLEAN", False),
                                  _i("mask", "MASK", optional=True)), (("IMAGE", "IMAGE"),)),
    # outputs
    "SaveImage": Node((_i("images", "IMAGE"), _i("filename_prefix", "STRING", "ComfyUI")), output=True),
    "PreviewImage": Node((_i("images", "IMAGE"),), output=True),
}

# custom nodes seen in shared Stable Cascade workflows, and the built-in node that does the job
ADVICE: dict[str, str] = {
    "CannyEdgePreprocessor": "replace it by the built-in Canny node (image → Canny → ControlNetApplyAdvanced)",
    "Canny Edge": "replace it by the built-in Canny node",
    "KSampler (Efficient)": "replace it by the built-in KSampler",
    "KSampler Adv. (Efficient)": "replace it by the built-in KSamplerAdvanced",
    "Efficient Loader": "replace it by CheckpointLoaderSimple + CLIPTextEncode nodes",
    "CR Apply LoRA Stack": "replace it by one LoraLoader node per LoRA",
    "LoraLoader|pysssss": "replace it by the built-in LoraLoader",
    "CheckpointLoader|pysssss": "replace it by the built-in CheckpointLoaderSimple",
    "Image Resize": "replace it by the built-in ImageScale",
    "ImageResize+": "replace it by the built-in ImageScale",
    "SDXLPromptStyler": "write the styled prompt into a CLIPTextEncode node",
    "ShowText|pysssss": "delete it (it only displays text)",
    "Image Save": "replace it by the built-in SaveImage",
    "VAEDecodeTiled": "replace it by VAEDecode",
    "EmptyLatentImage": "Stable Cascade needs StableCascade_EmptyLatentImage (two latents: stage_c, stage_b)",
    "VAEEncode": "Stable Cascade needs StableCascade_StageC_VAEEncode (it makes the stage_c and stage_b latents)",
}


def widget_names(class_type: str) -> list[str | None]:
    """The names of a node's ``widgets_values`` entries in order (None: the UI-only control_after_generate)."""
    spec = NODES[class_type]
    names: list[str | None] = []
    for inp in spec.inputs:
        if inp.widget:
            names.append(inp.name)
            if inp.seed:
                names.append(None)
    return [*names, *spec.extra_widgets]
