"""EMA of the parameters, kept in float32 whatever the parameter dtype (the official one is bf16 and
freezes, TRAINING.md §6), with the official power schedule of ``models/ema_model.py``."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rdt_jax.model.config import EmaConfig


def ema_decay(cfg: EmaConfig, n: jax.Array | int) -> jax.Array:
    """Decay used by the n-th update (n = 0, 1, ...): 0 while step <= 0, then 1 - (1 + step/inv_gamma)^-power
    clipped to [min_value, max_value], with step = max(0, n - update_after_step - 1)."""
    step = jnp.maximum(0.0, jnp.asarray(n, jnp.float32) - cfg.update_after_step - 1)
    value = 1.0 - (1.0 + step / cfg.inv_gamma) ** (-cfg.power)
    value = jnp.clip(value, cfg.min_value, cfg.max_value)
    return jnp.where(step <= 0, 0.0, value)


def ema_init(params: Any) -> Any:
    # A real copy: the EMA must not alias the (donated) parameter buffers.
    return jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)


def ema_update(cfg: EmaConfig, ema: Any, params: Any, n: jax.Array) -> Any:
    d = ema_decay(cfg, n)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), ema, params)


def ema_update_accumulated(cfg: EmaConfig, ema: Any, old_params: Any, new_params: Any, step: jax.Array,
                           micro_steps: int) -> Any:
    """The EMA after one optimiser step of ``micro_steps`` accumulated micro-batches, as the official loop
    leaves it: ``ema.step`` runs on every micro-step (calls ``n = step * micro_steps + j``), the first
    ``micro_steps - 1`` of them before the parameters change (pulling towards ``old_params``), the last
    after the update (towards ``new_params``). With one micro-step this is :func:`ema_update` at ``step``.
    """
    if micro_steps == 1:
        return ema_update(cfg, ema, new_params, step)
    first = jnp.asarray(step) * micro_steps
    # The calls towards the same (old) parameters compose into one with the product of their decays.
    held = functools.reduce(jnp.multiply, [ema_decay(cfg, first + j) for j in range(micro_steps - 1)])
    last = ema_decay(cfg, first + micro_steps - 1)

    def update(e, p_old, p_new):
        e = held * e + (1.0 - held) * p_old.astype(jnp.float32)
        return last * e + (1.0 - last) * p_new.astype(jnp.float32)

    return jax.tree.map(update, ema, old_params, new_params)
