"""ControlNets in the pipeline (issue 16, part 1): each runs once, its features reach the cond and uncond rows of
Stage C, strength scales them, start/end switch them on the right steps, several controls add, with any sampler."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from cascade_lab import Cascade
from cascade_lab.controls import Control
from cascade_lab.models.controlnet import ControlNet
from cascade_lab.pipeline import ControlInput

SMALL = dict(width=128, height=128, steps_c=4, steps_b=1, seed=3)


@pytest.fixture(scope="module")
def cascade() -> Cascade:
    return Cascade("tiny")


def tiny_controlnet(seed: int) -> ControlNet:
    """Feeds the first and the last of the tiny Stage C's six ResBlock calls (both 32 wide)."""
    torch.manual_seed(seed)
    net = ControlNet(c_in=3, c_proj=32, proj_blocks=[0, 5], bottleneck_mode="simple").eval()
    for p in net.parameters():  # the official init zeroes the projections; random ones make the effect visible
        torch.nn.init.normal_(p, std=0.2)
    return net


class Recorder:
    """Wraps Stage C's forward: the cnet list (or None) of every model call, and ControlNet call counts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cascade: Cascade) -> None:
        self.cnets: list[Any] = []
        stage_c = cascade.pipeline.stages.stage_c
        original = stage_c.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.cnets.append(kwargs.get("cnet"))
            return original(*args, **kwargs)

        monkeypatch.setattr(stage_c, "forward", forward)


def run(cascade: Cascade, controls: list[ControlInput], **kwargs: Any) -> Any:
    from cascade_lab.params import GenerationParams

    params = GenerationParams("a red circle", **{**SMALL, **kwargs})
    return cascade.pipeline.run(params, controls=controls)


def test_features_reach_both_cfg_rows_and_strength_scales_them(monkeypatch: pytest.MonkeyPatch,
                                                                cascade: Cascade) -> None:
    net, image = tiny_controlnet(0), torch.rand(1, 3, 128, 128)
    calls = []
    original = net.forward
    monkeypatch.setattr(net, "forward", lambda x: calls.append(1) or original(x))
    rec = Recorder(monkeypatch, cascade)
    run(cascade, [ControlInput(net, image, strength=1.0)], batch_size=2)
    assert len(calls) == 1  # the ControlNet runs once per generation
    cnet = rec.cnets[0]
    assert len(cnet) == 6 and cnet[1] is None and cnet[0].shape[0] == 4  # [cond rows; uncond rows] of batch 2
    torch.testing.assert_close(cnet[0][:2], cnet[0][2:])  # the same features for cond and uncond, as official
    assert all(torch.equal(c[0], cnet[0]) for c in rec.cnets)  # the same list at every step
    rec.cnets.clear()
    run(cascade, [ControlInput(net, image, strength=0.5)], batch_size=2)
    torch.testing.assert_close(rec.cnets[0][0], cnet[0] * 0.5)
    torch.testing.assert_close(rec.cnets[0][5], cnet[5] * 0.5)


def test_start_and_end_switch_the_control_on_the_right_steps(monkeypatch: pytest.MonkeyPatch,
                                                             cascade: Cascade) -> None:
    net, image = tiny_controlnet(1), torch.rand(1, 3, 128, 128)
    rec = Recorder(monkeypatch, cascade)
    run(cascade, [ControlInput(net, image, start=0.25, end=0.5)])  # 4 steps: done = 0, .25, .5, .75
    assert [c is not None for c in rec.cnets] == [False, True, True, False]
    assert Control("canny", image, start=0.25, end=0.5).active(0.75)  # the API record's rule is the same


def test_two_controls_add(monkeypatch: pytest.MonkeyPatch, cascade: Cascade) -> None:
    a, b, image = tiny_controlnet(2), tiny_controlnet(3), torch.rand(1, 3, 128, 128)
    rec = Recorder(monkeypatch, cascade)
    run(cascade, [ControlInput(a, image)])
    run(cascade, [ControlInput(b, image, strength=0.7)])
    run(cascade, [ControlInput(a, image), ControlInput(b, image, strength=0.7)])
    steps = SMALL["steps_c"]
    first, second, both = rec.cnets[0], rec.cnets[steps], rec.cnets[2 * steps]
    torch.testing.assert_close(both[0], first[0] + second[0])
    torch.testing.assert_close(both[5], first[5] + second[5])


@pytest.mark.parametrize("sampler", ["ddpm", "comfyui.euler_ancestral", "dpmpp_2m_sde", "uni_pc"])
def test_controls_move_the_result_with_every_sampler_family(cascade: Cascade, sampler: str) -> None:
    net, image = tiny_controlnet(4), torch.rand(1, 3, 128, 128)
    plain = run(cascade, [], sampler_c=sampler)
    controlled = run(cascade, [ControlInput(net, image)], sampler_c=sampler)
    zero = run(cascade, [ControlInput(net, image, strength=0.0)], sampler_c=sampler)
    assert not torch.allclose(plain.latent_c, controlled.latent_c)
    torch.testing.assert_close(zero.latent_c, plain.latent_c)  # strength 0: features of zero


def test_control_record_checks_its_values() -> None:
    image = torch.rand(1, 3, 8, 8)
    assert Control("canny", image).validate().kind == "canny"
    with pytest.raises(ValueError, match="use one of canny, inpainting, super_resolution .*withdrawn"):
        Control("identity", image).validate()
    with pytest.raises(ValueError, match="start=0.6, end=0.5"):
        Control("canny", image, start=0.6, end=0.5).validate()
    with pytest.raises(ValueError, match="strength=nan"):
        Control("canny", image, strength=float("nan")).validate()
    with pytest.raises(ValueError, match="needs a mask"):
        Control("inpainting", image).validate()


# -- from the API: filters, checks, composite, PNG record ---------------------------------------------------------
def tiny_kind(kind: str, seed: int = 5) -> ControlNet:
    c_in = {"canny": 1, "inpainting": 4, "super_resolution": 16}[kind]
    torch.manual_seed(seed)
    net = ControlNet(c_in=c_in, c_proj=32, proj_blocks=[0, 5], bottleneck_mode="simple").eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net


def square(size: int = 128) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[..., 32:96, 32:96] = 1.0
    return image


def test_generate_with_a_canny_control(cascade: Cascade) -> None:
    plain = cascade.generate("x", width=128, height=128, steps_c=3, steps_b=1, seed=2)
    result = cascade.generate("x", width=128, height=128, steps_c=3, steps_b=1, seed=2,
                              controls=[Control("canny", square(), strength=0.8, end=0.5, model=tiny_kind("canny"))])
    assert not torch.equal(plain.latent_c, result.latent_c)
    [record] = result.params.controls
    assert record[0] == "canny" and record[1].startswith("sha256:") and record[2:5] == (0.8, 0.0, 0.5)


def test_inpainting_keeps_the_original_outside_the_mask(cascade: Cascade) -> None:
    original = torch.rand(1, 3, 128, 128)
    boxes = [(40, 40, 88, 88)]
    result = cascade.generate("x", width=128, height=128, steps_c=3, steps_b=1, seed=2,
                              controls=[Control("inpainting", original, mask=boxes, model=tiny_kind("inpainting"))])
    import numpy as np

    pixels = torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1).float() / 255
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[40:88, 40:88] = False
    torch.testing.assert_close(pixels[:, outside], original[0][:, outside], atol=0.5 / 255 + 1e-6, rtol=0)
    assert not torch.allclose(pixels[:, ~outside], original[0][:, ~outside], atol=0.05)


def test_inpainting_mask_grows_for_the_controlnet_and_feathers_the_composite(monkeypatch: pytest.MonkeyPatch,
                                                                            cascade: Cascade) -> None:
    """``grow`` widens the mask the ControlNet sees (its 4th channel); ``feather`` only softens the composite:
    far outside the grown mask the original stays exact, at its edge the two blend, and the record keeps both."""
    import numpy as np

    from cascade_lab.params import GenerationParams

    original, net = torch.rand(1, 3, 128, 128), tiny_kind("inpainting")
    seen = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: seen.append(x.clone()) or forward(x))
    control = Control("inpainting", original, mask=[(48, 48, 80, 80)], model=net, grow=8, feather=6)
    result = cascade.generate("x", width=128, height=128, steps_c=2, steps_b=1, seed=4, controls=[control])
    mask = seen[0][0, 3]
    assert mask[40:88, 40:88].eq(1).all() and mask.sum() == 48 * 48  # grown by 8 px on every side
    pixels = torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1).float() / 255
    far = torch.ones(128, 128, dtype=torch.bool)
    far[28:100, 28:100] = False  # beyond the grown box plus the feather's reach
    torch.testing.assert_close(pixels[:, far], original[0][:, far], atol=0.5 / 255 + 1e-6, rtol=0)
    assert result.params.controls[0][7:] == (8, 6)
    back = GenerationParams.from_json(result.params.to_json())
    assert back.controls == result.params.controls
    with pytest.raises(ValueError, match="feather=-1"):
        Control("inpainting", original, mask=[(0, 0, 8, 8)], feather=-1).validate()
    with pytest.raises(ValueError, match="for the inpainting mask, not a canny control"):
        Control("canny", original, grow=3).validate()
    old = json.loads(result.params.to_json())  # a PNG written before grow/feather kept 7 fields per control
    old["controls"] = [c[:7] for c in old["controls"]]
    assert GenerationParams.from_json(json.dumps(old)).controls[0][7:] == (0, 0)


def test_control_mistakes_are_refused_before_sampling(cascade: Cascade) -> None:
    with pytest.raises(ValueError, match="is empty"):
        cascade.generate("x", width=128, height=128, steps_c=2, steps_b=1,
                         controls=[Control("inpainting", square(), mask=torch.zeros(1, 1, 128, 128),
                                           model=tiny_kind("inpainting"))])
    with pytest.raises(ValueError, match="canny"):  # an inpainting network given as canny
        cascade.generate("x", width=128, height=128, steps_c=2, steps_b=1,
                         controls=[Control("canny", square(), model=tiny_kind("inpainting"))])
    with pytest.raises(TypeError, match="Control records"):
        cascade.generate("x", controls=[("canny", "a.png")])


def test_shipped_controlnets_fit_the_full_stage_c_and_are_refused_on_lite() -> None:
    """The shipped ControlNets feed 8 of the 3.6B Stage C's 64 ResBlock calls at width 2048 (c_proj 2048)."""
    from cascade_lab.models.controlnet import ControlNetConfig
    from cascade_lab.models.stage_c import StageCConfig
    from cascade_lab.weights.controlnets import check_controlnet

    with torch.device("meta"):
        full, lite = StageCConfig.full().build(), StageCConfig.lite().build()
        canny = ControlNet(**ControlNetConfig.canny().kwargs())
    assert full.control_widths() == [2048] * 64 and len(lite.control_widths()) == 32
    check_controlnet(canny, "canny", full)
    with pytest.raises(ValueError, match="built for the 3.6B Stage C .*c_proj 2048.* is 1536 wide; use variant"):
        check_controlnet(canny, "canny", lite)  # the lite Stage C has 32 calls: blocks 51..63 do not exist


