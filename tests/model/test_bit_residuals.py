"""with_bit_residuals: same values and gradients, 16-bit residuals stacked by a scan as uint16."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from rdt_jax.model.bit_residuals import with_bit_residuals

LAYERS, BATCH, TOKENS, WIDTH, COND = 4, 2, 48, 32, 40


def _layer(h, w, cond):
    """A bf16 layer with bf16 and float32 residuals: a product, a nonlinearity, a float32 norm and a
    product with a loop-invariant condition (its residual is the condition itself)."""
    kernel, scale = w
    y = jnp.tanh(h @ kernel.astype(h.dtype))
    y32 = y.astype(jnp.float32)
    y = (y32 * jax.lax.rsqrt(jnp.mean(y32**2, -1, keepdims=True) + 1e-6)).astype(h.dtype)
    scores = jnp.einsum("btd,bsd->bts", y, cond, preferred_element_type=jnp.float32)
    mixed = jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1).astype(h.dtype), cond)
    return (h + y * scale.astype(h.dtype) + mixed).astype(h.dtype)


def _loss(layer):
    def loss(ws, h, cond):
        h, _ = jax.lax.scan(lambda h, w: (layer(h, w, cond), None), h, ws)
        return jnp.sum(h.astype(jnp.float32) ** 2)

    return loss


def _inputs():
    k = jax.random.split(jax.random.key(0), 3)
    ws = (jax.random.normal(k[0], (LAYERS, WIDTH, WIDTH)) / np.sqrt(WIDTH), jnp.full((LAYERS, WIDTH), 0.5))
    h = jax.random.normal(k[1], (BATCH, TOKENS, WIDTH)).astype(jnp.bfloat16)
    cond = jax.random.normal(k[2], (BATCH, COND, WIDTH)).astype(jnp.bfloat16)
    return ws, h, cond


def test_values_and_gradients_are_unchanged():
    args = _inputs()
    grad = lambda layer: jax.jit(jax.value_and_grad(_loss(layer), argnums=(0, 1, 2)))(*args)
    (want_loss, want), (got_loss, got) = grad(_layer), grad(with_bit_residuals(_layer))
    assert float(got_loss) == float(want_loss)
    for name, a, b in zip(("dkernel", "dscale", "dh", "dcond"), jax.tree.leaves(got), jax.tree.leaves(want),
                          strict=True):
        assert a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if name != "dcond":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            # The condition's gradient is summed over the layers in bf16 either way; unwrapped, the scan
            # adds each of a layer's two contributions to the running sum, wrapped it adds their sum.
            err = np.abs(a - b).max() / np.abs(b).max()
            assert err < 2**-6, err


def test_stacked_16bit_residuals_stay_16bit_and_invariant_ones_are_not_stacked():
    """XLA:CPU widens a bf16 dynamic-update-slice to float32, so a scan stacking bf16 residuals
    converted whole (L, B, T, D) buffers between bf16 and float32. Wrapped, they are stacked as
    uint16 (no stacked bf16 buffer, no conversion of one); the loop-invariant condition is not
    stacked at all. (The layer's float32 residuals are stacked as float32, as they should be.)"""
    args = _inputs()
    stacked = f"[{LAYERS},{BATCH},{TOKENS},{WIDTH}]"
    hlo = jax.jit(jax.grad(_loss(with_bit_residuals(_layer)))).lower(*args).compile().as_text()
    shapes = set(re.findall(r"\b(?:f32|bf16|u16)\[[\d,]+\]", hlo))
    assert f"u16{stacked}" in shapes and f"bf16{stacked}" not in shapes, sorted(shapes)
    conversions = [line for line in hlo.splitlines() if " convert(" in line and stacked in line]
    assert not conversions, conversions
    assert not any(s.endswith(f"[{LAYERS},{BATCH},{COND},{WIDTH}]") for s in shapes), sorted(shapes)
