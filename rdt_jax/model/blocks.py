"""RDT transformer blocks: self-attention, cross-attention, FFN, final layer (MODEL.md §5-6)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rdt_jax.model.attention import (
    as_bits,
    dot_product_attention,
    from_bits,
    head_major_attention,
    sequence_major_attention,
    to_head_major,
)
from rdt_jax.model.config import RDTConfig
from rdt_jax.model.layers import Mlp, dense_split, linear, zeros
from rdt_jax.model.norm import RmsNorm


def _norm(cfg: RDTConfig, dim: int) -> RmsNorm:
    return RmsNorm(dim, eps=cfg.norm_eps, form=cfg.norm_form, param_dtype=cfg.jnp_param_dtype)


class SelfAttention(nnx.Module):
    """timm ``Attention`` with a fused qkv projection (q | k | v along the output axis) and q/k norm."""

    def __init__(self, cfg: RDTConfig, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, dict(rngs=rngs, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        self.qkv = linear(d, 3 * d, **kw)
        self.q_norm = _norm(cfg, cfg.head_dim)
        self.k_norm = _norm(cfg, cfg.head_dim)
        self.proj = linear(d, d, **kw)
        self.num_heads = cfg.num_heads
        self.impl = cfg.attention_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        o = dot_product_attention(self.q_norm(q), self.k_norm(k), v, impl=self.impl)
        return self.proj(o.reshape(b, n, d))


# The name the conditions' K/V products carry for remat policies (``RDTConfig.remat="save_cond_kv"``).
COND_KV_NAME = "cond_kv"


@jax.custom_vjp
def _name_cond_kv(x: jax.Array) -> jax.Array:
    """The identity, with ``x`` named :data:`COND_KV_NAME` (what the remat policy saves) as its bit
    pattern when 16-bit.

    The stacked blocks' scan stacks saved values across iterations, and XLA:CPU widens a 16-bit
    float dynamic-update-slice to float32: the saved bf16 K/V of rdt-1b's 14 image blocks took
    1 GB instead of 0.5. As uint16 they are stacked in place. The custom VJP passes the cotangent
    through the (non-differentiable) bit casts unchanged.
    """
    return _name_cond_kv_fwd(x)[0]


def _name_cond_kv_fwd(x):
    return from_bits(checkpoint_name(as_bits(x), COND_KV_NAME), x.dtype), None


_name_cond_kv.defvjp(_name_cond_kv_fwd, lambda _, g: (g,))


class CrossAttention(nnx.Module):
    """The official ``CrossAttention``: q from the tokens, fused kv (k | v) from the condition, q/k norm.

    ``cond_kv`` is split out so that sampling can compute each block's condition K/V once per call
    and reuse them at every denoising step (they do not depend on the step). It returns them
    head-major (``kh``, ``vh`` (B, H, S, hd)), the layout the attention consumes.
    """

    def __init__(self, cfg: RDTConfig, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, dict(rngs=rngs, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        self.q = linear(d, d, **kw)
        self.kv = linear(d, 2 * d, **kw)
        self.q_norm = _norm(cfg, cfg.head_dim)
        self.k_norm = _norm(cfg, cfg.head_dim)
        self.proj = linear(d, d, **kw)
        self.num_heads = cfg.num_heads
        self.impl = cfg.attention_impl

    def _cond_k_v(self, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised keys and values of the condition, (B, S, H, hd) each."""
        b, length, d = cond.shape
        cond, kernel, bias = self.kv.promote_dtype((cond, self.kv.kernel[...], self.kv.bias[...]), dtype=self.kv.dtype)
        # K and V as two products over the halves of the fused weight (the same numbers): each float32
        # product is half the size, and XLA:CPU keeps every image block's rounded K|V alive until the
        # denoising loop starts, so this halves the sampling program's peak temporaries.
        k, v = dense_split(cond, kernel, bias, d)
        # Named for the "save_cond_kv" remat policy; the key norm after them is cheap to recompute.
        heads = (b, length, self.num_heads, d // self.num_heads)
        k, v = (_name_cond_kv(x.reshape(heads)) for x in (k, v))
        return self.k_norm(k), v

    def cond_kv(self, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        return to_head_major(*self._cond_k_v(cond))

    def __call__(
        self,
        x: jax.Array,
        cond: jax.Array | None = None,
        mask: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        b, n, d = x.shape
        q = self.q_norm(self.q(x).reshape(b, n, self.num_heads, d // self.num_heads))
        if kv is None:
            # K/V used once (training, uncached sampling): no head-major copy, the attention
            # transposes them a head group at a time.
            o = sequence_major_attention(q, *self._cond_k_v(cond), key_mask=mask, impl=self.impl)
        else:
            o = head_major_attention(q, *kv, key_mask=mask, impl=self.impl)
        return self.proj(o.reshape(b, n, d))


class RDTBlock(nnx.Module):
    """Pre-norm block: x += SelfAttn(norm1 x); x += CrossAttn(norm2 x, cond); x += FFN(norm3 x)."""

    def __init__(self, cfg: RDTConfig, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, dict(rngs=rngs, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        self.norm1 = _norm(cfg, d)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.norm2 = _norm(cfg, d)
        self.cross_attn = CrossAttention(cfg, rngs=rngs)
        self.norm3 = _norm(cfg, d)
        self.ffn = Mlp(d, d, d, **kw)

    def __call__(
        self,
        x: jax.Array,
        cond: jax.Array | None = None,
        mask: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), cond, mask, kv)
        return x + self.ffn(self.norm3(x))


class FinalLayer(nnx.Module):
    def __init__(self, cfg: RDTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm_final = _norm(cfg, d)
        # Zero-initialised output so a fresh model predicts 0 (official init).
        self.ffn_final = Mlp(d, d, cfg.action_dim, rngs=rngs, dtype=cfg.jnp_dtype,
                             param_dtype=cfg.jnp_param_dtype, fc2_init=zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.ffn_final(self.norm_final(x))


def stacked(make, n: int, key: jax.Array) -> nnx.Module:
    """``n`` independently initialised copies of a module, merged into one with a leading layer axis.

    The stacked module is applied with ``jax.lax.scan`` (see ``scan_layers``) so compile time does not
    grow with depth.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = jax.lax.map(lambda k: nnx.state(make(nnx.Rngs(k))), jax.random.split(key, n))
    return nnx.merge(graphdef, state)


def per_layer(make, n: int, key: jax.Array) -> nnx.List:
    """The same ``n`` layers as :func:`stacked` (same keys, same values), each its own module."""
    return nnx.List([make(nnx.Rngs(k)) for k in jax.random.split(key, n)])


def layer_slice(module: nnx.Module, start: int, stop: int) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))