def test_a_control_without_a_file_is_looked_for_like_the_stages(tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """No model=: the ControlNet file is searched (folders, ComfyUI, Hub cache); missing, one error says where."""
    from cascade_lab.weights import WeightsNotFoundError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cascade = Cascade("tiny", folders=[str(tmp_path)], download=False)
    with pytest.raises(WeightsNotFoundError, match="canny ControlNet.*not found") as info:
        cascade.generate("x", width=128, height=128, steps_c=2, steps_b=1,
                         controls=[Control("canny", square())])
    assert str(tmp_path) in str(info.value)


def test_super_resolution_control_feeds_the_effnet_latent_of_the_low_image(monkeypatch: pytest.MonkeyPatch,
                                                                         cascade: Cascade) -> None:
    """The official 2× recipe: the half-size image's EfficientNet latent, 2× nearest, into the large-bottleneck
    ControlNet (a simple one here), at the generation size; Stage C CFG 1 as the official settings say."""
    from cascade_lab.controls.filters import super_resolution_settings

    seen = []
    net = tiny_kind("super_resolution")
    original = net.forward
    monkeypatch.setattr(net, "forward", lambda x: seen.append(x.shape) or original(x))
    settings = super_resolution_settings((64, 64))
    assert (settings["width"], settings["height"], settings["cfg_c"]) == (128, 128, 1.0)
    low = torch.rand(1, 3, 64, 64)
    result = cascade.generate("x", seed=1, steps_c=2, steps_b=1, **{k: v for k, v in settings.items()
                                                                    if k not in ("steps_c", "steps_b")},
                              controls=[Control("super_resolution", low, model=net)])
    with cascade.pipeline.use(cascade.pipeline.stages.effnet) as effnet:  # the tiny encoder is built lazily
        latent = effnet.encode_image(low)  # [1, 16, h, w] of the 64-px image
    assert seen == [torch.Size([1, 16, 2 * latent.shape[-2], 2 * latent.shape[-1]])]
    assert result.images[0].size == (128, 128)


def test_upscale_is_the_super_resolution_control_at_the_official_settings(cascade: Cascade) -> None:
    """`Cascade.upscale(image)`: twice the size, Stage C DDPM with CFG 1, the image as the SR control; options win,
    a contradicting size or another factor is refused before anything runs."""
    from cascade_lab.controls import parse_upscale

    low = torch.rand(1, 3, 64, 64)
    result = cascade.upscale(low, "x", seed=2, steps_c=2, steps_b=1, controlnet=tiny_kind("super_resolution"))
    p = result.params
    assert result.images[0].size == (128, 128)
    assert (p.sampler_c, p.cfg_c, p.shift_c, p.cfg_b, p.steps_c) == ("ddpm", 1.0, 2.0, 1.1, 2)
    assert [c[0] for c in p.controls] == ["super_resolution"] and p.strength == 1.0
    with pytest.raises(ValueError, match="width=256 with a 2x upscale of a 64x64 image"):
        cascade.upscale(low, width=256)
    with pytest.raises(ValueError, match="2x only"):
        parse_upscale("4x")
    assert parse_upscale("2x") == parse_upscale(2) == 2


def test_auto_picks_a_variant_the_controlnets_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` with the shipped ControlNets never settles on lite (they are built for the 3.6B Stage C)."""
    from cascade_lab.plugins import get_variant
    from cascade_lab.weights import memory

    lite, full = get_variant("lite_bf16"), get_variant("bf16")
    huge = 10**13
    assert memory.choose_variant("cpu", available=huge, variants=[lite]).variant == "lite_bf16"
    refused = memory.choose_variant("cpu", available=huge, variants=[lite], controls=["canny"])
    assert refused.variant is None and "built for the full Stage C" in refused.reason and "lite_bf16" in refused.reason
    assert memory.choose_variant("cpu", available=huge, variants=[lite, full], controls=["canny"]).variant == "bf16"
    monkeypatch.setattr("cascade_lab.weights.locate", lambda variant, **_: {})  # both "present"
    monkeypatch.setattr(memory, "real_variants", lambda: [lite, full])
    monkeypatch.setattr(memory, "available_memory", lambda device: 5 * 2**30)  # only lite would fit
    auto = Cascade("auto")
    assert auto.resolve_variant() == "lite_bf16"
    ruled_out = r"bf16, needs .* GiB \(the ControlNets given are built for the full Stage C: lite_bf16 ruled out\)"
    with pytest.warns(UserWarning, match=ruled_out):
        assert auto.resolve_variant(["canny"]) == "demo"
