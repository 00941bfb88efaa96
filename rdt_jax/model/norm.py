"""The norm RDT uses everywhere (block norms, q/k norms, final norm).

timm 1.0.3's ``RmsNorm`` (the version the official code pins) is a *variance* norm:
``x * rsqrt(var_unbiased(x) + eps) * w`` — mean-centred, Bessel-corrected variance in the
denominator, un-centred numerator (MODEL.md §5.1). The released weights were trained with it, so it
is the default; the true RMS form (timm >= 1.0.13) is selectable with ``norm_form="rms"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _inv_scale(x32: jax.Array, eps: float, form: str) -> jax.Array:
    if form == "timm_var":
        denom = jnp.var(x32, axis=-1, keepdims=True, ddof=1)
    elif form == "rms":
        denom = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    else:
        raise ValueError(f"unknown norm form {form!r}")
    return jax.lax.rsqrt(denom + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_scale(x: jax.Array, weight: jax.Array, eps: float, form: str) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * _inv_scale(x32, eps, form) * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def _rms_scale_fwd(x, weight, eps, form):
    x32 = x.astype(jnp.float32)
    r = _inv_scale(x32, eps, form)
    return (x32 * r * weight.astype(jnp.float32)).astype(x.dtype), (x, weight, r)


def _rms_scale_bwd(eps, form, res, dy):
    # Written out so that XLA:CPU makes two passes over x: autodiff saved a float32 copy of x and
    # materialised the weight broadcast to x's full shape (the condition keys: 36 MB per image block).
    del eps
    x, weight, r = res
    x32, w32 = x.astype(jnp.float32), weight.astype(jnp.float32)
    gy = dy.astype(jnp.float32)
    gx = gy * x32
    # Both sums as products with the small operand (the weight, the per-row scales): XLA:CPU's
    # reduction kernels take their inputs materialised, so a broadcast weight or scale inside a
    # sum became a full-size float32 array.
    hi = jax.lax.Precision.HIGHEST
    n = x.shape[-1]
    # dw = r^T gx over the flattened rows, r on the left: gx stays as it is (no transposed copy).
    dw = jnp.matmul(r.reshape(1, -1), gx.reshape(-1, n), precision=hi)[0]
    s = jax.lax.dot_general(gx, w32, (((x.ndim - 1,), (0,)), ((), ())), precision=hi)[..., None]
    # d r / d x_i = -r^3 / 2 * d denom / d x_i; d denom / d x_i = 2 (x_i - mean) / (n - 1) (timm_var)
    # or 2 x_i / n (rms).
    centred, count = (x32 - jnp.mean(x32, axis=-1, keepdims=True), n - 1) if form == "timm_var" else (x32, n)
    dx = gy * w32 * r - centred * (s * r**3 / count)
    return dx.astype(x.dtype), dw.astype(weight.dtype)


_rms_scale.defvjp(_rms_scale_fwd, _rms_scale_bwd)


def rms_scale(x: jax.Array, weight: jax.Array, *, eps: float, form: str) -> jax.Array:
    """Normalises the last axis in float32 and returns the input dtype."""
    if form not in ("timm_var", "rms"):
        raise ValueError(f"unknown norm form {form!r}")
    return _rms_scale(x, weight, eps, form)


class RmsNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, form: str = "timm_var", param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype))
        self.eps = eps
        self.form = form

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_scale(x, self.weight[...], eps=self.eps, form=self.form)
