"""Built-in plugin ``comfyui``: ComfyUI's 44 samplers and 9 schedulers under ComfyUI's own names.

Names that cascade_lab's official family already uses (samplers ddpm, ddim, lcm, euler, euler_ancestral,
dpmpp_2m; schedulers karras, exponential) are registered as ``comfyui.<name>``; with ``compat="comfyui"``
a plain ComfyUI name resolves to the ComfyUI one (`cascade_lab.plugins.resolve_sampler`), so a workflow's
``sampler_name`` / ``scheduler`` map one to one.
"""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import LazyCallable, Sampler, Scheduler

PREFIX = "comfyui."
CLASHING_SAMPLERS = {"ddpm", "ddim", "lcm", "euler", "euler_ancestral", "dpmpp_2m"}
CLASHING_SCHEDULERS = {"karras", "exponential"}
DROP_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}

# ComfyUI's KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2, in its order, with what each is
SAMPLER_DESCRIPTIONS = {
    "euler": "Euler steps on the probability-flow ODE (Karras et al. 2022)",
    "euler_cfg_pp": "Euler with CFG++ (Chung et al. 2024): renoise with the unconditional prediction",
    "euler_ancestral": "Euler ancestral: Euler to σ_down, then fresh noise σ_up",
    "euler_ancestral_cfg_pp": "Euler ancestral with CFG++ (Chung et al. 2024)",
    "heun": "Heun's second-order method (Karras et al. 2022, algorithm 2)",
    "heunpp2": "Heun++ (Carzit's sd-webui-samplers-scheduler): a weighted third evaluation",
    "exp_heun_2_x0": "exponential Heun in x0 form (SEEDS-2 with η = 0, Gonzalez et al. 2023)",
    "exp_heun_2_x0_sde": "exponential Heun, stochastic (SEEDS-2 with η = 1)",
    "dpm_2": "DPM-Solver-2 midpoint steps (Lu et al. 2022), Karras form",
    "dpm_2_ancestral": "DPM-Solver-2 with ancestral noise",
    "lms": "linear multistep, order 4 (Karras et al. 2022 / k-diffusion)",
    "dpm_fast": "DPM-Solver fast, fixed orders 3/2/1 between σ_max and σ_min (Lu et al. 2022)",
    "dpm_adaptive": "DPM-Solver adaptive step size (Lu et al. 2022); ignores the step count",
    "dpmpp_2s_ancestral": "DPM-Solver++(2S) single-step with ancestral noise (Lu et al. 2022)",
    "dpmpp_2s_ancestral_cfg_pp": "DPM-Solver++(2S) ancestral with CFG++",
    "dpmpp_sde": "DPM-Solver++ SDE (Lu et al. 2022), Brownian-tree noise",
    "dpmpp_sde_gpu": "dpmpp_sde with the tree on the device (the same numbers on the CPU)",
    "dpmpp_2m": "DPM-Solver++(2M) multistep (Lu et al. 2022)",
    "dpmpp_2m_cfg_pp": "DPM-Solver++(2M) with CFG++",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE, midpoint, Brownian-tree noise",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde with the tree on the device (the same numbers on the CPU)",
    "dpmpp_2m_sde_heun": "DPM-Solver++(2M) SDE, Heun solver type",
    "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun with the tree on the device",
    "dpmpp_3m_sde": "DPM-Solver++(3M) SDE, Brownian-tree noise",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde with the tree on the device (the same numbers on the CPU)",
    "ddpm": "ancestral DDPM steps (Ho et al. 2020) in σ form",
    "lcm": "latent consistency sampling (Luo et al. 2023): x0, then renoise to σ'",
    "ipndm": "improved PNDM, 4th-order multistep (Zhang & Chen 2023)",
    "ipndm_v": "improved PNDM with variable step sizes (Zhang & Chen 2023)",
    "deis": "DEIS exponential integrator, order 3 (Zhang & Chen 2023)",
    "res_multistep": "RES multistep, 2nd order (Zhang et al. 2024)",
    "res_multistep_cfg_pp": "RES multistep with CFG++",
    "res_multistep_ancestral": "RES multistep with ancestral noise",
    "res_multistep_ancestral_cfg_pp": "RES multistep ancestral with CFG++",
    "gradient_estimation": "gradient estimation (Permenter & Yuan 2024), γ = 2",
    "gradient_estimation_cfg_pp": "gradient estimation with CFG++",
    "er_sde": "extended reverse-time SDE solver, 3 stages (Cui et al. 2024)",
    "seeds_2": "SEEDS-2 stochastic exponential solver (Gonzalez et al. 2023)",
    "seeds_3": "SEEDS-3 stochastic exponential solver (Gonzalez et al. 2023)",
    "sa_solver": "SA-Solver stochastic Adams predictor-corrector (Xue et al. 2023)",
    "sa_solver_pece": "SA-Solver in PECE mode (re-evaluates after each corrector)",
    "ddim": "ComfyUI's ddim: Euler steps (deterministic DDIM, Song et al. 2020)",
    "uni_pc": "UniPC predictor-corrector, B(h) = h (Zhao et al. 2023)",
    "uni_pc_bh2": "UniPC predictor-corrector, B(h) = expm1(h) (Zhao et al. 2023)",
}

SCHEDULER_DESCRIPTIONS = {
    "simple": "every (10000/steps)-th σ of the table: the official cosine grid, ending at σ = 0",
    "sgm_uniform": "steps + 1 even model timesteps, the last replaced by σ = 0 (SGM uniform)",
    "karras": "Karras et al. ρ = 7 between σ_min 0.01 and σ_max 99.995 (shift-independent)",
    "exponential": "even in log σ between σ_max and σ_min (shift-independent)",
    "ddim_uniform": "every (10000 // steps)-th table entry from the bottom; starts below σ_max",
    "beta": "beta(0.6, 0.6)-distributed timesteps (Lee et al. 2024)",
    "normal": "even model timesteps from r(σ_max) to r(σ_min), then 0",
    "linear_quadratic": "linear then quadratic in σ/σ_max (Genmo's Mochi schedule)",
    "kl_optimal": "tan of evenly spaced atan σ (Sabour et al. 2024)",
}


def registered_name(name: str, clashing: set[str]) -> str:
    return PREFIX + name if name in clashing else name


SAMPLERS = [
    Sampler(registered_name(name, CLASHING_SAMPLERS), description,
            LazyCallable(f"cascade_lab.diffusion.ksamplers:sample_{name}"), space="sigma", family="comfyui",
            drop_penultimate=name in DROP_PENULTIMATE)
    for name, description in SAMPLER_DESCRIPTIONS.items()
]
SCHEDULERS = [
    Scheduler(registered_name(name, CLASHING_SCHEDULERS), description,
              LazyCallable(f"cascade_lab.diffusion.sigma_schedules:{name}"), space="sigma", family="comfyui")
    for name, description in SCHEDULER_DESCRIPTIONS.items()
]


@hookimpl
def register_samplers(register: Callable[[Sampler], None]) -> None:
    for sampler in SAMPLERS:
        register(sampler)


@hookimpl
def register_schedulers(register: Callable[[Scheduler], None]) -> None:
    for scheduler in SCHEDULERS:
        register(scheduler)
