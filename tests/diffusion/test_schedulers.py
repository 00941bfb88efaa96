"""DDPM schedule and DPM-Solver++ against diffusers 0.27.2's outputs (fixtures) and DIFFUSION.md."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rdt_jax.diffusion import DDPMSchedule, add_noise, dpm_solver_plan, dpm_solver_timesteps
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def schedule() -> DDPMSchedule:
    return DDPMSchedule.create(1000, "squaredcos_cap_v2")


def test_ddpm_tables(schedule, cases):
    np.testing.assert_allclose(schedule.betas, cases["sched.ddpm.betas"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(schedule.alphas_cumprod, cases["sched.ddpm.alphas_cumprod"], rtol=1e-6, atol=0)
    assert schedule.betas[-1] == np.float32(0.999)  # only beta_999 hits the cap
    assert np.all(schedule.betas[:-1] < 0.999)


def test_schedule_matches_config_file(shared_dir):
    cfg = json.loads((shared_dir / "fixtures" / "rdt_small" / "schedulers.json").read_text())
    for name in ("ddpm", "dpm_solver"):
        assert cfg[name]["beta_schedule"] == "squaredcos_cap_v2"
        assert cfg[name]["num_train_timesteps"] == 1000
        assert cfg[name]["prediction_type"] == "sample"
    dpm = cfg["dpm_solver"]
    assert (dpm["algorithm_type"], dpm["solver_order"], dpm["solver_type"]) == ("dpmsolver++", 2, "midpoint")
    assert (dpm["lower_order_final"], dpm["final_sigmas_type"], dpm["timestep_spacing"]) == (True, "zero", "linspace")


def test_add_noise(schedule, cases):
    c = {k: jnp.asarray(cases[f"sched.ddpm.add_noise.{k}"]) for k in ("x0", "noise", "timesteps")}
    out = add_noise(schedule.alphas_cumprod, c["x0"], c["noise"], c["timesteps"])
    assert_close(out, cases["sched.ddpm.add_noise.out"], 1e-6, "add_noise")


def test_dpm_tables_and_timesteps(schedule, cases):
    acp = schedule.alphas_cumprod.astype(np.float64)
    assert_close(np.sqrt(acp), cases["sched.dpm.alpha_t"], 1e-6, "alpha_t")
    assert_close(np.sqrt(1 - acp), cases["sched.dpm.sigma_t"], 1e-6, "sigma_t")
    plan = dpm_solver_plan(schedule.alphas_cumprod, 5)
    np.testing.assert_array_equal(plan.timesteps, cases["sched.dpm.timesteps"])
    np.testing.assert_array_equal(plan.timesteps, [999, 799, 599, 400, 200])
    np.testing.assert_allclose(plan.sigmas, cases["sched.dpm.sigmas"], rtol=1e-6)
    assert plan.sigmas[-1] == 0
    np.testing.assert_array_equal(plan.order, [1, 2, 2, 2, 1])
    # Each step's own alpha_t and sigma_t (for epsilon predictions), from diffusers' tables.
    assert_close(plan.alpha_t, cases["sched.dpm.alpha_t"][plan.timesteps], 1e-6, "plan alpha_t")
    assert_close(plan.sigma_t, cases["sched.dpm.sigma_t"][plan.timesteps], 1e-6, "plan sigma_t")


def test_dpm_coefficients_match_documented_table(schedule):
    # DIFFUSION.md §4.3 (diffusers 0.27.2, 9 digits): A_k, C_k = alpha_{k+1}(1 - e^-h), r0.
    plan = dpm_solver_plan(schedule.alphas_cumprod, 5)
    np.testing.assert_allclose(plan.coef_sample, [0.951816363, 0.853006366, 0.732830494, 0.537396761, 0], atol=2e-7)
    np.testing.assert_allclose(-plan.coef_model, [0.306621664, 0.322198756, 0.375915427, 0.515579625, 1], atol=2e-7)
    np.testing.assert_allclose(plan.inv_r0[1:4], 1 / np.array([10.9439, 1.27307, 0.802679]), rtol=1e-4)


def _run(plan, sample0, model_outputs):
    x, m_prev, outs = sample0.astype(np.float64), np.zeros_like(sample0, np.float64), []
    for k in range(len(plan.timesteps)):
        m = model_outputs[k].astype(np.float64)
        x = plan.coef_sample[k] * x - plan.coef_model[k] * m - 0.5 * plan.coef_model[k] * plan.inv_r0[k] * (m - m_prev)
        m_prev = m
        outs.append(x)
    return np.stack(outs)


def test_dpm_steps_match_diffusers(schedule, cases):
    plan = dpm_solver_plan(schedule.alphas_cumprod, 5)
    got = _run(plan, cases["sched.dpm.sample0"], cases["sched.dpm.model_outputs"])
    for k in range(5):
        assert_close(got[k], cases["sched.dpm.prev_samples"][k], 1e-5, f"step {k}")
    # The last step returns exactly the final x0 prediction.
    np.testing.assert_array_equal(got[-1], cases["sched.dpm.model_outputs"][-1].astype(np.float64))


def _reference_dpm(acp: np.ndarray, n: int, sample0: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """DPM-Solver++(2M) written from the paper's equations in float64, independent of the plan code."""
    ts = np.round(np.linspace(0, 999, n + 1))[::-1][:-1].astype(int)
    sig = [math.sqrt((1 - acp[t]) / acp[t]) for t in ts] + [0.0]
    alpha = [1 / math.sqrt(s * s + 1) for s in sig]
    s_ = [s * a for s, a in zip(sig, alpha, strict=True)]
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, s_, strict=True)]
    x = sample0.astype(np.float64)
    for k in range(n):
        m = outputs[k].astype(np.float64)
        if k == n - 1:
            x = m
        elif k == 0:
            h = lam[1] - lam[0]
            x = s_[1] / s_[0] * x - alpha[1] * (math.exp(-h) - 1) * m
        else:
            h, h0 = lam[k + 1] - lam[k], lam[k] - lam[k - 1]
            d1 = (m - outputs[k - 1]) / (h0 / h)
            x = s_[k + 1] / s_[k] * x - alpha[k + 1] * (math.exp(-h) - 1) * (m + 0.5 * d1)
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 10, 25])
def test_any_step_count(schedule, n):
    ts = dpm_solver_timesteps(n)
    assert len(ts) == n and ts[0] == 999 and np.all(np.diff(ts) < 0)
    plan = dpm_solver_plan(schedule.alphas_cumprod, n)
    rng = np.random.default_rng(n)
    sample0, outputs = rng.standard_normal((2, 3)), rng.standard_normal((n, 2, 3))
    got = _run(plan, sample0, outputs)[-1]
    assert_close(got, _reference_dpm(schedule.alphas_cumprod.astype(np.float64), n, sample0, outputs), 1e-5, f"{n}")


def test_bad_step_counts():
    with pytest.raises(ValueError, match=">= 1"):
        dpm_solver_timesteps(0)
    with pytest.raises(ValueError, match="exceeds"):
        dpm_solver_timesteps(2000)
