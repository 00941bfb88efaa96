"""AdamW + learning-rate schedules + global-norm clipping (optax), matching the official defaults.

Schedules follow diffusers' ``get_scheduler`` (which the official trainer uses), evaluated at the
number of optimiser updates already done, so the first update of a warm-up schedule uses lr 0.

The AdamW moments can be stored in bfloat16 (``mu_dtype``/``nu_dtype``), 2 bytes per parameter each
instead of 4. They are updated in float32 and rounded stochastically when stored: with b2 = 0.999 the
second moment changes by ~0.1 % per step, under half a bf16 ulp (0.2-0.4 %), so round-to-nearest
would freeze it (it could rise on a gradient spike but never decay).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rdt_jax.training.config import OptimConfig


def make_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    lr, warm = cfg.learning_rate, max(cfg.warmup_steps, 0)

    def warmup(count):
        return jnp.minimum(1.0, count / max(warm, 1)) if warm > 0 else jnp.ones_like(count, jnp.float32)

    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "constant_with_warmup":
        return lambda count: lr * warmup(jnp.asarray(count, jnp.float32))
    if cfg.schedule == "cosine":  # diffusers cosine with num_cycles 0.5: warm-up, then half a cosine to 0
        def cosine(count):
            c = jnp.asarray(count, jnp.float32)
            # Held at 1 past the schedule's end (diffusers' formula would climb back up: the official loop
            # never runs past it, a resumed run with a larger --num-steps would).
            progress = jnp.minimum((c - warm) / max(num_steps - warm, 1), 1.0)
            decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
            return lr * jnp.where(c < warm, warmup(c), decay)
        return cosine
    raise ValueError(f"unknown lr schedule {cfg.schedule!r}")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping as PyTorch's ``clip_grad_norm_`` (the official accelerate path):
    g * min(1, max_norm / (||g|| + 1e-6)), one scalar factor per step.

    optax's ``clip_by_global_norm`` has no 1e-6 (a ~1e-6 / ||g|| relative difference), and its form
    (``where(||g|| < max, g, g / ||g|| * max)`` per leaf) made XLA:CPU materialise a clipped copy of
    every gradient (+3 GB for rdt-1b); a scalar multiply fuses into the Adam update. ``global_norm``
    (an extra argument of ``update``) is ||g|| when the caller already has it: the train step sums
    the blocks' squares during the backward pass (``model.block_scan``).
    """

    def update(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _mix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a cheap bijective hash whose output bits all depend on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def stochastic_round_to_bf16(x: jax.Array, seed: jax.Array) -> jax.Array:
    """Round float32 ``x`` to bfloat16 up or down with probabilities that make the result unbiased.

    The random bits are a hash of (``seed``, element position), not a PRNG key: the result is the
    same however the array is sharded, and a resumed run rounds exactly as the uninterrupted one.
    """
    x = x.astype(jnp.float32)
    idx = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    key = _mix32(jnp.asarray(seed).astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15))
    noise = _mix32(idx ^ key) & jnp.uint32(0xFFFF)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # Adding uniform noise below the kept 16 bits and truncating rounds the magnitude up with
    # probability (dropped bits) / 2^16. inf keeps its (zero) low bits; NaN is left as it is.
    rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(jnp.isnan(x), x, rounded).astype(jnp.bfloat16)


def store_moments(
    adam: optax.GradientTransformation, mu_dtype: jnp.dtype, nu_dtype: jnp.dtype
) -> optax.GradientTransformation:
    """``adam`` (an ``optax.scale_by_adam`` with float32 moments) whose moments are kept in the
    given dtypes between steps; bfloat16 ones are rounded stochastically."""

    def cast(tree, dtype):
        return jax.tree.map(lambda m: m.astype(dtype), tree)

    def store(tree, dtype, seed):
        if jnp.dtype(dtype) != jnp.bfloat16:
            return cast(tree, dtype)
        leaves, treedef = jax.tree.flatten(tree)
        # One hash stream per (step, moment, leaf): the seed only has to differ between them.
        first = seed * jnp.uint32(len(leaves))
        return jax.tree.unflatten(
            treedef, [stochastic_round_to_bf16(m, first + jnp.uint32(i)) for i, m in enumerate(leaves)]
        )

    def init(params):
        state = adam.init(params)
        return state._replace(mu=cast(state.mu, mu_dtype), nu=cast(state.nu, nu_dtype))

    def update(updates, state, params=None):
        wide = state._replace(mu=cast(state.mu, jnp.float32), nu=cast(state.nu, jnp.float32))
        # bf16 gradients (of bf16 params) too: optax would square and scale them in bf16.
        updates, new = adam.update(cast(updates, jnp.float32), wide, params)
        seed = new.count.astype(jnp.uint32) * jnp.uint32(2)
        return updates, new._replace(mu=store(new.mu, mu_dtype, seed), nu=store(new.nu, nu_dtype, seed + 1))

    return optax.GradientTransformation(init, update)


def make_adamw(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax's AdamW (same chain, same state tree), its moments stored as ``cfg`` asks whatever the
    parameters' dtype (optax alone keeps the second moment in it: bf16 params would freeze it)."""
    mu_dtype, nu_dtype = jnp.dtype(cfg.mu_dtype), jnp.dtype(cfg.nu_dtype)
    return optax.chain(
        store_moments(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), mu_dtype, nu_dtype),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(cfg: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, cfg.decay_steps if cfg.decay_steps is not None else num_steps)
    adamw = make_adamw(cfg, schedule)
    if cfg.max_grad_norm > 0:
        # Really clips (the official DeepSpeed runs silently do not, TRAINING.md §3).
        return optax.chain(clip_by_global_norm(cfg.max_grad_norm), adamw), schedule
    return adamw, schedule
