"""One attention entry point with a kernel switch (MaxText ``apply_attention`` style).

Layout is ``(batch, length, heads, head_dim)`` for q, k and v. ``key_mask`` is a ``(batch, kv_len)``
boolean, True = may attend (the official CrossAttention's convention).

* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, any backend (default).
* ``cudnn``: the cuDNN fused kernel (GPU only). cuDNN takes key padding as sequence lengths, so the
  mask must be right-padded (valid tokens first), which is what RDT's language masks always are.
* ``pallas``: reserved for the project's own Pallas kernel (a later issue).
* ``reference``: plain einsum + softmax in float32, the ground truth for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "pallas", "reference")


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32)).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    impl: str = "xla",
) -> jax.Array:
    """Scaled (``head_dim ** -0.5``) dot-product attention, no causal mask."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, L, H, hd); got {q.shape}, {k.shape}, {v.shape}")
    if key_mask is not None and key_mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_mask must have shape {(k.shape[0], k.shape[1])}, got {key_mask.shape}")
    if impl == "reference":
        return reference_attention(q, k, v, key_mask)
    if impl == "xla":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if impl == "cudnn":
        lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    if impl == "pallas":
        raise NotImplementedError("the Pallas attention kernel is not part of this release; use impl='xla'")
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
