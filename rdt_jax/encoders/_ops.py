"""Small numerical building blocks shared by the SigLIP and T5 encoders."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: tuple[str | None, ...],
    dtype: jnp.dtype,
) -> nnx.Param:
    """A parameter carrying logical axis names (``out_sharding``) for mesh layout.

    Eager sharding is off: the names are logical ("embed", "mlp", ...) and are mapped to mesh
    axes only when weights are placed (``hf_import.logical_sharding``), not at construction.
    """
    assert len(names) == len(shape), (names, shape)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=names, eager_sharding=False)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with statistics in float32 (as torch does for half inputs), output in x.dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5's layer norm: no mean subtraction, no bias, mean of squares in float32.

    The normalised activations are cast to the weight dtype before the scale multiply when the
    weights are half precision (and kept float32 otherwise), as in the reference implementation.
    """
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + eps)
    if scale.dtype != jnp.float32:
        y = y.astype(scale.dtype)
    return (scale * y).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (``gelu_pytorch_tanh`` / ``gelu_new``)."""
    return jax.nn.gelu(x, approximate=True)


def softmax_f32(logits: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Softmax in float32 whatever the compute dtype, cast back for the value matmul."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def scan_layers(
    body: Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, None]],
    x: jax.Array,
    layer_params: Mapping[str, jax.Array],
) -> jax.Array:
    """``jax.lax.scan`` of ``body`` over layer-stacked parameters; one compiled layer for any depth.

    16-bit float weights cross the loop boundary bit-cast to uint16. Otherwise XLA:CPU, which
    computes bf16 dots in f32, hoists the bf16->f32 convert out of the loop and materialises
    every layer's weights in f32 at once (19 GB for T5-XXL in "bf16"). The bit-casts are not free on
    XLA:CPU (a 16-bit copy of the weights per call), but far cheaper than the f32 copy they prevent.
    """
    dtypes = {k: jnp.dtype(v.dtype) for k, v in layer_params.items()}
    hidden = {k for k, dt in dtypes.items() if dt.itemsize == 2 and jnp.issubdtype(dt, jnp.floating)}
    packed = {k: jax.lax.bitcast_convert_type(v, jnp.uint16) if k in hidden else v for k, v in layer_params.items()}

    def step(x: jax.Array, lp: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        lp = {k: jax.lax.bitcast_convert_type(v, dtypes[k]) if k in hidden else v for k, v in lp.items()}
        return body(x, lp)

    x, _ = jax.lax.scan(step, x, packed)
    return x


def param_arrays(module: nnx.Module) -> dict[str, jax.Array]:
    """A stacked-layer module's own parameters by attribute name, as arrays for ``scan_layers``."""
    return {k: v[...] for k, v in vars(module).items() if isinstance(v, nnx.Param)}
