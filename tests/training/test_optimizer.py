"""AdamW with moments stored in bfloat16: unbiased stochastic rounding, and moments that still decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rdt_jax.training.config import MeshConfig, OptimConfig
from rdt_jax.training.mesh import make_mesh
from rdt_jax.training.optimizer import make_optimizer, stochastic_round_to_bf16


def _bf16_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    down = bits.view(np.float32)
    up = (bits + np.uint32(0x10000)).view(np.float32)
    return down, up


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = np.float32(1.0) + np.float32(2.0**-7) * np.float32(0.3)  # 30 % of the way from 1 to the next bf16
    values = np.full((64, 1024), x, np.float32)
    values[1::2] *= -1  # negative numbers round their magnitude the same way
    r = np.asarray(stochastic_round_to_bf16(jnp.asarray(values), jnp.uint32(7)).astype(jnp.float32))
    down, up = _bf16_neighbours(np.abs(values))
    assert np.all((np.abs(r) == down) | (np.abs(r) == up))
    assert np.all(np.sign(r) == np.sign(values))
    frac_up = np.mean(np.abs(r) == up)
    assert abs(frac_up - 0.3) < 0.01, frac_up  # 65536 draws: std 0.0018
    # Round-to-nearest would always go down here; the mean stays at x.
    assert abs(np.mean(np.abs(r)) - x) < 2e-5
    # Exactly representable values, zero and inf are unchanged; NaN stays NaN.
    special = jnp.asarray([0.0, 1.5, -2.0, np.inf, -np.inf, np.nan], jnp.float32)
    out = np.asarray(stochastic_round_to_bf16(special, jnp.uint32(3)).astype(jnp.float32))
    np.testing.assert_array_equal(out[:5], np.asarray(special)[:5])
    assert np.isnan(out[5])


def test_rounding_depends_on_the_seed_and_position_not_on_the_sharding():
    values = jnp.asarray(np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32))
    a = stochastic_round_to_bf16(values, jnp.uint32(1))
    b = stochastic_round_to_bf16(values, jnp.uint32(2))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    sharded = jax.device_put(values, NamedSharding(mesh, PartitionSpec("data", "fsdp")))
    c = jax.jit(stochastic_round_to_bf16)(sharded, jnp.uint32(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def _run(cfg: OptimConfig, grads: list[np.ndarray]):
    tx, _ = make_optimizer(cfg, 10_000)
    params = {"w": jnp.zeros(grads[0].shape, jnp.float32)}
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update({"w": g}, s, p))
    for g in grads:
        _, state = step(jnp.asarray(g), state, params)
    return state[1][0] if cfg.max_grad_norm > 0 else state[0]


def test_float32_moments_are_optax_adamw_exactly():
    cfg = OptimConfig(max_grad_norm=0.0, schedule="constant")
    tx, schedule = make_optimizer(cfg, 100)
    ref = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    g = {"w": jnp.sin(jnp.arange(12.0)).reshape(3, 4)}
    s, r = tx.init(params), ref.init(params)
    assert jax.tree.structure(s) == jax.tree.structure(r)
    # bf16 storage keeps optax's state tree (checkpoints differ in dtypes only).
    low, _ = make_optimizer(OptimConfig(max_grad_norm=0.0, nu_dtype="bfloat16"), 100)
    assert jax.tree.structure(low.init(params)) == jax.tree.structure(r)
    for _ in range(3):
        u, s = tx.update(g, s, params)
        v, r = ref.update(g, r, params)
        np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(v["w"]))


def test_bf16_second_moment_decays_like_float32():
    """A gradient burst, then small gradients for 2000 steps: float32 nu decays by 0.999^2000 ≈ 0.135.
    Round-to-nearest bf16 would stay at the burst's level (each step's change is under half an ulp)."""
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(256,)).astype(np.float32) for _ in range(50)]
    grads += [1e-3 * rng.normal(size=(256,)).astype(np.float32) for _ in range(2000)]
    ref = _run(OptimConfig(max_grad_norm=0.0), grads)
    low = _run(OptimConfig(max_grad_norm=0.0, mu_dtype="bfloat16", nu_dtype="bfloat16"), grads)
    assert low.nu["w"].dtype == jnp.bfloat16 and low.mu["w"].dtype == jnp.bfloat16
    nu_ref, nu_low = np.asarray(ref.nu["w"]), np.asarray(low.nu["w"].astype(jnp.float32))
    # Summed over the 256 entries the rounding noise averages out: within 2 % of float32.
    assert abs(nu_low.sum() / nu_ref.sum() - 1) < 0.02, (nu_low.sum(), nu_ref.sum())
    # Per entry, the rounding errors of a pure decay add up as a random walk in relative terms
    # (~0.25 % per step, ~11 % after 2000 steps); their mean stays at zero.
    rel = nu_low / nu_ref - 1
    assert np.sqrt(np.mean(rel**2)) < 0.2 and abs(np.mean(rel)) < 0.03, (np.sqrt(np.mean(rel**2)), np.mean(rel))
    # What round-to-nearest storage would have kept: far from the decayed value.
    nearest = _run_nearest(grads)
    assert nearest.sum() > 3 * nu_ref.sum()


def _run_nearest(grads: list[np.ndarray]) -> np.ndarray:
    nu = jnp.zeros(grads[0].shape, jnp.bfloat16)
    update = jax.jit(lambda nu, g: (0.999 * nu.astype(jnp.float32) + 0.001 * g * g).astype(jnp.bfloat16))
    for g in grads:
        nu = update(nu, jnp.asarray(g))
    return np.asarray(nu.astype(jnp.float32))


def test_bf16_moments_are_deterministic():
    grads = [np.random.default_rng(i).normal(size=(8, 8)).astype(np.float32) for i in range(5)]
    a = _run(OptimConfig(nu_dtype="bfloat16"), grads)
    b = _run(OptimConfig(nu_dtype="bfloat16"), grads)
    np.testing.assert_array_equal(np.asarray(a.nu["w"]), np.asarray(b.nu["w"]))
    assert a.mu["w"].dtype == jnp.float32


def test_bf16_params_keep_float32_moments_when_asked():
    """optax alone keeps nu in the parameters' dtype; bf16 master weights must not imply bf16 moments."""
    tx, _ = make_optimizer(OptimConfig(max_grad_norm=0.0), 100)
    params = {"w": jnp.zeros((4,), jnp.bfloat16)}
    state = tx.init(params)
    adam = state[0]
    assert adam.mu["w"].dtype == jnp.float32 and adam.nu["w"].dtype == jnp.float32
    _, state = tx.update({"w": jnp.ones((4,), jnp.bfloat16)}, state, params)
    assert state[0].nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(state[0].nu["w"]), 1e-3, rtol=1e-4)  # (1 - b2) in float32
