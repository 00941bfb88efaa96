"""DDPM training schedule and DPM-Solver++ sampling in pure JAX/NumPy (no diffusers)."""

from rdt_jax.diffusion.ddpm import DDPMSchedule, add_noise, squaredcos_cap_v2_betas
from rdt_jax.diffusion.dpm_solver import DPMSolverPlan, dpm_solver_plan, dpm_solver_timesteps

__all__ = [
    "DDPMSchedule",
    "DPMSolverPlan",
    "add_noise",
    "dpm_solver_plan",
    "dpm_solver_timesteps",
    "squaredcos_cap_v2_betas",
]
