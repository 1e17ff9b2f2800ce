"""Stage C ControlNets as a generation input: what a user asks for (`Control`), made into ControlNet inputs by the
filters (`cascade_lab.controls.filters`) and run once per generation by the pipeline. No torch at import."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KINDS = ("canny", "inpainting", "super_resolution")


@dataclass(frozen=True)
class Control:
    """One ControlNet applied to Stage C.

    ``kind``: ``canny`` (edges of ``image``), ``inpainting`` (``image`` with ``mask``: regenerate where the mask is
    1), ``super_resolution`` (``image`` is the low-resolution picture to upscale 2×). ``strength`` scales the
    ControlNet's features; ``start``/``end`` are the fraction of the Stage C steps during which it applies (under
    ``compat="comfyui"`` ComfyUI's ControlNetApplyAdvanced range: the steps whose σ lies between the model's σ at
    1 − start and 1 − end, the same on the 'simple' scheduler). ``model``: the ControlNet file or module (default:
    found like the stages). ``image`` / ``mask``: a path, a PIL image, an array or a tensor, as `Cascade.generate`'s
    ``image``. ``grow`` dilates the inpainting mask by that many pixels (negative erodes; ComfyUI's GrowMask) before
    the ControlNet sees it; ``feather`` blurs its edge over that many pixels for the composite over the original.
    """

    kind: str
    image: Any
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mask: Any = None
    model: Any = None
    grow: int = 0
    feather: int = 0

    def validate(self) -> Control:
        if self.kind not in KINDS:
            hint = " (the identity/face ControlNet was withdrawn: its weights are not public)" \
                if self.kind in ("identity", "face") else ""
            raise ValueError(f"control kind {self.kind!r}: use one of {', '.join(KINDS)}{hint}")
        if not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength)):
            raise ValueError(f"control strength={self.strength!r}: use a finite number (1.0 = as trained)")
        if not (0 <= self.start < self.end <= 1):
            raise ValueError(f"control start={self.start}, end={self.end}: need 0 <= start < end <= 1 (fractions "
                             "of the Stage C steps)")
        if self.image is None:
            raise ValueError(f"control {self.kind!r} needs an image")
        for name in ("grow", "feather"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (name == "feather" and value < 0):
                raise ValueError(f"control {name}={value!r}: use a whole number of pixels"
                                 + (" ≥ 0" if name == "feather" else " (negative shrinks the mask)"))
        if (self.grow or self.feather) and self.kind != "inpainting":
            raise ValueError(f"control grow/feather are for the inpainting mask, not a {self.kind} control")
        if self.kind == "inpainting" and self.mask is None:
            raise ValueError("control 'inpainting' needs a mask: an image (white = regenerate), a PIL image's alpha, "
                             "an array, or boxes [(x0, y0, x1, y1), ...] (the official notebook's automatic saliency "
                             "mask needs a MicroResNet whose weights are not published)")
        return self

    def active(self, t: float) -> bool:
        """Whether the control applies at step position t (t = 1 the first, noisiest step; t → 0 the last)."""
        return in_step_range(t, self.start, self.end)


def in_step_range(t: float, start: float, end: float) -> bool:
    """Whether step position t (1 at the first step, → 0 at the last) lies in the [start, end] fraction of the
    schedule already behind (ComfyUI's percent range on its 'simple' scheduler; ComfyUI itself compares σ:
    `cascade_lab.diffusion.sigma_schedules.in_sigma_range`)."""
    done = 1.0 - t
    return start - 1e-9 <= done <= end + 1e-9


def parse_spec(text: str) -> tuple[str, str, float]:
    """``KIND:IMAGE[:STRENGTH]`` (the magic's and the command line's --control) → (kind, image, strength)."""
    kind, sep, rest = text.partition(":")
    image, strength = rest, 1.0
    head, sep2, tail = rest.rpartition(":")
    if sep2 and head:
        try:
            image, strength = head, float(tail)
        except ValueError:
            pass  # a ':' in the file name (C:\\x.png) is part of it
    if not sep or kind not in KINDS or not image:
        raise ValueError(f"{text!r}: use KIND:IMAGE[:STRENGTH] with KIND one of {', '.join(KINDS)}")
    return kind, image, strength


def super_resolution_settings(size: tuple[int, int]) -> dict[str, Any]:
    """The official SR notebook's generation for a 2x upscale of a (width, height) image, as generate() keywords.

    Stage C: DDPM, 20 steps, CFG 1 (a negative prompt has no effect), shift 2; Stage B as always: DDPM, 10 steps,
    CFG 1.1, shift 1. The notebook upscales 1024² to 2048².
    """
    width, height = size
    return {"width": 2 * width, "height": 2 * height,
            "sampler_c": "ddpm", "steps_c": 20, "cfg_c": 1.0, "shift_c": 2.0,
            "sampler_b": "ddpm", "steps_b": 10, "cfg_b": 1.1, "shift_b": 1.0}


def parse_upscale(text: str | int | float) -> int:
    """``2x`` / ``2`` → 2, the one factor the super-resolution ControlNet makes; anything else a clear error."""
    value = str(text).strip().lower().removesuffix("x").removesuffix("×")
    try:
        factor = float(value)
    except ValueError:
        factor = math.nan
    if factor != 2:
        raise ValueError(f"upscale {text!r}: the super-resolution ControlNet upscales 2x only (use 2x; for 4x "
                         "upscale the 2x result again)")
    return 2


def upscale_options(size: tuple[int, int], given: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a 2x upscale of an image of ``size`` = (width, height): the official SR settings
    (`super_resolution_settings`) under the options the user ``given`` (theirs win); a given width/height other
    than twice the image's is refused, naming both."""
    settings = super_resolution_settings(size)
    for name in ("width", "height"):
        value = given.get(name)
        if value is not None and value != settings[name]:
            raise ValueError(f"{name}={value} with a 2x upscale of a {size[0]}x{size[1]} image: the result is "
                             f"{settings['width']}x{settings['height']}; drop {name} or resize the input to "
                             f"{value // 2 if isinstance(value, int) else '?'} px first")
    if given.get("strength", 1.0) != 1.0 or given.get("denoise", 1.0) != 1.0:
        raise ValueError("an upscale starts from noise with the image as its control: drop strength/denoise "
                         "(img2img) from the upscale")
    return {**settings, **{k: v for k, v in given.items() if v is not None}}


def parse_boxes(text: str) -> list[tuple[int, int, int, int]] | None:
    """``x0,y0,x1,y1[;...]`` → boxes in pixels, or None when the text is not boxes (a file or a variable)."""
    parts = [p.strip() for p in text.split(";")]
    boxes = []
    for part in parts:
        values = part.split(",")
        if len(values) != 4 or not all(v.strip().isdigit() for v in values):
            return None
        x0, y0, x1, y1 = (int(v) for v in values)
        boxes.append((x0, y0, x1, y1))
    return boxes


__all__ = ["KINDS", "Control", "in_step_range", "parse_boxes", "parse_spec", "parse_upscale",
           "super_resolution_settings", "upscale_options"]
