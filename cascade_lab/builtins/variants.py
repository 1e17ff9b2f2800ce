"""The official weight variants (HF ``stabilityai/stable-cascade``), the ``tiny`` test variant and the ``demo``."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import LazyCallable, Variant, VariantFile

# values stored per file, from ../shared/reference/manifests/summary.json (parameters + buffers)
STAGE_C_FULL, STAGE_C_LITE = 3_589_103_632, 1_030_785_040
STAGE_B_FULL, STAGE_B_LITE = 1_562_941_136, 699_471_248
STAGE_A, EFFNET, PREVIEWER = 18_406_903, 20_351_983, 3_983_755
TEXT_ENCODER = 694_659_840  # CLIP ViT-bigG/14 text tower with projection
IMAGE_ENCODER = 303_966_976  # CLIP ViT-L/14 vision tower with projection

SHARED = {
    "stage_a": VariantFile("stage_a.safetensors", params=STAGE_A),
    "effnet": VariantFile("effnet_encoder.safetensors", params=EFFNET),
    "previewer": VariantFile("previewer.safetensors", params=PREVIEWER),
    "text_encoder": VariantFile("model.safetensors", subfolder="text_encoder", dtype="bfloat16",
                                params=TEXT_ENCODER),
    "image_encoder": VariantFile("model.safetensors", repo_id="stabilityai/stable-cascade-prior",
                                 subfolder="image_encoder", dtype="float32", params=IMAGE_ENCODER),
}


def official(name: str, description: str, size: str, dtype: str) -> Variant:
    suffix = "" if size == "full" else "_lite"
    suffix += "_bf16" if dtype == "bfloat16" else ""
    c, b = (STAGE_C_FULL, STAGE_B_FULL) if size == "full" else (STAGE_C_LITE, STAGE_B_LITE)
    files = {
        "stage_c": VariantFile(f"stage_c{suffix}.safetensors", dtype=dtype, params=c),
        "stage_b": VariantFile(f"stage_b{suffix}.safetensors", dtype=dtype, params=b),
        **SHARED,
    }
    return Variant(name, description, files, stage_c=size, stage_b=size)


VARIANTS = [
    official("full", "Stage C 3.6B + Stage B 1.5B, fp32 files (best quality, ~21 GB)", "full", "float32"),
    official("bf16", "Stage C 3.6B + Stage B 1.5B, bf16 files (~10 GB)", "full", "bfloat16"),
    official("lite", "Stage C 1B + Stage B 700M, fp32 files (~7 GB)", "lite", "float32"),
    official("lite_bf16", "Stage C 1B + Stage B 700M, bf16 files (~3.5 GB)", "lite", "bfloat16"),
    Variant("tiny", "random-weight tiny models of every stage from a fixed seed (tests, offline demos)",
            stage_c="tiny", stage_b="tiny", build=LazyCallable("cascade_lab.models.tiny:build_tiny")),
    Variant("demo", "a small cascade trained by cascade_lab on a synthetic world of coloured shapes (128 px, "
            "shipped in the package; what `auto` uses offline)", stage_c="demo", stage_b="demo",
            build=LazyCallable("cascade_lab.demo.models:build_demo")),
]


@hookimpl
def register_variants(register: Callable[[Variant], None]) -> None:
    for variant in VARIANTS:
        register(variant)
