"""Structure of the denoiser: scanned blocks, odd depths, dtype separation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rdt_jax
from rdt_jax.model import RDTConfig, RDTPolicy, init_policy


def _cfg(**kw) -> RDTConfig:
    base = dict(hidden_size=32, depth=4, num_heads=2, lang_token_dim=8, img_token_dim=8, state_token_dim=4,
                action_dim=4, pred_horizon=3, max_lang_cond_len=4, img_cond_len=6,
                lang_pos_embed_config=(("lang", -4),), img_pos_embed_config=(("image", (2, 1, -3)),))
    base.update(kw)
    return RDTConfig(**base)


def _lowered_denoiser_text(cfg: RDTConfig) -> str:
    policy = nnx.eval_shape(lambda: RDTPolicy(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(policy)
    d = cfg.hidden_size

    def f(state, x, lang_c, img_c):
        return nnx.merge(graphdef, state).model(x, jnp.ones((1,)), jnp.ones((1,)), lang_c, img_c)

    args = (jax.ShapeDtypeStruct((1, cfg.pred_horizon + 1, d), jnp.float32),
            jax.ShapeDtypeStruct((1, 4, d), jnp.float32), jax.ShapeDtypeStruct((1, cfg.img_cond_len, d), jnp.float32))
    return jax.jit(f).lower(state, *args).as_text()


def test_program_size_does_not_grow_with_depth():
    # Blocks run under lax.scan: 24 blocks lower to the same program as 4 (only the trip count changes).
    small, deep = _lowered_denoiser_text(_cfg(depth=4)), _lowered_denoiser_text(_cfg(depth=24))
    count = lambda text: text.count("stablehlo.dot_general")
    assert count(deep) == count(small)
    assert len(deep) < 1.1 * len(small)


@pytest.mark.parametrize("depth", [1, 3])
def test_odd_depth_runs_every_block(depth):
    cfg = _cfg(depth=depth)
    runner = rdt_jax.RDTRunner(init_policy(cfg))
    x = jnp.ones((2, cfg.pred_horizon + 1, cfg.hidden_size))
    out, cap = runner.model(x, jnp.array([1, 2]), jnp.array([5, 6]), jnp.ones((2, 4, 32)), jnp.ones((2, 6, 32)),
                            capture=True)
    assert out.shape == (2, cfg.pred_horizon, cfg.action_dim)
    assert cap["block_out"].shape == (depth, 2, cfg.pred_horizon + 3, 32)
    # Every block changes the hidden state (none is silently skipped).
    prev = cap["tokens_in"]
    for i in range(depth):
        assert not np.allclose(cap["block_out"][i], prev)
        prev = cap["block_out"][i]


def test_param_dtype_and_compute_dtype_are_separate():
    cfg = _cfg(param_dtype="bfloat16", dtype="float32")
    runner = rdt_jax.RDTRunner.from_config(cfg)
    assert {a.dtype for a in jax.tree.leaves(runner.params)} == {jnp.dtype(jnp.bfloat16)}
    out = runner.model(jnp.ones((1, 4, 32)), jnp.ones((1,)), jnp.ones((1,)), jnp.ones((1, 4, 32)),
                       jnp.ones((1, 6, 32)))
    assert out.dtype == jnp.float32
    mixed = _cfg(param_dtype="float32", dtype="bfloat16")
    out = rdt_jax.RDTRunner.from_config(mixed).model(jnp.ones((1, 4, 32)), jnp.ones((1,)), jnp.ones((1,)),
                                               jnp.ones((1, 4, 32)), jnp.ones((1, 6, 32)))
    assert out.dtype == jnp.bfloat16


def test_state_and_action_dims_must_agree():
    with pytest.raises(ValueError, match="state_token_dim"):
        RDTPolicy(_cfg(state_token_dim=5), rngs=nnx.Rngs(0))


def _epsilon_runner() -> rdt_jax.RDTRunner:
    from tests.test_runner import randomised_runner, tiny_config

    cfg = tiny_config()
    cfg = cfg.replace(noise_scheduler=dataclasses.replace(cfg.noise_scheduler, prediction_type="epsilon"))
    return randomised_runner(cfg, seed=3)


def test_epsilon_prediction_trains_on_the_noise():
    """The official code's other branch (DIFFUSION.md §3): the target is the noise, not the action chunk."""
    from rdt_jax.diffusion import add_noise
    from tests.test_runner import PA, tiny_inputs

    runner = _epsilon_runner()
    cfg, inp = runner.config, tiny_inputs(runner.config)
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(inp["action_gt"].shape).astype(np.float32)
    t = np.array([17, 640])
    loss = runner.compute_loss(*(inp[k] for k in PA[:4]), inp["action_gt"], inp["action_mask"], inp["ctrl_freqs"],
                               noise=noise, timesteps=t)
    # The network's output for the same noisy input, assembled by hand from the policy's parts.
    policy = nnx.merge(runner.graphdef, runner.state)
    noisy = add_noise(policy.alphas_cumprod, jnp.asarray(inp["action_gt"]), jnp.asarray(noise), jnp.asarray(t))
    lang_c, img_c = policy.adapt_conditions(jnp.asarray(inp["lang_tokens"]), jnp.asarray(inp["img_tokens"]))
    x = policy.adapt_state_action(jnp.concatenate([jnp.asarray(inp["state_tokens"]), noisy], 1),
                                  jnp.asarray(inp["action_mask"]))
    pred = np.asarray(runner.model(x, inp["ctrl_freqs"], t, lang_c, img_c, inp["lang_attn_mask"]), np.float64)
    np.testing.assert_allclose(float(loss), np.mean((pred - noise) ** 2), rtol=1e-5)
    assert abs(float(loss) - np.mean((pred - inp["action_gt"]) ** 2)) > 1e-3
    assert cfg.noise_scheduler.prediction_type == "epsilon"


