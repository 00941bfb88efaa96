"""The RDT denoiser (``models/rdt/model.py``): embedders, position tables, alternating blocks, final layer.

Blocks alternate: even-indexed blocks cross-attend to language (with its key mask), odd-indexed to
image tokens. They are stored as two stacked modules (``lang_blocks`` holding blocks 0, 2, 4, ... and
``img_blocks`` holding 1, 3, 5, ...) and run as a ``lax.scan`` over (language, image) pairs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rdt_jax.model.attention import ATTENTION_OUT_NAME
from rdt_jax.model.block_scan import scan_layers
from rdt_jax.model.blocks import COND_KV_NAME, FinalLayer, RDTBlock, layer_slice, per_layer, stacked
from rdt_jax.model.config import RDTConfig
from rdt_jax.model.layers import LINEAR_OUT_NAME, TimestepEmbedder
from rdt_jax.model.pos_embed import initial_pos_tables


class CondKV(NamedTuple):
    """Per-block cross-attention keys/values of the conditions.

    Head-major, the layout :func:`~rdt_jax.model.attention.head_major_attention` takes: ``lang_k``
    and ``lang_v`` (n_lang_blocks, B, H, L, hd); ``img_k``/``img_v`` the same over the n_img_blocks
    image blocks and I image tokens. Stacked over blocks for the
    ``stacked`` layer layout; tuples of per-block arrays for ``per_layer`` (``kv.img_k[i]`` is block
    ``i``'s either way).
    """

    lang_k: jax.Array
    lang_v: jax.Array
    img_k: jax.Array
    img_v: jax.Array


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Everything recomputed but the conditions' K/V products: with 4374 image tokens they are most of
    # a block's forward FLOPs (rdt-1b batch 1: 1.03 of ~1.2 TFLOP) for 0.5 GB saved in bf16.
    "save_cond_kv": jax.checkpoint_policies.save_only_these_names(COND_KV_NAME),
    # Also each block's linear outputs, all over the action-sequence tokens (the conditions' K/V come
    # from dense_split, not a Linear): the recomputation "save_cond_kv" leaves (rdt-1b: 1.2 s of a 15 s
    # step on a 2-core CPU) is mostly these small products and what they feed. Saved rounded to the
    # compute dtype: rdt-1b at batch 1, ~55 MB in bf16. And the attention kernel's output and
    # log-sum-exp (float32, ~15 MB for rdt-1b): otherwise the backward runs every cross-attention's
    # head loop over the 4374 image keys again (rdt-1b: ~0.4 s a step on a 2-core CPU). The fastest
    # policy for rdt-1b on a CPU.
    "save_cond_kv_and_tokens": jax.checkpoint_policies.save_only_these_names(
        COND_KV_NAME, LINEAR_OUT_NAME, ATTENTION_OUT_NAME),
}


class RDT(nnx.Module):
    def __init__(self, cfg: RDTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        kw = dict(rngs=rngs, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, **kw)
        self.freq_embedder = TimestepEmbedder(cfg.hidden_size, **kw)
        tables = initial_pos_tables(cfg)
        for name, table in tables.items():
            setattr(self, name, nnx.Param(jnp.asarray(table[None], dtype=cfg.jnp_param_dtype)))
        key = rngs.params()
        k_lang, k_img = jax.random.split(key)
        # Per-layer blocks get the same keys, hence the same values, as the stacked ones.
        layers = per_layer if cfg.layer_layout == "per_layer" else stacked
        self.lang_blocks = layers(lambda r: RDTBlock(cfg, rngs=r), cfg.num_lang_blocks, k_lang)
        if cfg.num_img_blocks:
            self.img_blocks = layers(lambda r: RDTBlock(cfg, rngs=r), cfg.num_img_blocks, k_img)
        else:
            self.img_blocks = None
        self.final_layer = FinalLayer(cfg, rngs=rngs)

    @property
    def per_layer(self) -> bool:
        return self.config.layer_layout == "per_layer"

    # ------------------------------------------------------------------ conditions
    def add_cond_pos(self, lang_c: jax.Array | None, img_c: jax.Array | None) -> tuple[Any, Any]:
        cfg = self.config
        if lang_c is not None:
            if lang_c.ndim != 3 or lang_c.shape[-1] != cfg.hidden_size:
                raise ValueError(f"lang_c must be (B, L, {cfg.hidden_size}), got {lang_c.shape}")
            if lang_c.shape[1] > cfg.max_lang_cond_len:
                raise ValueError(
                    f"lang_c has {lang_c.shape[1]} tokens, more than max_lang_cond_len={cfg.max_lang_cond_len}"
                )
            lang_c = lang_c + self.lang_cond_pos_embed[:, : lang_c.shape[1]].astype(lang_c.dtype)
        if img_c is not None:
            if img_c.shape[1:] != (cfg.img_cond_len, cfg.hidden_size):
                raise ValueError(
                    f"img_c must be (B, {cfg.img_cond_len}, {cfg.hidden_size}), got {img_c.shape}"
                )
            img_c = img_c + self.img_cond_pos_embed[...].astype(img_c.dtype)
        return lang_c, img_c

    def precompute_cond_kv(self, lang_c: jax.Array, img_c: jax.Array) -> CondKV:
        """Every block's condition K (after k-norm) and V; constant across denoising steps."""
        lc, ic = self.add_cond_pos(lang_c.astype(self.config.jnp_dtype), img_c.astype(self.config.jnp_dtype))

        def kv_of(blocks: nnx.Module, cond: jax.Array) -> tuple[Any, Any]:
            if self.per_layer:
                ks, vs = zip(*(block.cross_attn.cond_kv(cond) for block in blocks), strict=True)
                return tuple(ks), tuple(vs)
            graphdef, state = nnx.split(blocks)

            def body(_, layer_state):
                return None, nnx.merge(graphdef, layer_state).cross_attn.cond_kv(cond)

            return jax.lax.scan(body, None, state)[1]

        lang_k, lang_v = kv_of(self.lang_blocks, lc)
        if self.img_blocks is not None:
            img_k, img_v = kv_of(self.img_blocks, ic)
        else:
            img_k = img_v = jnp.zeros((0,), self.config.jnp_dtype)
        return CondKV(lang_k, lang_v, img_k, img_v)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        x: jax.Array,
        freq: jax.Array,
        t: jax.Array,
        lang_c: jax.Array | None = None,
        img_c: jax.Array | None = None,
        lang_mask: jax.Array | None = None,
        img_mask: jax.Array | None = None,
        *,
        cond_kv: CondKV | None = None,
        capture: bool = False,
        grad_sq: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """``x`` (B, horizon+1, D) -> (B, horizon, action_dim); ``capture`` also returns intermediates.

        ``lang_mask`` (B, L) and ``img_mask`` (B, I): True = the block may attend to that condition token (the
        official ``RDT.forward``'s masks; the official runner never passes ``img_mask``).

        ``grad_sq``: a float32 scalar whose cotangent is the sum of squares of the scanned blocks'
        parameter gradients (:func:`~rdt_jax.model.block_scan.scan_layers`); the rest of the gradient
        is :func:`grad_outside_scan`."""
        cfg = self.config
        dtype = cfg.jnp_dtype
        if x.ndim != 3 or x.shape[1:] != (cfg.pred_horizon + 1, cfg.hidden_size):
            raise ValueError(f"x must be (B, {cfg.pred_horizon + 1}, {cfg.hidden_size}), got {x.shape}")
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(t), (-1,)), (batch,))
        freq = jnp.broadcast_to(jnp.reshape(jnp.asarray(freq), (-1,)), (batch,))
        t_emb = self.t_embedder(t)
        freq_emb = self.freq_embedder(freq)
        h = jnp.concatenate([t_emb[:, None], freq_emb[:, None], x.astype(dtype)], axis=1)
        h = h + self.x_pos_embed[...].astype(dtype)
        tokens_in = h

        if cond_kv is None:
            if lang_c is None or img_c is None:
                raise ValueError("lang_c and img_c are required unless cond_kv is given")
            lc, ic = self.add_cond_pos(lang_c.astype(dtype), img_c.astype(dtype))
        else:
            lc = ic = None
        if lang_mask is not None:
            lang_mask = jnp.asarray(lang_mask, bool)
            expected = (batch, lc.shape[1] if lc is not None else cond_kv.lang_k[0].shape[-2])
            if lang_mask.shape != expected:
                raise ValueError(f"lang_mask must have shape {expected}, got {lang_mask.shape}")
        if img_mask is not None:
            img_mask = jnp.asarray(img_mask, bool)
            expected = (batch, ic.shape[1] if ic is not None else cond_kv.img_k[0].shape[-2])
            if img_mask.shape != expected:
                raise ValueError(f"img_mask must have shape {expected}, got {img_mask.shape}")

        h, block_outs = self._run_blocks(h, lc, ic, lang_mask, img_mask, cond_kv, capture, grad_sq)
        final = self.final_layer(h)
        out = final[:, -cfg.pred_horizon :]
        if not capture:
            return out
        return out, {
            "t_emb": t_emb, "freq_emb": freq_emb, "tokens_in": tokens_in,
            "block_out": block_outs, "final_out": final,
        }

    def _run_blocks(self, h, lc, ic, lang_mask, img_mask, cond_kv: CondKV | None, capture: bool, grad_sq=None):
        if self.per_layer:
            return self._run_blocks_per_layer(h, lc, ic, lang_mask, img_mask, cond_kv, capture)
        cfg = self.config
        n_pairs = cfg.num_img_blocks
        lang_gd, lang_state = nnx.split(layer_slice(self.lang_blocks, 0, n_pairs) if n_pairs else self.lang_blocks)

        def pair(h, xs, conds):
            lang_state, img_state, kvs = xs
            lc, ic, lang_mask, img_mask = conds
            lang_kv = None if kvs is None else (kvs[0], kvs[1])
            img_kv = None if kvs is None else (kvs[2], kvs[3])
            h1 = nnx.merge(lang_gd, lang_state)(h, lc, lang_mask, lang_kv)
            h2 = nnx.merge(img_gd, img_state)(h1, ic, img_mask, img_kv)
            return h2, (jnp.stack([h1, h2]) if capture else None)

        # The conditions are loop-invariant arguments: their residuals are not stacked per layer.
        conds = (lc, ic, lang_mask, img_mask)
        policy = _REMAT_POLICIES[cfg.remat] if cfg.remat != "none" else None

        outs = []
        if n_pairs:
            img_gd, img_state = nnx.split(self.img_blocks)
            kvs = None
            if cond_kv is not None:
                kvs = (cond_kv.lang_k[:n_pairs], cond_kv.lang_v[:n_pairs], cond_kv.img_k, cond_kv.img_v)
            h, pair_outs = scan_layers(pair, h, (lang_state, img_state, kvs), conds, policy=policy, grad_sq=grad_sq)
            if capture:
                outs.append(pair_outs.reshape(2 * n_pairs, *pair_outs.shape[2:]))
        if cfg.depth % 2:
            # Odd depth: one trailing language block outside the pairs.
            last = layer_slice(self.lang_blocks, n_pairs, n_pairs + 1)
            gd, st = nnx.split(last)
            kv = None if cond_kv is None else (cond_kv.lang_k[n_pairs], cond_kv.lang_v[n_pairs])
            h = nnx.merge(gd, jax.tree.map(lambda a: a[0], st))(h, lc, lang_mask, kv)
            outs.append(h[None])
        return h, (jnp.concatenate(outs, axis=0) if capture else None)

    def _run_blocks_per_layer(self, h, lc, ic, lang_mask, img_mask, cond_kv: CondKV | None, capture: bool):
        def run(graphdef, block_state, h, cond, mask, kv):
            return nnx.merge(graphdef, block_state)(h, cond, mask, kv)

        if self.config.remat != "none":
            run = jax.checkpoint(run, policy=_REMAT_POLICIES[self.config.remat], static_argnums=(0,))
        outs = []
        for i in range(self.config.depth):
            j, lang = i // 2, i % 2 == 0  # even blocks attend to language, odd ones to images
            graphdef, state = nnx.split((self.lang_blocks if lang else self.img_blocks)[j])
            kv = None
            if cond_kv is not None:
                kv = (cond_kv.lang_k[j], cond_kv.lang_v[j]) if lang else (cond_kv.img_k[j], cond_kv.img_v[j])
            h = run(graphdef, state, h, lc if lang else ic, lang_mask if lang else img_mask, kv)
            outs.append(h)
        return h, (jnp.stack(outs) if capture else None)


def grad_outside_scan(cfg: RDTConfig, grads: dict) -> list[jax.Array]:
    """The parts of the denoiser's gradient (``grads``: its parameter dict) that ``__call__``'s
    ``grad_sq`` does not cover: everything but the scanned block pairs (all of it per layer, or
    with no pair to scan), and an odd depth's trailing language block."""
    n_pairs = cfg.num_img_blocks
    if cfg.layer_layout == "per_layer" or not n_pairs:
        return jax.tree.leaves(grads)
    parts = []
    for name, sub in grads.items():
        if name in ("lang_blocks", "img_blocks"):
            parts += [g[n_pairs:] for g in jax.tree.leaves(sub) if g.shape[0] > n_pairs]
        else:
            parts += jax.tree.leaves(sub)
    return parts
