"""Schedulers: steps + 1 float32 logSNR levels between the official schedule's (shifted) ends."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reference_dir

from cascade_lab.diffusion import cosine, exponential, karras, logsnr, sigma

SCHEDULERS = [cosine, karras, exponential]


def test_cosine_is_the_official_grid():
    grids = json.loads((reference_dir("gdf") / "grids.json").read_text())
    for c in grids["cases"]:
        got = cosine(c["timesteps"], shift=c["shift"], t_start=c["t_start"], t_end=c["t_end"])
        torch.testing.assert_close(got, torch.tensor(c["logSNR"]), atol=1e-5, rtol=1e-5, msg=c["name"])


def test_notebook_stage_c_grid():
    levels = cosine(20, shift=2.0)  # spec §6.5: −9.2102, −6.4863, −5.0878, −4.2562, … 3.4349, 7.8238
    torch.testing.assert_close(levels[:4], torch.tensor([-9.2102, -6.4863, -5.0878, -4.2562]), atol=1e-4, rtol=0)
    torch.testing.assert_close(levels[-2:], torch.tensor([3.4349, 7.8238]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fn", SCHEDULERS)
@pytest.mark.parametrize(("shift", "t_start", "t_end"), [(1.0, 1.0, 0.0), (2.0, 1.0, 0.0), (2.0, 0.8, 0.0),
                                                         (3.0, 0.9, 0.1)])
def test_shape_dtype_ends_and_order(fn, shift, t_start, t_end):
    levels = fn(7, shift=shift, t_start=t_start, t_end=t_end)
    assert levels.shape == (8,) and levels.dtype == torch.float32
    ends = logsnr(torch.tensor([t_start, t_end]), shift=shift)
    assert levels[0].item() == ends[0].item() and levels[-1].item() == ends[1].item()
    assert (levels[1:] >= levels[:-1]).all()


def test_karras_is_rho7_in_sigma():
    s = sigma(karras(10, shift=2.0)).double()
    torch.testing.assert_close(s ** (1 / 7), torch.linspace(float(s[0] ** (1 / 7)), float(s[-1] ** (1 / 7)), 11,
                                                            dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_exponential_is_even_in_log_sigma():
    levels = exponential(10, shift=2.0)
    steps = levels[1:] - levels[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(10), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", SCHEDULERS)
def test_bad_arguments(fn):
    with pytest.raises(ValueError, match="steps"):
        fn(0)
    with pytest.raises(ValueError, match="t_start"):
        fn(5, t_start=0.2, t_end=0.5)
