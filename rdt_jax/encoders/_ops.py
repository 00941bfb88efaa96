"""Small numerical building blocks shared by the SigLIP and T5 encoders."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

# The encoders' dense layers are the model's (float32 accumulation, one rounding).
from rdt_jax.model.attention import as_bits, from_bits, head_group_size, scaled_logits
from rdt_jax.model.layers import dense as dense

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


def layer_param(
    rngs: nnx.Rngs,
    init: Initializer,
    n_layers: int | None,
    shape: Sequence[int],
    names: tuple[str | None, ...],
    dtype: jnp.dtype,
) -> nnx.Param:
    """:func:`param` of one layer (``n_layers`` None) or of ``n_layers`` stacked on a leading ``layers`` axis."""
    if n_layers is None:
        return param(rngs, init, shape, names, dtype)
    return param(rngs, init, (n_layers, *shape), ("layers", *names), dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with statistics in float32 (as torch does for half inputs), output in x.dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """T5's layer norm over ``axis``: no mean subtraction, no bias, mean of squares in float32.

    The normalised activations are cast to the weight dtype before the scale multiply when the
    weights are half precision (and kept float32 otherwise), as in the reference implementation.
    """
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=axis, keepdims=True)
    y = xf * jax.lax.rsqrt(var + eps)
    if scale.dtype != jnp.float32:
        y = y.astype(scale.dtype)
    axis = axis % x.ndim
    scale = scale.reshape(scale.shape + (1,) * (x.ndim - 1 - axis))  # broadcast along ``axis``
    return (scale * y).astype(x.dtype)


def dense_t(w: jax.Array, x_t: jax.Array) -> jax.Array:
    """``w @ x_t``: a torch-layout (out, in) weight times feature-major activations (in, ...).

    Float32 accumulator and one rounding to ``x_t.dtype``, like :func:`dense`, whose transpose
    it is (``dense_t(w, x.T) == dense(x, w.T).T``). It exists for speed: with few tokens (T5 on a
    32-token instruction) the GEMM is a thin product, and XLA:CPU's bf16 kernels
    (YNNPACK) run it far faster with the weight as the left operand contracting over its last
    (contiguous) axis. Measured on this 2-core Zen 5, bf16, 32 columns: 513-595 GFLOP/s for
    T5-XXL's three weight shapes, against 243-263 for ``x @ w`` with an (in, out) weight and
    223-338 for ``x @ w.T`` with an (out, in) one.
    """
    lead = x_t.shape[1:]
    x2 = x_t.reshape(x_t.shape[0], -1)  # a bitcast: the token axes are the minor ones
    y = jax.lax.dot_general(w, x2, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x_t.dtype).reshape(w.shape[0], *lead)


def to_device_memory(params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``params`` with those kept in host memory (offloaded weights) copied to device memory, where the
    layer that uses them runs; inside jit the copy is scheduled per layer, so the device holds about one
    layer's weights at a time. Arrays already in device memory pass through."""
    def fetch(x: jax.Array) -> jax.Array:
        on_host = getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host
        return jax.device_put(x, jax.memory.Space.Device) if on_host else x

    return {k: fetch(v) for k, v in params.items()}


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (``gelu_pytorch_tanh`` / ``gelu_new``), evaluated in float32 and
    rounded once to ``x.dtype`` (as PyTorch's half-precision GELU kernels do)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def _in_float32(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


# transformers' ``ACT2FN`` names that SigLIP's ``hidden_act`` and T5's ``feed_forward_proj`` may take,
# each evaluated in float32 and rounded once. ``gelu`` is the exact (erf) GELU; ``gelu_new``,
# ``gelu_pytorch_tanh`` and ``gelu_fast`` are the same tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _in_float32(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "quick_gelu": _in_float32(lambda x: x * jax.nn.sigmoid(1.702 * x)),
    "relu": jax.nn.relu,
    "silu": _in_float32(jax.nn.silu),
    "swish": _in_float32(jax.nn.silu),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation named ``name`` (a key of :data:`ACTIVATIONS`); ValueError otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def softmax_f32(logits: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Softmax in float32 whatever the compute dtype, cast back for the value matmul."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


# Scores per attention group: one so400m (batch, head) pair (729 x 729 float32 scores, ~2 MB, a core's
# L2 here) per step was fastest on XLA:CPU (bf16: 60-68 ms against 70-78 for two or four pairs, six
# so400m images x 16 heads, 2-core Xeon); small inputs still batch many pairs per step.
_GROUP_SCORE_BYTES = 2 * 2**20


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention of ``q``, ``k``, ``v`` (B, S, H, hd) -> (B, S, H, hd) scaled by ``hd ** -0.5``,
    no mask, one dtype.

    In float32 it is the textbook computation. With 16-bit inputs it is PyTorch's bf16 CPU attention
    (its flash kernel behind ``scaled_dot_product_attention``): 16-bit operands, float32
    accumulation, the scale applied to the float32 logits, the exponentials taken in float32 and
    rounded to the input dtype for the value product, the rows normalised after that product in
    float32, one rounding of the output. The row sums are over the rounded exponentials, so the
    weights the values see sum to one. Against normalising first (probabilities rounded, as eager
    attention does) this skips a float32 pass over the scores and is as accurate (relative error to
    float64 2.25e-3 against 2.35e-3 on so400m-shaped inputs) and 25-30 % faster for SigLIP's
    6 x 16 heads of 729 x 72. The model's group kernel (``rdt_jax.model.attention._attend_group``)
    differs in one point, its row sums over the float32 exponentials (the log-sum-exp its backward
    reuses): here that costs XLA:CPU a separate pass, 92 against 65-70 ms a layer in bf16, so this
    forward-only kernel does not call it. The logits are the model's (:func:`scaled_logits`).

    Computed (batch, head) pair by pair, the pairs laid out head-major once, so a pair's scores
    stay in cache: in float32, 15-20 % faster than ``head_major_attention``'s groups of one head over
    all six images (12.7 MB of scores), with the same numbers.
    """
    b, s, h, hd = q.shape
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # 16-bit inputs are sliced below as bit patterns: XLA:CPU has no 16-bit float dynamic-slice and
    # would widen all of q, k and v to float32 in front of the loop.
    qh, kh, vh = (as_bits(jnp.swapaxes(t, 1, 2).reshape(b * h, s, hd)) for t in (q, k, v))
    g = head_group_size(b * h, s * s * 4, budget=_GROUP_SCORE_BYTES)

    def group(i: jax.Array) -> jax.Array:
        qg, kg, vg = (from_bits(jax.lax.dynamic_slice_in_dim(t, i * g, g, 0), dt) for t in (qh, kh, vh))
        logits = scaled_logits(qg, kg, None)
        weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).astype(dt)
        total = jnp.sum(weights.astype(jnp.float32), axis=-1, keepdims=True)
        out = jnp.matmul(weights, vg, preferred_element_type=jnp.float32)
        # Stacked as bits: XLA:CPU widens a 16-bit float dynamic-update-slice (lax.map's stacking)
        # to float32, converting the whole output buffer on every group.
        return as_bits((out / total).astype(dt))

    out = from_bits(jax.lax.map(group, jnp.arange(b * h // g)), dt)  # (b*h/g, g, S, hd)
    return jnp.swapaxes(out.reshape(b, h, s, hd), 1, 2)


LayerLayout = Literal["per_layer", "stacked"]
LAYER_LAYOUTS: tuple[str, ...] = ("per_layer", "stacked")


def check_layout(layer_layout: str) -> None:
    if layer_layout not in LAYER_LAYOUTS:
        raise ValueError(f"layer_layout must be one of {LAYER_LAYOUTS}, got {layer_layout!r}")


def make_layers(make: Callable[[int | None], nnx.Module], n_layers: int, layer_layout: str) -> nnx.Module:
    """The encoder's layers in ``layer_layout``: ``make(n_layers)`` (one module of stacked
    parameters) or an ``nnx.List`` of ``make(None)`` (one module per layer)."""
    check_layout(layer_layout)
    if layer_layout == "stacked":
        return make(n_layers)
    return nnx.List([make(None) for _ in range(n_layers)])


def run_layers(
    body: Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, None]],
    x: jax.Array,
    layers: nnx.Module | Sequence[nnx.Module],
) -> jax.Array:
    """Apply ``body`` layer after layer: a Python loop over per-layer modules (``per_layer``
    layout), or :func:`scan_layers` over one module of layer-stacked parameters (``stacked``).

    ``per_layer`` is the fast layout on XLA:CPU: every dot reads its weights where they lie. In a
    scan each layer's weights are first copied out of the stack (a dynamic slice per parameter and
    layer) and 16-bit weights also need the bit-cast below; for T5-XXL with 32 tokens, which is
    bound by reading its weights, those copies made the stacked encoder 4x slower. ``stacked``
    compiles one layer body whatever the depth.
    """
    if isinstance(layers, nnx.Module) and not isinstance(layers, nnx.List):
        return scan_layers(body, x, param_arrays(layers))
    for layer in layers:
        x, _ = body(x, param_arrays(layer))
    return x


def scan_layers(
    body: Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, None]],
    x: jax.Array,
    layer_params: Mapping[str, jax.Array],
) -> jax.Array:
    """``jax.lax.scan`` of ``body`` over layer-stacked parameters; one compiled layer for any depth.

    16-bit float weights cross the loop boundary bit-cast to uint16. Otherwise XLA:CPU's bf16
    normalisation turns the stacked weights into float32 loop operands (a bf16->f32 convert hoisted
    out of the loop, re-rounded to bf16 in front of each dot) and materialises every layer's weights
    in f32 at once (19 GB for T5-XXL in "bf16"). This still happens with float32-accumulating dots
    (:func:`dense`): measured on 3 so400m layers in bf16, 0.90 s with the bit-cast, 1.05 s without.
    The bit-casts are not free on XLA:CPU (a 16-bit copy of the weights per call), but far cheaper
    than the f32 copy they prevent; the ``per_layer`` layout (:func:`run_layers`) needs neither.
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
