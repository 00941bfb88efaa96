"""Small building blocks: linear layers with the official initialisers, MLPs, embedders, adaptors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rdt_jax.model.attention import as_bits, from_bits
from rdt_jax.model.config import adaptor_depth

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def torch_default_bias_init(fan_in: int) -> nnx.Initializer:
    """``nn.Linear``'s default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _contract_last(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul_f32_accumulate(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over x's last axis with a float32 result; for 16-bit inputs the backward products also
    take 16-bit inputs (the incoming cotangent is rounded to them) and accumulate in float32.

    This is PyTorch autocast's bf16 matmul backward. Plain autodiff would multiply the float32
    cotangent by the bf16 operands, which XLA:CPU runs as float32 GEMMs after converting the weights:
    half the speed of its native bf16 kernels.
    """
    return _contract_last(x, w)


def _matmul_fwd(x, w):
    return _contract_last(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    batch_axes = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((batch_axes, batch_axes), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul_f32_accumulate.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel (+ bias)`` over x's last axis: float32 accumulator, bias added in float32, one
    rounding to ``x.dtype`` (16-bit inputs go through :func:`matmul_f32_accumulate`). In float32 it
    is exactly ``x @ kernel + bias``."""
    y = matmul_f32_accumulate(x, kernel) if jnp.dtype(x.dtype).itemsize < 4 else _contract_last(x, kernel)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense_split(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, at: int) -> tuple[jax.Array, jax.Array]:
    """:func:`dense` with its output features split at ``at``: ``(y[..., :at], y[..., at:])``, the same
    numbers, computed as two products over the kernel's halves (no slicing copy of the output, and
    two half-size float32 results).

    The backward joins the two cotangents and runs one product per gradient: two halves of the
    weight gradient would be concatenated into place afterwards (inside a scan, into the stacked
    gradient), which XLA:CPU does several times slower than the product itself.
    """
    return _dense_split_fwd(x, kernel, bias, at)[0]


def _dense_split_fwd(x, kernel, bias, at):
    halves = ((kernel[:, :at], None if bias is None else bias[:at]),
              (kernel[:, at:], None if bias is None else bias[at:]))
    return tuple(dense(x, w, b) for w, b in halves), (x, kernel, bias)


def _dense_split_bwd(at, res, g):
    x, kernel, bias = res
    # The outputs are rounded to x.dtype, so their cotangents are exact in it: 16-bit products. Joined
    # as bit patterns: a 16-bit float concatenate is one XLA:CPU widens, and it moved the cotangents'
    # rounding after the join (rdt-1b image K|V: a 70 MB float32 join and a rounding pass per block).
    g = from_bits(jnp.concatenate([as_bits(c.astype(x.dtype)) for c in g], axis=-1), x.dtype)
    dx, dw = _matmul_bwd((x, kernel), g)
    db = None if bias is None else jnp.sum(g.astype(jnp.float32), axis=tuple(range(x.ndim - 1))).astype(bias.dtype)
    return dx, dw, db


dense_split.defvjp(_dense_split_fwd, _dense_split_bwd)


# The name every Linear output carries for remat policies: inside RDT's blocks these are the products over
# the action-sequence tokens ("save_cond_kv_and_tokens" saves them). Named after the rounding to the
# compute dtype, so a bf16 block keeps 2 bytes per value, not the float32 product's 4.
LINEAR_OUT_NAME = "linear_out"


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters) that accumulates and adds the bias in float32, rounding once.

    For 16-bit compute this is PyTorch's bf16 ``addmm`` (float32 accumulator, bias added before the
    single rounding). It is also what XLA:CPU runs fast: it has native bf16 kernels only for a
    float32 result and rewrites a bf16-result dot to convert both operands, weights included, to
    float32 first; and a bf16 bias gradient (a sum over every token) becomes a slow tree reduction.
    """

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        if out_sharding is None and self.precision is None:
            return checkpoint_name(dense(inputs, kernel, bias), LINEAR_OUT_NAME)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision,
                                preferred_element_type=jnp.float32, out_sharding=out_sharding)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return checkpoint_name(y.astype(inputs.dtype), LINEAR_OUT_NAME)


def linear(
    din: int,
    dout: int,
    *,
    rngs: nnx.Rngs,
    dtype,
    param_dtype,
    kernel_init: nnx.Initializer = xavier_uniform,
    bias_init: nnx.Initializer = zeros,
) -> Linear:
    """A biased Linear; defaults are the RDT init (Xavier-uniform weight over the fused matrix, zero bias)."""
    return Linear(
        din, dout, use_bias=True, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
    )


class Mlp(nnx.Module):
    """timm ``Mlp``: fc1 -> tanh-GELU -> fc2 (hidden width given explicitly; RDT uses ratio 1)."""

    def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                 fc2_init: nnx.Initializer = xavier_uniform):
        self.fc1 = linear(din, dhidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = linear(dhidden, dout, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=fc2_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class TimestepEmbedder(nnx.Module):
    """Scalar (diffusion step or control frequency) -> ``[cos, sin]`` sinusoid (256) -> Linear-SiLU-Linear."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype, freq_dim: int = 256,
                 max_period: float = 10000.0):
        init = nnx.initializers.normal(0.02)
        self.mlp0 = linear(freq_dim, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=init)
        self.mlp2 = linear(hidden, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=init)
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.dtype = dtype

    def sinusoid(self, t: jax.Array) -> jax.Array:
        half = self.freq_dim // 2
        # A trace-time constant, correctly rounded to float32, so every backend uses the same table
        # (XLA's exp differs between CPU/GPU/TPU in the last ulp; at t=999 one ulp moves cos by ~1e-4).
        exponent = (-math.log(self.max_period) * np.arange(half, dtype=np.float32) / np.float32(half))
        exponent = exponent.astype(np.float32)
        freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
        args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        if self.freq_dim % 2:
            emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
        return emb

    def __call__(self, t: jax.Array) -> jax.Array:
        emb = self.sinusoid(t).astype(self.dtype)
        return self.mlp2(jax.nn.silu(self.mlp0(emb)))


class Adaptor(nnx.Module):
    """Condition adaptor from a spec string: ``linear`` or ``mlp{k}x_gelu`` (Linear, then k-1 x [GELU, Linear]).

    Initialised like PyTorch's default ``nn.Linear`` (the official code never re-initialises adaptors).
    """

    def __init__(self, spec: str, din: int, dout: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        n = adaptor_depth(spec)
        kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        self.layers = nnx.List([
            linear(din if i == 0 else dout, dout, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=kernel_init, bias_init=torch_default_bias_init(din if i == 0 else dout))
            for i in range(n)
        ])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for i, layer in enumerate(self.layers):
            if i:
                x = gelu_tanh(x)
            x = layer(x)
        return x
