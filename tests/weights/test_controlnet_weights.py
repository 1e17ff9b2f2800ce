"""ControlNet files found like the stages (path, folders, ComfyUI, Hub cache, download), checked from the header
against their kind and the Stage C, and counted in memory estimates. Nothing here downloads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from weights_helpers import cache_file, manifest_shapes, offline_hub, write_sparse

from cascade_lab.builtins.variants import VARIANTS
from cascade_lab.weights.controlnets import _config_widths, check_controlnet, locate_controlnet, stage_c_widths
from cascade_lab.weights.locate import WeightsNotFoundError
from cascade_lab.weights.memory import ComputeDtypes, GiB, choose_variant, estimate
from cascade_lab.weights.safetensors_io import read_header

REPO = "stabilityai/stable-cascade"
SHIPPED = (0, 4, 8, 12, 51, 55, 59, 63)


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offline_hub(tmp_path, monkeypatch)


def controlnet_file(path: Path, kind: str, c_proj: int = 2048) -> Path:
    """A header-true (sparse) ControlNet of the real layout; c_proj changes the output width of each projection."""
    shapes = manifest_shapes(f"controlnet_{kind}")
    for key, shape in shapes.items():
        if key.startswith("projections.") and key.endswith(".2.weight"):
            shapes[key] = (c_proj, *shape[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_sparse(path, shapes, "float32")


def test_found_in_order_path_folder_comfyui_then_cache(hf_home: Path, tmp_path: Path) -> None:
    cached = controlnet_file(cache_file(hf_home, REPO, "controlnet/canny.safetensors"), "canny")  # the Hub layout
    models = tmp_path / "ComfyUI" / "models"
    comfy = controlnet_file(models / "controlnet" / "stable_cascade_canny.safetensors", "canny")
    clone = controlnet_file(tmp_path / "clone" / "controlnet" / "canny.safetensors", "canny")
    flat = controlnet_file(tmp_path / "flat" / "canny.safetensors", "canny")
    mine = controlnet_file(tmp_path / "mine.safetensors", "canny")

    def where(**kw) -> tuple[str, Path]:
        hit = locate_controlnet("canny", download=False, **kw)
        return hit.origin, hit.path

    assert where() == ("hf_cache", cached)
    assert where(comfyui=tmp_path / "ComfyUI") == ("comfyui", comfy)
    assert where(comfyui=models, folders=[clone.parent.parent]) == ("folder", clone)
    assert where(folders=[flat.parent]) == ("folder", flat)
    assert where(comfyui=models, folders=[clone.parent.parent], path=mine) == ("explicit", mine)


def test_comfyui_from_the_environment_and_a_file_of_another_kind_is_skipped(hf_home: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    models = tmp_path / "ComfyUI" / "models"
    controlnet_file(models / "controlnet" / "stable_cascade_inpainting.safetensors", "canny")  # misnamed
    sr = controlnet_file(models / "controlnet" / "stable_cascade_super_resolution.safetensors", "super_resolution")
    monkeypatch.setenv("CASCADE_LAB_COMFYUI", str(tmp_path / "ComfyUI"))
    assert locate_controlnet("super_resolution").path == sr
    with pytest.raises(WeightsNotFoundError) as e:
        locate_controlnet("inpainting")
    assert "stable_cascade_inpainting.safetensors (skipped: it holds ControlNet, canny" in str(e.value)


def test_missing_is_one_error_listing_every_place(hf_home: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "controlnet").mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError) as e:
        locate_controlnet("inpainting", folders=[tmp_path / "mine"], comfyui=models)
    msg = str(e.value)
    assert msg.startswith("Stable Cascade inpainting ControlNet: 1 file(s) not found (HF_HUB_OFFLINE is set")
    assert f"  controlnet_inpainting: controlnet/inpainting.safetensors from {REPO}" in msg
    mine = tmp_path / "mine"
    for place in (mine / "controlnet" / "inpainting.safetensors", mine / "inpainting.safetensors",
                  models / "controlnet" / "stable_cascade_inpainting.safetensors"):
        assert f"looked in {place}\n" in msg
    assert f"looked in Hugging Face cache {hf_home / 'hub' / 'models--stabilityai--stable-cascade'}" in msg
    assert f"hf download {REPO} controlnet/inpainting.safetensors" in msg
    assert "path='/path/to/inpainting.safetensors'" in msg and "unset HF_HUB_OFFLINE" in msg
    with pytest.raises(WeightsNotFoundError, match="the file given for it does not exist"):
        locate_controlnet("canny", path=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="ControlNet kind 'identity': use one of canny, inpainting, super_resolution"):
        locate_controlnet("identity")


def test_downloads_only_that_file(hf_home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_download(repo_id, filename, *, subfolder=None, cache_dir=None, **kw):
        calls.append((repo_id, subfolder, filename))
        return str(cache_file(hf_home, repo_id, f"{subfolder}/{filename}"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hit = locate_controlnet("super_resolution")
    assert calls == [(REPO, "controlnet", "super_resolution.safetensors")] and hit.origin == "download"
    with pytest.raises(WeightsNotFoundError, match="downloading was turned off"):
        locate_controlnet("canny", download=False)
    assert len(calls) == 1


def test_wrong_kind_or_not_a_controlnet_is_refused(tmp_path: Path) -> None:
    canny = controlnet_file(tmp_path / "canny.safetensors", "canny")
    with pytest.raises(ValueError) as e:
        check_controlnet(canny, "inpainting", "full")
    msg = str(e.value)
    assert f"ControlNet {str(canny)!r} is a canny ControlNet (1 input channel(s)), not inpainting (which takes 4)" \
        in msg
    assert "kind='canny'" in msg and "controlnet/inpainting.safetensors" in msg
    stage_b = write_sparse(tmp_path / "stage_b.safetensors", manifest_shapes("stage_b_lite"))
    with pytest.raises(ValueError, match=r"stage_b.safetensors is not a ControlNet: it holds Stage B .*canny file"):
        check_controlnet(stage_b, "canny", "full")


@pytest.mark.parametrize("kind", ["canny", "inpainting", "super_resolution"])
def test_shipped_controlnets_fit_the_full_stage_c_from_the_header(tmp_path: Path, kind: str) -> None:
    from cascade_lab.models.stage_c import StageCConfig

    path = controlnet_file(tmp_path / f"{kind}.safetensors", kind)
    shape = check_controlnet(path, kind, StageCConfig.full())
    assert (shape.c_in, shape.c_proj, shape.proj_blocks) == ({"canny": 1, "inpainting": 4,
                                                              "super_resolution": 16}[kind], 2048, SHIPPED)
    assert check_controlnet(read_header(path), kind, "full") == shape  # a parsed header works too


def test_c_proj_that_does_not_match_the_lite_stage_c(tmp_path: Path) -> None:
    from cascade_lab.models.stage_c import StageCConfig

    path = controlnet_file(tmp_path / "canny.safetensors", "canny")
    with pytest.raises(ValueError) as e:
        check_controlnet(path, "canny", StageCConfig.lite())
    assert str(e.value) == (f"ControlNet {str(path)!r} was built for the 3.6B Stage C (c_proj 2048) but the loaded "
                            "Stage C (lite) is 1536 wide; use variant full/bf16 (the 3.6B Stage C) with it")


def test_blocks_beyond_the_stage_c_are_refused(tmp_path: Path) -> None:
    path = controlnet_file(tmp_path / "canny_1536.safetensors", "canny", c_proj=1536)  # lite width, full blocks
    with pytest.raises(ValueError) as e:
        check_controlnet(path, "canny", "lite")
    assert str(e.value) == (f"ControlNet {str(path)!r} feeds Stage C ResBlock calls [51, 55, 59, 63], but the "
                            "loaded Stage C (lite) has only 32; give a ControlNet trained for this Stage C")
    assert check_controlnet(path, "canny", "lite", proj_blocks=[0, 31]).proj_blocks == (0, 31)


def test_modules_and_stage_c_modules_are_checked_the_same(tmp_path: Path) -> None:
    import torch

    from cascade_lab.models.controlnet import ControlNetConfig
    from cascade_lab.models.stage_c import StageCConfig

    with torch.device("meta"):
        net = ControlNetConfig.inpainting().build()
        lite = StageCConfig.lite().build()
    assert check_controlnet(net, "inpainting", "full").proj_blocks == SHIPPED
    with pytest.raises(ValueError, match=r"the ControlNet module was built for the 3\.6B Stage C \(c_proj 2048\) but "
                                         r"the loaded Stage C \(lite\) is 1536 wide"):
        check_controlnet(net, "inpainting", lite)
    with pytest.raises(ValueError, match="the ControlNet module is an inpainting ControlNet"):
        check_controlnet(net, "canny", "full")
    fake = SimpleNamespace(c_in=16, c_proj=2048, proj_blocks=list(SHIPPED))
    assert check_controlnet(fake, "super_resolution", "full").c_in == 16


@pytest.mark.parametrize("preset", ["tiny", "lite"])
def test_widths_from_a_config_match_the_built_stage_c(preset: str) -> None:
    import torch

    from cascade_lab.models.stage_c import StageCConfig

    cfg = getattr(StageCConfig, preset)()
    with torch.device("meta"):
        model = cfg.build()
    assert _config_widths(cfg) == model.control_widths()
    assert stage_c_widths(SimpleNamespace(load=None, config=cfg))[1] == model.control_widths()  # a Lazy stage
    assert stage_c_widths("full") == ("full", [2048] * 64)


BF16 = ComputeDtypes("bfloat16", "bfloat16", "bfloat16")
FP32_C = ComputeDtypes("float32", "float16", "float16")
BF16_VARIANT = next(v for v in VARIANTS if v.name == "bf16")


def test_memory_estimate_grows_by_the_controlnet_file(tmp_path: Path) -> None:
    path = controlnet_file(tmp_path / "canny.safetensors", "canny")  # float32, as the official files
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    base = estimate(BF16_VARIANT, FP32_C)
    with_file = estimate(BF16_VARIANT, FP32_C, controls=[path])
    assert with_file.controlnets == path.stat().st_size - header_bytes  # fp32 compute: exactly its data
    assert with_file.resident - base.resident == with_file.controlnets
    assert with_file.swapped == base.swapped  # it runs before Stage C, never beside it
    assert "ControlNets 0.20 GiB" in with_file.describe()


def test_memory_estimate_of_kinds_uses_the_official_sizes() -> None:
    base = estimate(BF16_VARIANT, BF16)
    both = estimate(BF16_VARIANT, BF16, controls=("canny", "super_resolution"))
    assert both.controlnets == (54_409_758 + 203_491_584) * 2
    assert both.resident == base.resident + both.controlnets
    with pytest.raises(ValueError, match="control 'depth': give a kind"):
        estimate(BF16_VARIANT, BF16, controls=("depth",))
    fits = int(base.resident + GiB * 0.1)  # bf16 fits all resident without, not with the two ControlNets
    assert choose_variant("cuda:0", available=fits, swap=False, variants=[BF16_VARIANT], dtypes=BF16).variant == "bf16"
    assert choose_variant("cuda:0", available=fits, swap=False, variants=[BF16_VARIANT], dtypes=BF16,
                          controls=("canny", "super_resolution")).variant is None


def test_the_demo_controlnet_loads_by_file_and_names_its_variant_when_it_does_not_fit() -> None:
    """load_stage("controlnet", <demo file>) gives the demo's module (its stem is not the official one); on another
    Stage C the refusal says it is the demo's own ControlNet and which variant takes it."""
    from cascade_lab.demo.models import DemoControlNet, controlnet_file
    from cascade_lab.models.stage_c import StageCConfig
    from cascade_lab.weights import load_stage

    path = controlnet_file("canny")
    net = load_stage("controlnet", path)
    assert isinstance(net, DemoControlNet) and not net.training
    for source in (path, net):
        with pytest.raises(ValueError, match=r"demo variant's own ControlNet: use it with variant 'demo'"):
            check_controlnet(source, "canny", StageCConfig.tiny().build())
