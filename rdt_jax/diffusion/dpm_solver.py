"""DPM-Solver++ (2nd-order multistep, midpoint, data prediction) as precomputed per-step coefficients.

Mirrors diffusers 0.27.2 ``DPMSolverMultistepScheduler`` with RDT's configuration (DIFFUSION.md §4):
``linspace`` timesteps, first order at the first step and at the final step (``lower_order_final`` /
``final_sigmas_type="zero"``), second order in between. Everything that depends only on the step
count is computed once in float32 NumPy; the jitted loop only does ``x <- A x - c (m + D1/2)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def dpm_solver_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """``linspace(0, T-1, n+1)`` rounded, reversed, last dropped: 5 steps -> 999, 799, 599, 400, 200."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps {num_inference_steps} exceeds num_train_timesteps {num_train_timesteps}")
    ts = np.linspace(0, num_train_timesteps - 1, num_inference_steps + 1).round()[::-1][:-1]
    return ts.copy().astype(np.int64)


@dataclasses.dataclass(frozen=True)
class DPMSolverPlan:
    """Per-step constants: ``x_next = A x - c m - 0.5 c inv_r0 (m - m_prev)``.

    First-order steps have ``inv_r0 = 0``; the final step (sigma 0) has ``A = 0, c = -1`` so its
    output is exactly the model's x0 prediction (closed form, no log 0 / 0 * inf).
    """

    timesteps: np.ndarray  # (n,) int64
    sigmas: np.ndarray  # (n+1,) float32, last = 0
    coef_sample: np.ndarray  # A, (n,) float32
    coef_model: np.ndarray  # c = alpha_next * (exp(-h) - 1), (n,) float32
    inv_r0: np.ndarray  # (n,) float32
    order: np.ndarray  # (n,) int32
    # alpha_t and sigma_t at each step's own timestep, (n,) float32: an epsilon prediction e becomes the
    # data prediction (x - sigma_t e) / alpha_t, as diffusers' convert_model_output does.
    alpha_t: np.ndarray
    sigma_t: np.ndarray


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0), dtype=np.float32)
    return np.float32(alpha), np.float32(sigma * alpha)


def dpm_solver_plan(
    alphas_cumprod: np.ndarray, num_inference_steps: int, solver_order: int = 2
) -> DPMSolverPlan:
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
    acp = np.asarray(alphas_cumprod, dtype=np.float32)
    timesteps = dpm_solver_timesteps(num_inference_steps, acp.shape[0])
    all_sigmas = np.sqrt((np.float32(1) - acp) / acp).astype(np.float32)
    sigmas = np.concatenate([all_sigmas[timesteps], np.zeros(1, np.float32)]).astype(np.float32)

    n = len(timesteps)
    lambdas = np.empty(n + 1, np.float32)
    alphas = np.empty(n + 1, np.float32)
    s_vals = np.empty(n + 1, np.float32)
    for i, s in enumerate(sigmas):
        alphas[i], s_vals[i] = _alpha_sigma(np.float32(s))
        with np.errstate(divide="ignore"):
            lambdas[i] = np.log(alphas[i]) - np.log(s_vals[i])

    coef_sample = np.zeros(n, np.float32)
    coef_model = np.zeros(n, np.float32)
    inv_r0 = np.zeros(n, np.float32)
    order = np.ones(n, np.int32)
    for k in range(n):
        final_zero = k == n - 1  # sigma_{k+1} = 0: lower-order final step in closed form
        if final_zero:
            coef_sample[k], coef_model[k] = 0.0, -1.0
            continue
        h = np.float32(lambdas[k + 1] - lambdas[k])
        coef_sample[k] = np.float32(s_vals[k + 1] / s_vals[k])
        coef_model[k] = np.float32(alphas[k + 1] * np.float32(np.exp(-h) - np.float32(1.0)))
        if solver_order == 2 and k >= 1:
            h0 = np.float32(lambdas[k] - lambdas[k - 1])
            inv_r0[k] = np.float32(np.float32(1.0) / np.float32(h0 / h))
            order[k] = 2
    return DPMSolverPlan(timesteps, sigmas, coef_sample, coef_model, inv_r0, order, alphas[:n], s_vals[:n])
