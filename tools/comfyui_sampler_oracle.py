"""Record ComfyUI's own samplers on the analytic toy denoiser of tests/diffusion/ksampler_toy.py.

Run outside the repository's environment, with a ComfyUI checkout (tested: 3cd7b32f, the commit of
../shared/reference/comfyui) and its libraries (torch, torchsde, scipy):

    python tools/comfyui_sampler_oracle.py --comfyui /path/to/ComfyUI NAME [NAME ...] -o tests/diffusion/data/F

For each sampler name: the σ schedule (`simple`, 10 steps at shift 2, built by ComfyUI's KSampler rules, so
dpm_2 / uni_pc drop the penultimate σ), the starting x (seeded noise · √(1 + σ0²)), every callback's x and
denoised, and the final x. Noise comes from ComfyUI's own sources for the seed (per-step generator seeded
seed + 1 on the CPU, Brownian trees seeded with the seed), so the tests check cascade_lab's seeding as well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "diffusion"))
from ksampler_toy import CFG, SEED, SHAPE, SHIFT, STEPS, guided  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("names", nargs="+")
    args = ap.parse_args()
    sys.path.insert(0, args.comfyui)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    import comfy.model_sampling as ms
    import comfy.samplers as cs
    from safetensors.torch import save_file

    class Sampling(ms.StableCascadeSampling, ms.EPS):
        pass

    sampling = Sampling()
    sampling.set_parameters(shift=SHIFT)

    class ToyModel:
        """ComfyUI's sampler-side model: denoised = cfg_function(...) including post-CFG hooks."""

        inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling),
                                      model_patcher=SimpleNamespace(get_model_object=lambda _: sampling))

        def __call__(self, x, sigma, model_options=None, seed=None, **_):
            model_options = model_options or {}
            cond_scale = CFG
            x0, uncond = guided(x, sigma)
            cond = x0  # unused by the hooks of the samplers recorded here
            for fn in model_options.get("sampler_post_cfg_function", []):
                x0 = fn({"denoised": x0, "cond": None, "uncond": None, "cond_scale": cond_scale, "model": None,
                         "uncond_denoised": uncond, "cond_denoised": cond, "sigma": sigma,
                         "model_options": model_options, "input": x})
            return x0

    tensors: dict[str, torch.Tensor] = {}
    for name in args.names:
        class Holder:  # KSampler.calculate_sigmas needs .model.get_model_object and .sampler / .scheduler
            model = SimpleNamespace(get_model_object=lambda _: sampling)
            sampler, scheduler = name, "simple"
            DISCARD_PENULTIMATE_SIGMA_SAMPLERS = cs.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS

        sigmas = cs.KSampler.calculate_sigmas(Holder(), STEPS)
        sampler = cs.sampler_object(name)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
        x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        steps: list[tuple[torch.Tensor, torch.Tensor]] = []

        def callback(d, _steps=steps):
            _steps.append((d["x"].clone(), d["denoised"].clone()))

        schedule = sigmas.float().clone()  # UniPC writes 0.001 over a final 0 in the list it is given
        extra_args = {"model_options": {}, "seed": SEED}
        final = sampler.sampler_function(ToyModel(), x.clone(), sigmas, extra_args=extra_args, callback=callback,
                                         disable=True, **sampler.extra_options)
        tensors[f"{name}.sigmas"] = schedule.contiguous()
        tensors[f"{name}.x_init"] = x.contiguous()
        tensors[f"{name}.final"] = final.contiguous()
        for i, (xi, di) in enumerate(steps):
            tensors[f"{name}.step{i:02d}.x"] = xi.contiguous()
            tensors[f"{name}.step{i:02d}.denoised"] = di.contiguous()
        print(f"{name}: {len(steps)} callbacks, final absmax {final.abs().max():.4f}")
    save_file(tensors, args.out, metadata={"comfyui_samplers": " ".join(args.names), "seed": str(SEED)})


if __name__ == "__main__":
    main()
