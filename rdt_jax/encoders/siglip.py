"""SigLIP vision tower (``SiglipVisionModel.last_hidden_state``) in Flax NNX.

RDT uses ``google/siglip-so400m-patch14-384``: 384×384 images, 14×14 patches (27×27 = 729
tokens; the last 6 pixel rows/columns are never seen), width 1152, 27 pre-LN layers, 16 heads,
MLP 4304 with tanh-GELU, LayerNorm eps 1e-6, a final ``post_layernorm``. The attention-pooling
head is not used by RDT and is not built (its checkpoint keys are skipped on import).

Layout choices (for speed and constant compile time):

* the patch embedding is a reshape + one matmul (exactly a stride-P, "valid" convolution);
* ``layer_layout="per_layer"`` (default) keeps each layer's parameters separate (``layers`` is an
  ``nnx.List``) and unrolls the layers: XLA:CPU's dots then read the weights in place.
  ``"stacked"`` stacks them along a leading ``layers`` axis and runs ``jax.lax.scan`` (one layer
  body compiled whatever the depth, but a copy of each layer's weights per call on CPU);
* 16-bit compute multiplies with a float32 accumulator and rounds once (``_ops.dense``), as
  PyTorch does, and the way XLA:CPU runs bf16 dots natively;
* kernels are stored ``(in, out)`` so every projection is a plain ``x @ W``;
* ``param_dtype`` and ``dtype`` (compute) are separate; LayerNorm statistics and the
  attention softmax are always float32.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rdt_jax.encoders import _ops
from rdt_jax.encoders.hf_import import (
    CheckpointMismatchError,
    CheckpointReader,
    ParamSource,
    import_params,
    linear_source,
    make_sharding_fn,
    per_layer_sources,
    read_config,
    vector_source,
)

__all__ = ["SIGLIP_SO400M_384", "SiglipVisionConfig", "SiglipVisionTower", "load_siglip", "siglip_sources"]

# Logical axis -> mesh axes. SigLIP (0.4B) is small: by default only FSDP-shard the width.
SIGLIP_SHARDING_RULES: dict[str, Any] = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor"}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.hidden_act not in _ops.ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (SigLIP uses gelu_pytorch_tanh; "
                             f"supported: {sorted(_ops.ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json") -> SiglipVisionConfig:
        """From a ``siglip_vision_model`` config, or the ``vision_config`` of a full ``siglip`` one.

        Absent fields take ``transformers.SiglipVisionConfig``'s defaults (the published so400m
        config lists only the fields that differ from them).
        """
        model_type = cfg.get("model_type")
        if model_type == "siglip":
            cfg = cfg.get("vision_config") or {}
        elif model_type != "siglip_vision_model":
            raise CheckpointMismatchError(
                f"{source}: model_type {model_type!r} (architectures {cfg.get('architectures')}) is not a "
                "SigLIP model; expected 'siglip' or 'siglip_vision_model'"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in cfg.items() if k in names})
        except ValueError as e:
            raise CheckpointMismatchError(f"{source}: {e}") from None


# google/siglip-so400m-patch14-384 (published config.json, vision part).
SIGLIP_SO400M_384 = SiglipVisionConfig(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)


class _Layers(nnx.Module):
    """The parameters of one encoder layer, or (``n_layers``) of all, stacked along a leading ``layers`` axis."""

    def __init__(self, cfg: SiglipVisionConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs, n_layers: int | None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        w = nnx.initializers.normal(0.02)
        zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
        p = lambda init, shape, names: _ops.layer_param(rngs, init, n_layers, shape, names, param_dtype)
        self.ln1_scale = p(ones, (d,), ("embed",))
        self.ln1_bias = p(zeros, (d,), ("embed",))
        self.q_kernel = p(w, (d, d), ("embed", "heads"))
        self.q_bias = p(zeros, (d,), ("heads",))
        self.k_kernel = p(w, (d, d), ("embed", "heads"))
        self.k_bias = p(zeros, (d,), ("heads",))
        self.v_kernel = p(w, (d, d), ("embed", "heads"))
        self.v_bias = p(zeros, (d,), ("heads",))
        self.o_kernel = p(w, (d, d), ("heads", "embed"))
        self.o_bias = p(zeros, (d,), ("embed",))
        self.ln2_scale = p(ones, (d,), ("embed",))
        self.ln2_bias = p(zeros, (d,), ("embed",))
        self.fc1_kernel = p(w, (d, f), ("embed", "mlp"))
        self.fc1_bias = p(zeros, (f,), ("mlp",))
        self.fc2_kernel = p(w, (f, d), ("mlp", "embed"))
        self.fc2_bias = p(zeros, (d,), ("embed",))


class SiglipVisionTower(nnx.Module):
    """``pixel_values`` (normalised to [-1, 1]) -> ``last_hidden_state`` (B, num_patches, hidden)."""

    def __init__(
        self,
        cfg: SiglipVisionConfig,
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
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        mk = lambda init, shape, names: _ops.param(rngs, init, shape, names, param_dtype)
        # Conv kernel in HWIO order so that a (row, col, channel)-flattened patch is one matmul row.
        self.patch_kernel = mk(nnx.initializers.normal(0.02), (p, p, c, d), (None, None, None, "embed"))
        self.patch_bias = mk(nnx.initializers.zeros, (d,), ("embed",))
        self.pos_embed = mk(nnx.initializers.normal(0.02), (cfg.num_patches, d), (None, "embed"))
        self.layers = _ops.make_layers(lambda n: _Layers(cfg, param_dtype=param_dtype, rngs=rngs, n_layers=n),
                                       cfg.num_hidden_layers, layer_layout)
        self.post_ln_scale = mk(nnx.initializers.ones, (d,), ("embed",))
        self.post_ln_bias = mk(nnx.initializers.zeros, (d,), ("embed",))

    def __call__(self, pixel_values: jax.Array, *, channels_last: bool = False) -> jax.Array:
        """``pixel_values``: (B, C, H, W) as transformers takes it, or (B, H, W, C) with ``channels_last``."""
        cfg, dt = self.cfg, self.dtype
        x = pixel_values if channels_last else jnp.transpose(pixel_values, (0, 2, 3, 1))
        b, h, w, c = x.shape
        p = cfg.patch_size
        gh, gw = h // p, w // p
        if c != cfg.num_channels or gh * gw != cfg.num_patches:
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape} (channels_last={channels_last}) does not give "
                f"{cfg.num_patches} patches of {p}x{p} with {cfg.num_channels} channels"
            )
        # "valid" stride-p convolution == crop, cut into patches, one matmul.
        x = x[:, : gh * p, : gw * p, :].astype(dt)
        x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        x = _ops.dense(x, self.patch_kernel[...].astype(dt).reshape(p * p * c, -1), self.patch_bias[...].astype(dt))
        x = x + self.pos_embed[...].astype(dt)

        heads, hd, eps = cfg.num_attention_heads, cfg.head_dim, cfg.layer_norm_eps
        act = _ops.activation(cfg.hidden_act)

        def layer(x: jax.Array, lp: dict[str, jax.Array]) -> tuple[jax.Array, None]:
            lp = {k: v.astype(dt) for k, v in lp.items()}
            n = x.shape[1]
            y = _ops.layer_norm(x, lp["ln1_scale"], lp["ln1_bias"], eps)
            q = _ops.dense(y, lp["q_kernel"], lp["q_bias"]).reshape(b, n, heads, hd)
            k = _ops.dense(y, lp["k_kernel"], lp["k_bias"]).reshape(b, n, heads, hd)
            v = _ops.dense(y, lp["v_kernel"], lp["v_bias"]).reshape(b, n, heads, hd)
            o = _ops.self_attention(q, k, v).reshape(b, n, heads * hd)
            x = x + _ops.dense(o, lp["o_kernel"], lp["o_bias"])
            y = _ops.layer_norm(x, lp["ln2_scale"], lp["ln2_bias"], eps)
            y = act(_ops.dense(y, lp["fc1_kernel"], lp["fc1_bias"]))
            x = x + _ops.dense(y, lp["fc2_kernel"], lp["fc2_bias"])
            return x, None

        x = _ops.run_layers(layer, x, self.layers)
        return _ops.layer_norm(x, self.post_ln_scale[...], self.post_ln_bias[...], eps)


# Checkpoint keys that are known and deliberately not imported: the pooling head (unused by RDT)
# and, in a full SigLIP checkpoint, the text tower and the contrastive logit scale/bias.
_IGNORED = (r"(vision_model\.)?head\..*", r"text_model\..*", r"logit_scale", r"logit_bias")


def siglip_sources(
    cfg: SiglipVisionConfig, prefix: str = "", layer_layout: _ops.LayerLayout = "per_layer"
) -> list[ParamSource]:
    """The HF key (and layout transform) of every parameter of :class:`SiglipVisionTower`."""
    _ops.check_layout(layer_layout)
    d, f, p, c = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.num_channels
    layer = lambda name: [f"{prefix}encoder.layers.{i}.{name}" for i in range(cfg.num_hidden_layers)]
    one = lambda path, key, shape, tf=(lambda a: a): ParamSource(path, ((prefix + key,),), shape, tf)
    src = [
        # torch Conv2d weight (out, in, kh, kw) -> HWIO.
        one(
            ("patch_kernel",),
            "embeddings.patch_embedding.weight",
            (d, c, p, p),
            lambda a: a.transpose(2, 3, 1, 0),
        ),
        one(("patch_bias",), "embeddings.patch_embedding.bias", (d,)),
        one(("pos_embed",), "embeddings.position_embedding.weight", (cfg.num_patches, d)),
        one(("post_ln_scale",), "post_layernorm.weight", (d,)),
        one(("post_ln_bias",), "post_layernorm.bias", (d,)),
    ]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
        src.append(linear_source(("layers", f"{ours}_kernel"), layer(f"self_attn.{theirs}.weight"), d, d))
        src.append(vector_source(("layers", f"{ours}_bias"), layer(f"self_attn.{theirs}.bias"), d))
    src += [
        vector_source(("layers", "ln1_scale"), layer("layer_norm1.weight"), d),
        vector_source(("layers", "ln1_bias"), layer("layer_norm1.bias"), d),
        vector_source(("layers", "ln2_scale"), layer("layer_norm2.weight"), d),
        vector_source(("layers", "ln2_bias"), layer("layer_norm2.bias"), d),
        linear_source(("layers", "fc1_kernel"), layer("mlp.fc1.weight"), d, f),
        vector_source(("layers", "fc1_bias"), layer("mlp.fc1.bias"), f),
        linear_source(("layers", "fc2_kernel"), layer("mlp.fc2.weight"), f, d),
        vector_source(("layers", "fc2_bias"), layer("mlp.fc2.bias"), d),
    ]
    return per_layer_sources(src) if layer_layout == "per_layer" else src


def load_siglip(
    hf_dir: str | pathlib.Path,
    dtype: jnp.dtype = jnp.float32,
    *,
    param_dtype: jnp.dtype | None = None,
    layer_layout: _ops.LayerLayout = "per_layer",
    mesh: jax.sharding.Mesh | None = None,
    rules: dict[str, Any] | None = None,
) -> SiglipVisionTower:
    """Build the vision tower from a Hugging Face directory (full SigLIP or SiglipVisionModel).

    Weights are converted to ``param_dtype`` (default: ``dtype``) on the host, tensor by tensor.
    ``layer_layout``: see :class:`SiglipVisionTower` (``per_layer``, the default, is the fast one on CPU).
    With ``mesh``, each parameter is laid out by its logical axis names and ``rules``.
    """
    hf_dir = pathlib.Path(hf_dir)
    cfg = SiglipVisionConfig.from_hf(read_config(hf_dir), source=str(hf_dir / "config.json"))
    model = nnx.eval_shape(
        lambda: SiglipVisionTower(cfg, dtype=dtype, param_dtype=param_dtype, layer_layout=layer_layout,
                                  rngs=nnx.Rngs(0))
    )
    graphdef, abstract = nnx.split(model)
    rules = SIGLIP_SHARDING_RULES if rules is None else rules
    with CheckpointReader(hf_dir) as reader:
        # Full SigLIP checkpoints (and transformers 4.x SiglipVisionModel) prefix "vision_model.".
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in reader.entries) else ""
        state = import_params(
            reader,
            abstract,
            siglip_sources(cfg, prefix, layer_layout),
            ignore=_IGNORED,
            sharding_for=make_sharding_fn(mesh, rules),
        )
    return nnx.merge(graphdef, state)
