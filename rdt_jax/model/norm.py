"""The norm RDT uses everywhere (block norms, q/k norms, final norm).

timm 1.0.3's ``RmsNorm`` (the version the official code pins) is a *variance* norm:
``x * rsqrt(var_unbiased(x) + eps) * w`` — mean-centred, Bessel-corrected variance in the
denominator, un-centred numerator (MODEL.md §5.1). The released weights were trained with it, so it
is the default; the true RMS form (timm >= 1.0.13) is selectable with ``norm_form="rms"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_scale(x: jax.Array, weight: jax.Array, *, eps: float, form: str) -> jax.Array:
    """Normalises the last axis in float32 and returns the input dtype."""
    x32 = x.astype(jnp.float32)
    if form == "timm_var":
        denom = jnp.var(x32, axis=-1, keepdims=True, ddof=1)
    elif form == "rms":
        denom = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    else:
        raise ValueError(f"unknown norm form {form!r}")
    y = x32 * jax.lax.rsqrt(denom + eps) * weight.astype(jnp.float32)
    return y.astype(x.dtype)


class RmsNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, form: str = "timm_var", param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype))
        self.eps = eps
        self.form = form

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_scale(x, self.weight[...], eps=self.eps, form=self.form)
