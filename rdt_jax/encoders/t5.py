"""T5 v1.1 encoder (``T5EncoderModel.last_hidden_state``) in Flax NNX.

RDT uses ``google/t5-v1_1-xxl``'s encoder: d_model 4096, 64 heads × 64, gated-GELU FFN
(d_ff 10240, tanh GELU), 24 pre-norm blocks, no biases anywhere, no 1/sqrt(d) attention
scaling, a bidirectional relative position bias (32 buckets, max distance 128) owned by block 0
and shared by all blocks, T5's RMS layer norm (eps 1e-6, float32 statistics), a final norm.
Dropout is inactive (inference only). Other ``feed_forward_proj`` values transformers builds are
supported too: the original T5's non-gated ``act(wi x)`` (``"relu"``, ``"gelu"``, ...) and other
gated activations (``"gated-silu"``, ...).

The encoder has 4.76 B parameters (19 GB in float32, 9.5 GB in bfloat16). Every parameter
carries logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``layers``) so
:func:`load_t5` can lay it out over a device mesh (e.g. FSDP: ``{"embed": "fsdp"}``) while
streaming the checkpoint tensor by tensor. ``layer_layout="per_layer"`` (default) keeps each
block's parameters separate and unrolls the blocks, so XLA:CPU's dots read the weights in place
(the 32-token encoder is bound by its thin bf16 GEMMs over 9.5 GB of weights); ``"stacked"`` stacks them on a
leading ``layers`` axis and runs ``jax.lax.scan`` (constant compile time, but a per-call copy of
every block's weights on CPU). Dense weights keep torch's (out, in) layout and the activations
run feature-major, ``W @ x`` (``_ops.dense_t``); 16-bit compute multiplies with a float32
accumulator and rounds once, as PyTorch does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdt_jax.checks import check_index_range
from rdt_jax.encoders import _ops
from rdt_jax.encoders.hf_import import (
    CheckpointMismatchError,
    CheckpointReader,
    ParamSource,
    import_params,
    make_sharding_fn,
    per_layer_sources,
    read_config,
    torch_linear_source,
    vector_source,
)

__all__ = [
    "T5_V1_1_XXL",
    "T5Encoder",
    "T5EncoderConfig",
    "load_t5",
    "relative_position_buckets",
    "t5_sources",
]

# Default layout: FSDP over the model width; "tensor" (if the mesh has it) over heads / d_ff.
T5_SHARDING_RULES: dict[str, Any] = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

_ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self) -> None:
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated") or self.dense_act not in _ops.ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not supported: expected 'ACT' or 'gated-ACT' "
                f"(T5 v1.1: 'gated-gelu') with ACT one of {sorted(_ops.ACTIVATIONS)}"
            )

    @property
    def is_gated(self) -> bool:
        """v1.1's gated FFN, act(wi_0 x) * wi_1 x; otherwise the original act(wi x)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act(self) -> str:
        # As transformers' T5Config: "gated-gelu" means the tanh GELU (gelu_new), any other "[gated-]ACT" ACT.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json") -> T5EncoderConfig:
        """From a T5 ``config.json``; absent fields take ``transformers.T5Config`` defaults."""
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "t5" or (archs and not set(archs) & set(_ARCHITECTURES)):
            raise CheckpointMismatchError(
                f"{source}: model_type {cfg.get('model_type')!r}, architectures {archs} is not a T5 model "
                f"(expected model_type 't5' and one of {list(_ARCHITECTURES)})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        if "feed_forward_proj" not in cfg:
            kw["feed_forward_proj"] = "relu"  # transformers' default: original T5, not v1.1
        try:
            return cls(**kw)
        except ValueError as e:
            raise CheckpointMismatchError(f"{source}: {e}") from None


# google/t5-v1_1-xxl (published config.json).
T5_V1_1_XXL = T5EncoderConfig(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
)


@functools.lru_cache(maxsize=64)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket index (q_len, k_len) of ``key_pos - query_pos``, computed on the host.

    Half of the buckets per direction: the first half exact distances, the second half
    log-spaced up to ``max_distance`` (everything beyond shares the last bucket). Float32 log
    arithmetic as in the reference, so bucket boundaries agree bit for bit.
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    n = num_buckets // 2
    max_exact = n // 2
    dist = np.abs(rel)
    safe = np.maximum(dist, max_exact).astype(np.float32)  # the log branch is only used there
    scaled = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = np.minimum(max_exact + (scaled * np.float32(n - max_exact)).astype(np.int64), n - 1)
    buckets = (rel > 0).astype(np.int64) * n + np.where(dist < max_exact, dist, large)
    return buckets.astype(np.int32)


class _Blocks(nnx.Module):
    """The parameters of one encoder block, or (``n_layers``) of all, stacked along a leading ``layers`` axis."""

    def __init__(self, cfg: T5EncoderConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs, n_layers: int | None):
        d, inner, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
        p = lambda std, shape, names: _ops.layer_param(
            rngs, nnx.initializers.normal(std), n_layers, shape, names, param_dtype
        )
        ones = lambda shape, names: _ops.layer_param(rngs, nnx.initializers.ones, n_layers, shape, names, param_dtype)
        self.attn_norm = ones((d,), ("embed",))
        # Dense weights in torch's (out, in) layout, applied as ``W @ x`` (see ``_ops.dense_t``).
        self.q = p(d**-0.5 * cfg.d_kv**-0.5, (inner, d), ("heads", "embed"))
        self.k = p(d**-0.5, (inner, d), ("heads", "embed"))
        self.v = p(d**-0.5, (inner, d), ("heads", "embed"))
        self.o = p(inner**-0.5, (d, inner), ("embed", "heads"))
        self.ff_norm = ones((d,), ("embed",))
        if cfg.is_gated:
            self.wi_0 = p(d**-0.5, (f, d), ("mlp", "embed"))
            self.wi_1 = p(d**-0.5, (f, d), ("mlp", "embed"))
        else:
            self.wi = p(d**-0.5, (f, d), ("mlp", "embed"))
        self.wo = p(f**-0.5, (d, f), ("embed", "mlp"))


class T5Encoder(nnx.Module):
    """``(input_ids, attention_mask)`` -> ``last_hidden_state`` (B, L, d_model)."""

    def __init__(
        self,
        cfg: T5EncoderConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        layer_layout: _ops.LayerLayout = "per_layer",
        rngs: nnx.Rngs,
    ):
        _ops.check_layout(layer_layout)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.layer_layout = layer_layout
        param_dtype = jnp.dtype(param_dtype or dtype)
        mk = lambda init, shape, names: _ops.param(rngs, init, shape, names, param_dtype)
        self.embed = mk(nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.rel_bias = mk(
            nnx.initializers.normal(cfg.d_model**-0.5),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            (None, "heads"),
        )
        self.blocks = _ops.make_layers(lambda n: _Blocks(cfg, param_dtype=param_dtype, rngs=rngs, n_layers=n),
                                       cfg.num_layers, layer_layout)
        self.final_norm = mk(nnx.initializers.ones, (cfg.d_model,), ("embed",))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """``input_ids`` (B, L) int; ``attention_mask`` (B, L), nonzero = real token (None: all real).

        Padded positions are masked as keys; their own outputs are computed anyway (as in
        transformers) and must be ignored downstream.
        """
        cfg, dt = self.cfg, self.dtype
        b, length = input_ids.shape
        # Outside jit, an out-of-range id is an error (as in PyTorch); under jit, jnp.take would fill NaN.
        check_index_range("input_ids", input_ids, cfg.vocab_size)
        h, dk, eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
        # The residual stream is carried feature-major, x (d_model, B, L), so that every dense
        # layer is ``W @ x`` with the torch-layout weight on the left (``_ops.dense_t``): 1.5-2x
        # faster bf16 GEMMs on XLA:CPU for few tokens. Transposing the activations (B·L·d_model
        # elements) twice per call is negligible next to reading the weights.
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dt).transpose(2, 0, 1)

        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        bias = jnp.transpose(self.rel_bias[...][buckets], (2, 0, 1)).astype(dt)[None]  # (1, H, Lq, Lk)
        if attention_mask is not None:
            # Additive mask with the dtype's most negative value (a fully padded row stays finite).
            neg = jnp.asarray(jnp.finfo(dt).min, dt)
            bias = bias + jnp.where(attention_mask[:, None, None, :].astype(bool), jnp.asarray(0, dt), neg)

        act = _ops.activation(cfg.dense_act)

        def block(x: jax.Array, lp: dict[str, jax.Array]) -> tuple[jax.Array, None]:
            lp = _ops.to_device_memory(lp)  # offloaded blocks (load_t5(..., offload=True)) come from the host
            y = _ops.rms_norm(x, lp["attn_norm"], eps, axis=0).astype(dt)
            w = {k: v.astype(dt) for k, v in lp.items()}
            q = _ops.dense_t(w["q"], y).reshape(h, dk, b, length)
            k = _ops.dense_t(w["k"], y).reshape(h, dk, b, length)
            v = _ops.dense_t(w["v"], y).reshape(h, dk, b, length)
            # Scores and position bias in float32 (T5: no 1/sqrt(d_kv) scaling); float32 softmax.
            logits = jnp.einsum("hdbq,hdbk->bhqk", q, k, preferred_element_type=jnp.float32)
            probs = _ops.softmax_f32(logits + bias.astype(jnp.float32), dt)
            o = jnp.einsum("bhqk,hdbk->hdbq", probs, v, preferred_element_type=jnp.float32)
            x = x + _ops.dense_t(w["o"], o.astype(dt).reshape(h * dk, b, length))
            y = _ops.rms_norm(x, lp["ff_norm"], eps, axis=0).astype(dt)
            if cfg.is_gated:
                y = act(_ops.dense_t(w["wi_0"], y)) * _ops.dense_t(w["wi_1"], y)
            else:
                y = act(_ops.dense_t(w["wi"], y))
            x = x + _ops.dense_t(w["wo"], y)
            return x, None

        x = _ops.run_layers(block, x, self.blocks)
        return _ops.rms_norm(x, self.final_norm[...], eps, axis=0).astype(dt).transpose(1, 2, 0)


# Keys of a full T5 checkpoint that the encoder does not use.
_IGNORED = (r"decoder\..*", r"lm_head\.weight")


def t5_sources(cfg: T5EncoderConfig, layer_layout: _ops.LayerLayout = "per_layer") -> list[ParamSource]:
    """The HF key (and layout transform) of every parameter of :class:`T5Encoder`."""
    _ops.check_layout(layer_layout)
    d, inner, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    blk = lambda name: [f"encoder.block.{i}.{name}" for i in range(cfg.num_layers)]
    src = [
        # T5EncoderModel ties encoder.embed_tokens to shared; checkpoints store either or both.
        ParamSource(("embed",), (("shared.weight", "encoder.embed_tokens.weight"),), (cfg.vocab_size, d)),
        ParamSource(
            ("rel_bias",),
            (("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
        ),
        ParamSource(("final_norm",), (("encoder.final_layer_norm.weight",),), (d,)),
        vector_source(("blocks", "attn_norm"), blk("layer.0.layer_norm.weight"), d),
        torch_linear_source(("blocks", "q"), blk("layer.0.SelfAttention.q.weight"), d, inner),
        torch_linear_source(("blocks", "k"), blk("layer.0.SelfAttention.k.weight"), d, inner),
        torch_linear_source(("blocks", "v"), blk("layer.0.SelfAttention.v.weight"), d, inner),
        torch_linear_source(("blocks", "o"), blk("layer.0.SelfAttention.o.weight"), inner, d),
        vector_source(("blocks", "ff_norm"), blk("layer.1.layer_norm.weight"), d),
        *(
            [torch_linear_source(("blocks", name), blk(f"layer.1.DenseReluDense.{name}.weight"), d, f)
             for name in (("wi_0", "wi_1") if cfg.is_gated else ("wi",))]
        ),
        torch_linear_source(("blocks", "wo"), blk("layer.1.DenseReluDense.wo.weight"), f, d),
    ]
    return per_layer_sources(src) if layer_layout == "per_layer" else src


def load_t5(
    hf_dir: str | pathlib.Path,
    dtype: jnp.dtype = jnp.float32,
    *,
    param_dtype: jnp.dtype | None = None,
    layer_layout: _ops.LayerLayout = "per_layer",
    mesh: jax.sharding.Mesh | None = None,
    rules: dict[str, Any] | None = None,
    offload: bool = False,
) -> T5Encoder:
    """Build the T5 encoder from a Hugging Face directory (T5EncoderModel or a full T5 checkpoint).

    Weights are converted to ``param_dtype`` (default: ``dtype``) on the host, tensor by tensor,
    and placed on the default device, or laid out over ``mesh`` by their logical axis names
    and ``rules`` (default :data:`T5_SHARDING_RULES`), so no device ever holds the whole model
    unless the mesh is a single device. ``layer_layout``: see the module docstring.

    ``offload=True`` keeps the encoder blocks' weights in (pinned) host memory, laid out as the
    mesh says, and copies each block's weights to the device where it runs: T5-XXL (9.5 GB in
    bfloat16, 19 GB in float32) then needs about one block (~0.4 / 0.8 GB) of device memory besides
    the embedding table. Needs the ``per_layer`` layout.
    """
    if offload and layer_layout != "per_layer":
        raise ValueError("offload=True needs layer_layout='per_layer' (a stacked parameter is filled on the device)")
    hf_dir = pathlib.Path(hf_dir)
    cfg = T5EncoderConfig.from_hf(read_config(hf_dir), source=str(hf_dir / "config.json"))
    model = nnx.eval_shape(
        lambda: T5Encoder(cfg, dtype=dtype, param_dtype=param_dtype, layer_layout=layer_layout, rngs=nnx.Rngs(0))
    )
    graphdef, abstract = nnx.split(model)
    rules = T5_SHARDING_RULES if rules is None else rules
    with CheckpointReader(hf_dir) as reader:
        on_host = (lambda path: "pinned_host" if path[0] == "blocks" else None) if offload else None
        state = import_params(reader, abstract, t5_sources(cfg, layer_layout), ignore=_IGNORED,
                              sharding_for=make_sharding_fn(mesh, rules), memory_kind_for=on_host)
    return nnx.merge(graphdef, state)
