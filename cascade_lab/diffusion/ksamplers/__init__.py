"""The σ family: ComfyUI's sampler set (k-diffusion and its descendants) as small functions.

The contract is in `common`; `cascade_lab.builtins.comfyui` registers them under ComfyUI's names."""

from __future__ import annotations

from .ddpm import (
    sample_ddim,
    sample_ddpm,
    sample_lcm,
)
from .deis import (
    sample_deis,
)
from .dpm_solver import (
    sample_dpm_adaptive,
    sample_dpm_fast,
)
from .dpmpp import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_cfg_pp,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_2s_ancestral_cfg_pp,
)
from .dpmpp_sde import (
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_gpu,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2m_sde_heun_gpu,
    sample_dpmpp_3m_sde,
    sample_dpmpp_3m_sde_gpu,
    sample_dpmpp_sde,
    sample_dpmpp_sde_gpu,
)
from .euler import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_euler_ancestral_cfg_pp,
    sample_euler_cfg_pp,
    sample_heun,
    sample_heunpp2,
)
from .lms import (
    sample_lms,
)
from .multistep import (
    sample_gradient_estimation,
    sample_gradient_estimation_cfg_pp,
    sample_ipndm,
    sample_ipndm_v,
    sample_res_multistep,
    sample_res_multistep_ancestral,
    sample_res_multistep_ancestral_cfg_pp,
    sample_res_multistep_cfg_pp,
)
from .sa_solver import (
    sample_sa_solver,
    sample_sa_solver_pece,
)
from .seeds import (
    sample_er_sde,
    sample_exp_heun_2_x0,
    sample_exp_heun_2_x0_sde,
    sample_seeds_2,
    sample_seeds_3,
)
from .unipc import (
    sample_uni_pc,
    sample_uni_pc_bh2,
)

__all__ = [
    "sample_ddim",
    "sample_ddpm",
    "sample_deis",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_cfg_pp",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_gpu",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2m_sde_heun_gpu",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_2s_ancestral_cfg_pp",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_3m_sde_gpu",
    "sample_dpmpp_sde",
    "sample_dpmpp_sde_gpu",
    "sample_er_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_euler_ancestral_cfg_pp",
    "sample_euler_cfg_pp",
    "sample_exp_heun_2_x0",
    "sample_exp_heun_2_x0_sde",
    "sample_gradient_estimation",
    "sample_gradient_estimation_cfg_pp",
    "sample_heun",
    "sample_heunpp2",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_lcm",
    "sample_lms",
    "sample_res_multistep",
    "sample_res_multistep_ancestral",
    "sample_res_multistep_ancestral_cfg_pp",
    "sample_res_multistep_cfg_pp",
    "sample_sa_solver",
    "sample_sa_solver_pece",
    "sample_seeds_2",
    "sample_seeds_3",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
]
