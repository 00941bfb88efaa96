"""The per-layer block layout (CPU runner default) against the stacked one (checkpoints, training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rdt_jax
from rdt_jax.model.layer_layout import is_per_layer, stack_blocks, unstack_blocks
from tests.test_runner import PA, randomised_runner, tiny_config, tiny_inputs


@pytest.fixture(scope="module", params=[3, 4], ids=["odd_depth", "even_depth"])
def runners(request):
    stacked = randomised_runner(tiny_config(depth=request.param, layer_layout="stacked"), seed=2)
    params = stacked.param_dict()
    per_layer_cfg = stacked.config.replace(layer_layout="per_layer")
    graphdef, state = nnx.split(rdt_jax.runner.abstract_policy(per_layer_cfg))
    nnx.replace_by_pure_dict(state, unstack_blocks(jax.tree.map(lambda x: x, params)))
    return stacked, rdt_jax.RDTRunner(nnx.merge(graphdef, state))


def test_unstack_then_stack_is_exact(runners):
    stacked, per_layer = runners
    a, b = stacked.param_dict(), per_layer.param_dict()  # param_dict always answers in the stacked layout
    assert not is_per_layer(a) and not is_per_layer(b)
    layers = nnx.to_pure_dict(per_layer.params)["model"]["lang_blocks"]
    assert is_per_layer(nnx.to_pure_dict(per_layer.params))
    assert sorted(layers) == list(range(stacked.config.num_lang_blocks))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    jax.tree.map(np.testing.assert_array_equal, stack_blocks(unstack_blocks(jax.tree.map(lambda x: x, a))), a)


def test_same_outputs_in_both_layouts(runners):
    stacked, per_layer = runners
    cfg = stacked.config
    x = tiny_inputs(cfg)
    noise = np.random.default_rng(4).standard_normal((2, cfg.pred_horizon, cfg.action_dim)).astype(np.float32)
    t = np.array([3, 700])
    args = [x[k] for k in PA]
    loss_args = [x[k] for k in ("lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_gt",
                                "action_mask", "ctrl_freqs")]
    for cached in (True, False):
        a = stacked.predict_action(*args, noise=noise, cache_cond_kv=cached)
        b = per_layer.predict_action(*args, noise=noise, cache_cond_kv=cached)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    la = stacked.compute_loss(*loss_args, noise=noise, timesteps=t)
    lb = per_layer.compute_loss(*loss_args, noise=noise, timesteps=t)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)

    def grads(r):
        graphdef, params = nnx.split(r.policy, nnx.Param)
        g = jax.grad(lambda p: nnx.merge(graphdef, p).compute_loss(*loss_args, noise, t))(params)
        g = nnx.to_pure_dict(g)
        return stack_blocks(g) if is_per_layer(g) else g

    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), grads(per_layer), grads(stacked))


def test_per_layer_remat_gives_the_same_gradients(runners):
    _, per_layer = runners
    cfg = per_layer.config
    x = tiny_inputs(cfg)
    noise = np.zeros((2, cfg.pred_horizon, cfg.action_dim), np.float32)
    loss_args = [x[k] for k in ("lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_gt",
                                "action_mask", "ctrl_freqs")]
    out = []
    for remat in ("none", "full"):
        policy = nnx.merge(nnx.graphdef(rdt_jax.runner.abstract_policy(cfg.replace(remat=remat))),
                           nnx.state(per_layer.policy))
        graphdef, params = nnx.split(policy, nnx.Param)
        g = jax.grad(lambda p, gd=graphdef: nnx.merge(gd, p).compute_loss(*loss_args, noise, np.array([5, 9])))(params)
        out.append(nnx.to_pure_dict(g))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), out[0], out[1])


def test_load_pretrained_layouts(converted_small, cases):
    auto = rdt_jax.load_pretrained(converted_small)
    assert auto.config.layer_layout == "per_layer"  # tests run on the CPU
    stacked = rdt_jax.load_pretrained(converted_small, layer_layout="stacked")
    assert stacked.config.layer_layout == "stacked"
    jax.tree.map(np.testing.assert_array_equal, auto.param_dict(), stacked.param_dict())
    args = [cases[f"pa.{k}"] for k in PA]
    a = auto.predict_action(*args, noise=cases["pa.init_noise"])
    b = stacked.predict_action(*args, noise=cases["pa.init_noise"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="layer_layout"):
        rdt_jax.load_pretrained(converted_small, layer_layout="interleaved")


def test_from_config_same_init_in_both_layouts():
    cfg = tiny_config()
    a = rdt_jax.RDTRunner.from_config(cfg, seed=5, layer_layout="stacked")
    b = rdt_jax.RDTRunner.from_config(cfg, seed=5, layer_layout="per_layer")
    assert b.config.layer_layout == "per_layer"
    jax.tree.map(np.testing.assert_array_equal, a.param_dict(), b.param_dict())


def test_bf16_linear_accumulates_in_float32_and_rounds_once():
    from rdt_jax.model.layers import linear

    lin = linear(64, 8, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    lin.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    y = lin(x)
    assert y.dtype == jnp.bfloat16
    w = np.asarray(lin.kernel[...], np.float64)
    want = (np.asarray(x, np.float64) @ w + np.asarray(lin.bias[...], np.float64)).astype(np.float32)
    # One rounding of the (float32-accumulated) sum: within half a bf16 ulp plus float32 summation error.
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32),
                               rtol=2**-8, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lin)(x))
    assert "preferred_element_type=float32" in jaxpr


def test_bf16_matmul_backward_equals_autodiff_of_the_same_products():
    from rdt_jax.model.layers import matmul_f32_accumulate

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((16, 5)), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((2, 7, 5)), jnp.bfloat16).astype(jnp.float32)  # bf16-exact, as in Linear

    def plain(x, w):
        return jax.lax.dot_general(x, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    np.testing.assert_array_equal(np.asarray(matmul_f32_accumulate(x, w)), np.asarray(plain(x, w)))
    got = jax.vjp(matmul_f32_accumulate, x, w)[1](ct)
    want = jax.vjp(plain, x, w)[1](ct)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype == jnp.bfloat16
        # Same exact products, float32 accumulation in both: equal up to summation order and one bf16 rounding.
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2**-7, atol=1e-6)
    hlo = jax.jit(lambda x, w: jax.grad(lambda x, w: jnp.sum(matmul_f32_accumulate(x, w) * ct), (0, 1))(x, w))
    dots = [line for line in hlo.lower(x, w).as_text().splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 2  # d/dx and d/dw (the gradient does not need the forward product)
    for line in dots:  # every product takes two bf16 operands and yields float32
        operands, result = line.split(" : (")[1].split(") -> ")
        assert operands.count("xbf16>") == 2 and result.endswith("xf32>"), line
