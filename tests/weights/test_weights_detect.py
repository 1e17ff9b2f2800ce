"""Detection from the safetensors header alone: stage, size variant, layout and all-in-one prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import reference_dir
from weights_helpers import manifest_shapes, write_sparse

from cascade_lab.weights import safetensors_io
from cascade_lab.weights.detect import classify, detect, detect_shapes

FIXTURES = {
    "stage_c_tiny": ("stage_c", None),
    "stage_b_tiny": ("stage_b", None),
    "stage_a_tiny": ("stage_a", None),
    "effnet_encoder": ("effnet", None),
    "previewer": ("previewer", None),
    "controlnet_tiny": ("controlnet", None),
}
MANIFESTS = {
    "stage_c_full": ("stage_c", "full"),
    "stage_c_lite": ("stage_c", "lite"),
    "stage_b_full": ("stage_b", "full"),
    "stage_b_lite": ("stage_b", "lite"),
    "stage_a": ("stage_a", None),
    "effnet_encoder": ("effnet", None),
    "previewer": ("previewer", None),
    "controlnet_canny": ("controlnet", "canny"),
    "controlnet_inpainting": ("controlnet", "inpainting"),
    "controlnet_super_resolution": ("controlnet", "super_resolution"),
    "controlnet_identity": ("controlnet", "identity"),
}


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_fixtures_are_recognised(name: str) -> None:
    kind, variant = FIXTURES[name]
    d = detect(reference_dir("fixtures", name) / "weights.safetensors")
    assert list(d.components) == [kind]
    assert d.components[kind].variant == variant
    assert d.components[kind].layout == "official"


def test_tiny_sizes_are_reported_as_custom_widths() -> None:
    d = detect(reference_dir("fixtures", "stage_c_tiny") / "weights.safetensors")
    assert d.components["stage_c"].width == 40
    assert "custom width 40" in d.describe()


@pytest.mark.parametrize("name", MANIFESTS)
def test_real_layouts_give_stage_and_variant(name: str) -> None:
    kind, variant = MANIFESTS[name]
    comps = detect_shapes(manifest_shapes(name))
    assert list(comps) == [kind] and comps[kind].variant == variant


def test_detection_reads_only_the_header_of_a_full_size_file(tmp_path: Path, monkeypatch) -> None:
    path = write_sparse(tmp_path / "stage_c_bf16.safetensors", manifest_shapes("stage_c_full"))
    assert path.stat().st_size > 7_000_000_000  # the real 7.18 GB layout (a sparse file)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    read = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(safetensors_io, "open", lambda p, mode="r", **kw: Counting(open(p, mode, **kw)),
                        raising=False)
    d = detect(path)
    assert d.components["stage_c"].variant == "full" and d.dtype == "bfloat16"
    assert sum(read) == 8 + header_len


@pytest.mark.parametrize("stage,name,key", [
    ("stage_b", "stage_b_lite", "clip_mapper."),
    ("stage_c", "stage_c_lite", "clip_txt_mapper."),
    ("stage_c", "stage_c_full", "clip_"),
])
def test_fine_tunes_without_conditioning_mappers_are_still_detected(stage: str, name: str, key: str) -> None:
    shapes = {k: s for k, s in manifest_shapes(name).items() if not k.startswith(key)}
    comp = classify(shapes)
    assert comp is not None and comp.kind == stage
    assert comp.variant == name.rsplit("_", 1)[1]


def _split(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """ComfyUI's layout: prefix, and in_proj [3c, c] split into attn.to_q/to_k/to_v [c, c]."""
    out = {}
    for k, s in shapes.items():
        if ".in_proj_" in k:
            stem, what = k.rsplit(".in_proj_", 1)
            for part in "qkv":
                out[f"{prefix}{stem}.to_{part}.{what}"] = (s[0] // 3, *s[1:])
        else:
            out[prefix + k] = s
    return out


def test_comfyui_all_in_one_stage_c_checkpoint() -> None:
    shapes = _split(manifest_shapes("stage_c_full"), "model.diffusion_model.")
    shapes |= {"vae.encoder." + k: s for k, s in manifest_shapes("effnet_encoder").items()}
    shapes |= {"vae.previewer." + k: s for k, s in manifest_shapes("previewer").items()}
    shapes["text_encoder.clip_g.transformer.text_model.final_layer_norm.weight"] = (1280,)
    shapes["clip_l_vision.vision_model.embeddings.patch_embedding.weight"] = (1024, 3, 14, 14)
    comps = detect_shapes(shapes)
    assert {k: (c.prefix, c.variant) for k, c in comps.items()} == {
        "stage_c": ("model.diffusion_model.", "full"),
        "text_encoder": ("text_encoder.", None),
        "image_encoder": ("clip_l_vision.", None),
        "effnet": ("vae.encoder.", None),
        "previewer": ("vae.previewer.", None),
    }
    assert comps["stage_c"].layout == "comfyui"


def test_comfyui_all_in_one_stage_b_checkpoint() -> None:
    shapes = _split(manifest_shapes("stage_b_lite"), "model.diffusion_model.")
    shapes |= {"vae." + k: s for k, s in manifest_shapes("stage_a").items()}
    comps = detect_shapes(shapes)
    assert {k: (c.prefix, c.variant) for k, c in comps.items()} == {
        "stage_b": ("model.diffusion_model.", "lite"), "stage_a": ("vae.", None)}


def test_diffusers_layouts() -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    for k, s in manifest_shapes("stage_b_full").items():
        k = k.replace("attention.attn.out_proj.", "attention.to_out.0.")
        k = k.replace("clip_mapper.", "clip_txt_pooled_mapper.")
        if ".in_proj_" in k:
            stem, what = k.rsplit(".attn.in_proj_", 1)
            shapes |= {f"{stem}.to_{p}.{what}": (s[0] // 3, *s[1:]) for p in "qkv"}
        else:
            shapes[k] = s
    comp = classify(shapes)
    assert comp is not None and (comp.kind, comp.variant, comp.layout) == ("stage_b", "full", "diffusers")
    vq = {k.replace("vquantizer.codebook.", "vquantizer.embedding."): s for k, s in manifest_shapes("stage_a").items()}
    comp = classify(vq)
    assert comp is not None and (comp.kind, comp.layout) == ("stage_a", "diffusers")


def test_unrelated_files_hold_nothing(tmp_path: Path) -> None:
    d = detect(write_sparse(tmp_path / "sd15.safetensors", {"conv_in.weight": (320, 4, 3, 3)}))
    assert d.components == {} and d.describe() == "no Stable Cascade model"
