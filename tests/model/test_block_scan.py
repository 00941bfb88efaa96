"""scan_layers: plain autodiff's values and gradients, 16-bit residuals and weight gradients kept as
uint16, weights and loop-invariant arguments never stacked, and the gradient's sum of squares."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdt_jax.model.block_scan import compute_dtype_casts, scan_layers

LAYERS, BATCH, TOKENS, WIDTH, COND = 4, 2, 48, 32, 40


def _layer(h, w, cond):
    """A bf16 layer over float32 weights: a product with a cast kernel, a nonlinearity, a float32 norm
    with a float32 weight used as it is, a scale cast to bf16, and a product with a loop-invariant
    condition (its residual is the condition itself)."""
    kernel, gain, scale = w
    y = jnp.tanh(h @ kernel.astype(h.dtype))
    y32 = y.astype(jnp.float32)
    y = (y32 * jax.lax.rsqrt(jnp.mean(y32**2, -1, keepdims=True) + 1e-6) * gain).astype(h.dtype)
    scores = jnp.einsum("btd,bsd->bts", y, cond, preferred_element_type=jnp.float32)
    mixed = jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1).astype(h.dtype), cond)
    return (h + y * scale.astype(h.dtype) + mixed).astype(h.dtype), None


def _plain(h, ws, cond, policy=None):
    layer = _layer if policy is None else jax.checkpoint(_layer, policy=policy)
    return jax.lax.scan(lambda h, w: layer(h, w, cond), h, ws)[0]


def _scanned(h, ws, cond, policy=None):
    return scan_layers(_layer, h, ws, cond, policy=policy)[0]


def _loss(run, policy=None):
    return lambda ws, h, cond: jnp.sum(run(h, ws, cond, policy).astype(jnp.float32) ** 2)


def _inputs(layers=LAYERS, width=WIDTH):
    k = jax.random.split(jax.random.key(0), 4)
    ws = (jax.random.normal(k[0], (layers, width, width)) / np.sqrt(width),
          1 + 0.1 * jax.random.normal(k[3], (layers, width)), jnp.full((layers, width), 0.5))
    h = jax.random.normal(k[1], (BATCH, TOKENS, width)).astype(jnp.bfloat16)
    cond = jax.random.normal(k[2], (BATCH, COND, width)).astype(jnp.bfloat16)
    return ws, h, cond


def test_casts_found_are_the_only_use_of_a_leaf():
    ws, h, cond = _inputs()
    x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), ws)
    # the kernel and the scale are cast once; the norm gain is used in float32
    assert compute_dtype_casts(_layer, h, x0, cond) == [jnp.bfloat16, None, jnp.bfloat16]

    def twice(h, w, cond):  # a leaf cast twice keeps a float32 gradient (its two parts are summed in it)
        kernel, gain, scale = w
        out, _ = _layer(h, (kernel, gain, scale), cond)
        return out + (h @ kernel.astype(h.dtype)), None

    assert compute_dtype_casts(twice, h, x0, cond) == [None, None, jnp.bfloat16]


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable,
                                    jax.checkpoint_policies.dots_with_no_batch_dims_saveable])
def test_values_and_gradients_are_plain_autodiffs(policy):
    args = _inputs()
    grad = lambda run: jax.jit(jax.value_and_grad(_loss(run, policy), argnums=(0, 1, 2)))(*args)
    (want_loss, want), (got_loss, got) = grad(_plain), grad(_scanned)
    assert float(got_loss) == float(want_loss)
    names = ("dkernel", "dgain", "dscale", "dh", "dcond")
    for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if name != "dcond":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            # The condition's gradient is summed over the layers in bf16 either way; plain autodiff adds
            # each of a layer's two contributions to the running sum, scan_layers adds their sum.
            err = np.abs(a - b).max() / np.abs(b).max()
            assert err < 2**-6, err


def test_stacked_16bit_values_stay_16bit_and_invariant_ones_are_not_stacked():
    """XLA:CPU widens a bf16 dynamic-update-slice to float32, so a scan stacking bf16 residuals
    converted whole (L, B, T, D) buffers between bf16 and float32. Here they are stacked as uint16,
    the loop-invariant condition is not stacked at all, and the kernel's gradient is stacked as
    uint16 too."""
    args = _inputs()
    stacked = f"[{LAYERS},{BATCH},{TOKENS},{WIDTH}]"
    hlo = jax.jit(jax.grad(_loss(_scanned))).lower(*args).compile().as_text()
    shapes = set(re.findall(r"\b(?:f32|bf16|u16)\[[\d,]+\]", hlo))
    assert f"u16{stacked}" in shapes and f"bf16{stacked}" not in shapes, sorted(shapes)
    conversions = [line for line in hlo.splitlines() if " convert(" in line and stacked in line]
    assert not conversions, conversions
    assert not any(s.endswith(f"[{LAYERS},{BATCH},{COND},{WIDTH}]") for s in shapes), sorted(shapes)
    assert f"u16[{LAYERS},{WIDTH},{WIDTH}]" in shapes, sorted(shapes)


def test_weights_are_neither_stacked_as_residuals_nor_their_gradient_in_float32():
    """Large weights, small activations: plain autodiff (no remat) keeps every layer's bf16 kernel as
    a residual and stacks the float32 gradient; scan_layers recasts the kernel in the backward and
    stacks the bf16 gradient, so its temporaries are smaller by at least the bf16 kernels' size twice
    over (residual, and half of the float32 gradient)."""
    layers, width = 6, 512
    args = _inputs(layers, width)
    temp = lambda run: jax.jit(jax.grad(_loss(run))).lower(*args).compile().memory_analysis().temp_size_in_bytes
    kernels_bf16 = layers * width * width * 2
    assert temp(_scanned) <= temp(_plain) - 2 * kernels_bf16, (temp(_scanned), temp(_plain), kernels_bf16)


def test_grad_sq_is_the_gradients_sum_of_squares():
    ws, h, cond = _inputs()

    def loss(ws, h, cond, sq):
        return jnp.sum(scan_layers(_layer, h, ws, cond, grad_sq=sq)[0].astype(jnp.float32) ** 2)

    d_ws, sq = jax.jit(jax.grad(loss, argnums=(0, 3)))(ws, h, cond, jnp.zeros(()))
    want = sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in jax.tree.leaves(d_ws))
    np.testing.assert_allclose(float(sq), want, rtol=1e-6)
    assert want > 0
    # the result does not depend on it
    out = lambda sq: scan_layers(_layer, h, ws, cond, grad_sq=sq)[0]
    same = [np.asarray(out(jnp.float32(v)), np.float32) for v in (0, 5)]
    np.testing.assert_array_equal(*same)


def test_grad_sq_must_be_a_float32_scalar():
    ws, h, cond = _inputs()
    for bad in (jnp.zeros((2,)), jnp.zeros((), jnp.bfloat16)):
        with pytest.raises(ValueError, match="grad_sq must be a float32 scalar"):
            scan_layers(_layer, h, ws, cond, grad_sq=bad)
