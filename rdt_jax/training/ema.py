"""EMA of the parameters, kept in float32 whatever the parameter dtype (the official one is bf16 and
freezes, TRAINING.md §6), with the official power schedule of ``models/ema_model.py``."""

from __future__ import annotations

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