def test_epsilon_prediction_samples_through_the_data_prediction():
    """Each step turns the predicted noise e into x0 = (x - sigma_t e) / alpha_t (alpha_t = sqrt(acp[t]),
    sigma_t = sqrt(1 - acp[t]); diffusers' convert_model_output) and takes the DPM-Solver++ step on x0."""
    from rdt_jax.diffusion import dpm_solver_plan
    from tests.test_runner import PA, tiny_inputs

    runner = _epsilon_runner()
    inp = tiny_inputs(runner.config)
    noise = np.random.default_rng(6).standard_normal(inp["action_gt"].shape).astype(np.float32)
    actions, trace = runner.predict_action(*(inp[k] for k in PA), noise=noise, capture=True)
    acp = nnx.merge(runner.graphdef, runner.state).alphas_cumprod.astype(np.float64)
    plan = dpm_solver_plan(acp.astype(np.float32), runner.config.noise_scheduler.num_inference_timesteps)
    x, x0_prev = noise.astype(np.float64), np.zeros_like(noise, np.float64)
    for k, t in enumerate(plan.timesteps):
        np.testing.assert_allclose(np.asarray(trace["step_sample_in"][k]), x, rtol=1e-4, atol=1e-5)
        eps = np.asarray(trace["step_model_output"][k], np.float64)
        x0 = (x - np.sqrt(1 - acp[t]) * eps) / np.sqrt(acp[t])
        x = (plan.coef_sample[k] * x - plan.coef_model[k] * x0
             - 0.5 * plan.coef_model[k] * plan.inv_r0[k] * (x0 - x0_prev))
        x0_prev = x0
    np.testing.assert_allclose(np.asarray(actions), x * inp["action_mask"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"prediction_type 'v_prediction' is not one of \('sample', 'epsilon'\)"):
        cfg = runner.config
        RDTPolicy(cfg.replace(noise_scheduler=dataclasses.replace(cfg.noise_scheduler, prediction_type="v_prediction")),
                  rngs=nnx.Rngs(0))


@pytest.mark.parametrize("layer_layout", ["stacked", "per_layer"])
@pytest.mark.parametrize("depth", [1, 4, 5])
def test_grad_sq_and_the_gradient_outside_the_scan_make_the_global_norm(depth, layer_layout):
    """The train step's clipping norm: the scanned pairs' squares from the backward pass (``grad_sq``)
    plus :func:`grad_outside_scan` (adaptor-free here: the denoiser alone), odd depths' trailing block
    and the per-layer layout (nothing scanned) included."""
    from rdt_jax.model.rdt import grad_outside_scan

    cfg = _cfg(depth=depth, layer_layout=layer_layout, dtype="bfloat16", remat="save_cond_kv")
    model = init_policy(cfg).model
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda p: p + 0.05, params.to_pure_dict())  # the zero-initialised final layer
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (2, cfg.pred_horizon + 1, cfg.hidden_size))
    lang, img = jax.random.normal(k[1], (2, 4, 32)), jax.random.normal(k[2], (2, 6, 32))

    def loss(params, sq):
        out = nnx.merge(graphdef, params)(x, jnp.array([1.0, 2.0]), jnp.array([5, 6]), lang, img, grad_sq=sq)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    grads, sq = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.zeros(()))
    outside = sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in grad_outside_scan(cfg, grads))
    total = sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(float(sq) + outside, total, rtol=1e-5)
    scanned = layer_layout == "stacked" and depth > 1
    assert (float(sq) > 0.1 * total) == scanned and (float(sq) == 0) == (not scanned)
