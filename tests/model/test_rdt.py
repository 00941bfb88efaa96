"""Structure of the denoiser: scanned blocks, odd depths, dtype separation."""

from __future__ import annotations

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
