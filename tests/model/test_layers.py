"""Building blocks: the timm-1.0.3 norm, the timestep embedder, adaptors, attention dispatch."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rdt_jax
from rdt_jax.model import attention
from rdt_jax.model.attention import (
    dot_product_attention,
    head_major_attention,
    sequence_major_attention,
    to_head_major,
)
from rdt_jax.model.layers import Adaptor, dense, dense_split
from rdt_jax.model.norm import rms_scale
from tests.helpers import assert_close


def test_norm_is_timm_variance_form(cases):
    y = rms_scale(jnp.asarray(cases["rmsnorm.x"]), jnp.asarray(cases["rmsnorm.weight"]), eps=1e-6, form="timm_var")
    assert_close(y, cases["rmsnorm.y"], 1e-5, "rmsnorm")


def test_true_rms_form_differs_and_matches_its_formula(cases):
    x, w = cases["rmsnorm.x"].astype(np.float64), cases["rmsnorm.weight"].astype(np.float64)
    y = rms_scale(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), eps=1e-6, form="rms")
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * w
    assert_close(y, expected, 1e-5, "rms")
    assert np.max(np.abs(np.asarray(y) - cases["rmsnorm.y"])) > 1e-3  # the two forms really differ


def test_timestep_embedder(converted_small, cases):
    runner = rdt_jax.load_pretrained(converted_small)
    model = runner.policy.model
    t = cases["temb.t"]
    sinusoid = np.asarray(model.t_embedder.sinusoid(jnp.asarray(t)))
    # cos/sin of t*f: a 1-ulp difference in a float32 frequency f (torch's vectorised exp is not
    # correctly rounded for 2 of the 128) moves the argument by up to t * 2**-23. Rows are checked
    # against that float32 conditioning bound, and the embedder outputs below at 1e-5.
    bound = np.maximum(t, 1).astype(np.float64)[:, None] * 2.0**-23 + 1e-7
    assert np.all(np.abs(sinusoid - cases["temb.sinusoid"]) <= bound)
    half = 128
    f = np.exp(-np.log(10000.0) * np.arange(half) / half)
    expected = np.concatenate([np.cos(np.outer(t, f)), np.sin(np.outer(t, f))], 1)
    assert np.abs(sinusoid - expected).max() <= 999 * 2.0**-22  # [cos, sin] order and frequencies right
    assert_close(model.t_embedder(jnp.asarray(t)), cases["temb.t_embedder_out"], 1e-5, "t_embedder")
    assert_close(model.freq_embedder(jnp.asarray(t)), cases["temb.freq_embedder_out"], 1e-5, "freq_embedder")


@pytest.mark.parametrize("spec,n_linear", [("linear", 1), ("mlp2x_gelu", 2), ("mlp4x_gelu", 4)])
def test_adaptor_specs(spec, n_linear):
    a = Adaptor(spec, 5, 6, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    assert len(a.layers) == n_linear
    x = jax.random.normal(jax.random.key(1), (2, 3, 5))
    h = x
    for i, layer in enumerate(a.layers):
        h = h @ layer.kernel[...] + layer.bias[...]
        if i < n_linear - 1:
            h = 0.5 * h * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    assert_close(a(x), h, 1e-6, spec)


def test_unknown_adaptor_spec_is_an_error():
    with pytest.raises(ValueError, match="adaptor"):
        rdt_jax.RDTConfig(lang_adaptor="mlp2x_relu")


def _qkv(b=2, t=5, s=7, h=3, d=8, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, t, h, d)), jax.random.normal(k2, (b, s, h, d)),
            jax.random.normal(k3, (b, s, h, d)))


def _einsum_attention(q, k, v, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_attention_matches_einsum(impl):
    q, k, v = _qkv()
    assert_close(dot_product_attention(q, k, v, impl=impl), _einsum_attention(q, k, v), 1e-5, impl)
    mask = np.array([[True] * 7, [True] * 4 + [False] * 3])
    out = dot_product_attention(q, k, v, jnp.asarray(mask), impl=impl)
    assert_close(out, _einsum_attention(q, k, v, mask), 1e-5, f"{impl} masked")
    # Masked keys have no influence at all.
    v2 = v.at[1, 4:].set(1e3)
    assert_close(dot_product_attention(q, k, v2, jnp.asarray(mask), impl=impl), out, 1e-6, "mask leak")


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("group_bytes", [1, 2 * 2 * 5 * 7 * 4, 2**30])  # 1 head, 2 heads, all heads per group
def test_head_major_cross_attention_matches_einsum(impl, group_bytes, monkeypatch):
    monkeypatch.setattr(attention, "_CPU_GROUP_BYTES", group_bytes)
    q, k, v = _qkv(h=4)
    kh, vh = to_head_major(k, v)
    assert kh.shape == vh.shape == (2, 4, 7, 8)
    assert_close(head_major_attention(q, kh, vh, impl=impl), _einsum_attention(q, k, v), 1e-5, impl)
    mask = np.array([[True] * 7, [True] * 4 + [False] * 3])
    out = head_major_attention(q, kh, vh, jnp.asarray(mask), impl=impl)
    assert_close(out, _einsum_attention(q, k, v, mask), 1e-5, f"{impl} masked")
    _, vh2 = to_head_major(k, v.at[1, 4:].set(1e3))
    assert_close(head_major_attention(q, kh, vh2, jnp.asarray(mask), impl=impl), out, 1e-6, "mask leak")
    # bf16 inputs: float32 accumulation and softmax, a bf16 result within bf16 rounding.
    bf = [a.astype(jnp.bfloat16) for a in (q, kh, vh)]
    out_bf = head_major_attention(*bf, jnp.asarray(mask), impl=impl)
    assert out_bf.dtype == jnp.bfloat16
    assert_close(out_bf.astype(jnp.float32), out, 3e-2, "bf16")


@pytest.mark.parametrize("layout", ["head_major", "sequence_major"])
def test_bf16_cross_attention_matches_pytorch_bf16_attention(layout):
    """bf16 image cross-attention as the official code computes it under bf16 (PyTorch's
    ``scaled_dot_product_attention`` on bf16 CPU tensors): RDT-like sizes, within bf16 rounding."""
    torch = pytest.importorskip("torch")
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(b=1, t=67, s=600, h=4, d=64, seed=3))
    if layout == "head_major":
        out = head_major_attention(q, *to_head_major(k, v))
    else:
        out = attention.sequence_major_attention(q, k, v)
    tq, tk, tv = (torch.from_numpy(np.array(a.astype(jnp.float32))).to(torch.bfloat16).transpose(1, 2)
                  for a in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2).float().numpy()
    assert out.dtype == jnp.bfloat16
    # Widening each group to float32 instead (the earlier kernel) gives 4.9e-3 here, 2x further off.
    assert_close(out.astype(jnp.float32), want, 4e-3, f"{layout} vs torch bf16")


def _assert_gradients_match(ours, ref, args, names):
    """Gradients of ``ours`` (jitted) against autodiff of the float32 ``ref``: 1e-5 in float32, and
    bf16 inputs give bf16 gradients without NaN within bf16 error. Returns the float32 gradients."""
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
    want = jax.grad(ref, argnums=(0, 1, 2))(*args)
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape
        assert_close(a, b, 1e-5, name)
    got_bf = jax.grad(ours, argnums=(0, 1, 2))(*(a.astype(jnp.bfloat16) for a in args))
    for name, a, b in zip(names, got_bf, want, strict=True):
        assert a.dtype == jnp.bfloat16 and not bool(jnp.isnan(a.astype(jnp.float32)).any())
        assert_close(a.astype(jnp.float32), b, 5e-2, f"bf16 {name}")
    return got


@pytest.mark.parametrize("group_bytes", [1, 2 * 2 * 5 * 7 * 4, 2**30])
@pytest.mark.parametrize("masked", [False, True])
def test_head_major_attention_gradients_match_the_reference(group_bytes, masked, monkeypatch):
    """The grouped CPU kernel's hand-written backward against autodiff of the plain float32 reference."""
    monkeypatch.setattr(attention, "_CPU_GROUP_BYTES", group_bytes)
    q, k, v = _qkv(h=4)
    kh, vh = to_head_major(k, v)
    mask = jnp.asarray(np.array([[True] * 7, [True] * 4 + [False] * 3])) if masked else None
    ct = jax.random.normal(jax.random.key(9), q.shape)

    def ours(q, kh, vh):
        return jnp.sum(head_major_attention(q, kh, vh, mask) * ct)

    def ref(q, kh, vh):
        k, v = jnp.swapaxes(kh, 1, 2), jnp.swapaxes(vh, 1, 2)
        return jnp.sum(attention.reference_attention(q, k, v, mask) * ct)

    got = _assert_gradients_match(ours, ref, (q, kh, vh), ("dq", "dkh", "dvh"))
    if masked:  # masked keys get exactly zero gradient
        assert float(jnp.abs(got[1][1, :, 4:]).max()) == 0.0 and float(jnp.abs(got[2][1, :, 4:]).max()) == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_sequence_major_attention_matches_the_reference(masked):
    """The one-head-at-a-time CPU kernel on (B, S, H, hd) keys/values: output and gradients against the
    reference."""
    q, k, v = _qkv(h=4)
    mask = jnp.asarray(np.array([[True] * 7, [True] * 4 + [False] * 3])) if masked else None
    ct = jax.random.normal(jax.random.key(9), q.shape)
    assert_close(sequence_major_attention(q, k, v, mask), _einsum_attention(q, k, v, mask), 1e-5, "out")

    def ours(q, k, v):
        return jnp.sum(sequence_major_attention(q, k, v, mask) * ct)

    def ref(q, k, v):
        return jnp.sum(attention.reference_attention(q, k, v, mask) * ct)

    got = _assert_gradients_match(ours, ref, (q, k, v), ("dq", "dk", "dv"))
    if masked:  # masked keys get exactly zero gradient
        assert float(jnp.abs(got[1][1, 4:]).max()) == 0.0 and float(jnp.abs(got[2][1, 4:]).max()) == 0.0


def test_bf16_training_attention_products_stay_bf16():
    """The training kernel runs its score and value products as bf16 GEMMs on bf16 inputs, forward
    and backward (the earlier head-group kernel on sequence-major K/V ran its two-batch-axis
    products as float32 GEMMs on float32 copies)."""
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(b=2, t=5, s=24, h=4, d=8))

    def loss(q, k, v):
        return jnp.sum(sequence_major_attention(q, k, v).astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    operand_types = _dot_operand_types(hlo)
    assert len(operand_types) >= 7  # 2 products forward, 5 backward
    assert all(types == ["bf16", "bf16"] for types in operand_types), operand_types


def test_bf16_sampling_attention_products_stay_bf16():
    """The same for the cached-K/V kernel that sampling runs (forward only)."""
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(b=2, t=5, s=24, h=4, d=8))
    hlo = jax.jit(head_major_attention).lower(q, *to_head_major(k, v)).compile().as_text()
    operand_types = _dot_operand_types(hlo)
    assert len(operand_types) >= 2
    assert all(types == ["bf16", "bf16"] for types in operand_types), operand_types


def _dot_operand_types(hlo: str) -> list[list[str]]:
    """Element types of every dot's two operands in compiled HLO text (instructions and fused
    computations' parameters both declare ``%name = type[...]`` / ``name: type[...]``)."""
    types = dict(re.findall(r"%?([\w.\-]+) = (\w+)\[", hlo))
    types.update(re.findall(r"([\w.\-]+): (\w+)\[", hlo))
    dots = re.findall(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", hlo)
    return [[types[a], types[b]] for a, b in dots]


@pytest.mark.parametrize("form", ["timm_var", "rms"])
def test_norm_gradients_match_autodiff_of_the_formula(form):
    """rms_scale's hand-written backward against autodiff of the same float32 formula."""
    x = jax.random.normal(jax.random.key(1), (3, 5, 16)) * 2 + 0.5
    w = jax.random.normal(jax.random.key(2), (16,))
    ct = jax.random.normal(jax.random.key(3), x.shape)

    def formula(x, w):
        d = jnp.var(x, axis=-1, keepdims=True, ddof=1) if form == "timm_var" else jnp.mean(x**2, -1, keepdims=True)
        return jnp.sum(x * jax.lax.rsqrt(d + 1e-6) * w * ct)

    got = jax.jit(jax.grad(lambda x, w: jnp.sum(rms_scale(x, w, eps=1e-6, form=form) * ct), (0, 1)))(x, w)
    want = jax.grad(formula, (0, 1))(x, w)
    for name, a, b in zip(("dx", "dw"), got, want, strict=True):
        assert_close(a, b, 1e-5, name)


def test_head_groups_divide_the_heads():
    assert attention.head_group_size(32, 1) == 32
    assert attention.head_group_size(32, attention._CPU_GROUP_BYTES) == 1
    assert attention.head_group_size(12, attention._CPU_GROUP_BYTES // 5) == 4  # largest divisor that fits
    assert attention.head_group_size(7, 2 * attention._CPU_GROUP_BYTES) == 1  # nothing fits: one head at a time
    assert attention.head_group_size(32, 3, budget=10) == 2  # an explicit budget replaces the default


def test_attention_impl_errors():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="Pallas"):
        dot_product_attention(q, k, v, impl="pallas")
    with pytest.raises(ValueError, match="unknown attention impl"):
        dot_product_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="key_mask"):
        dot_product_attention(q, k, v, jnp.ones((2, 5), bool))
    kh, vh = to_head_major(k, v)
    with pytest.raises(ValueError, match="kh and vh must both be"):
        head_major_attention(q, jnp.swapaxes(kh, 2, 3), vh)
    with pytest.raises(ValueError, match="q must be"):
        head_major_attention(q[0], kh, vh)
    with pytest.raises(ValueError, match="key_mask"):
        head_major_attention(q, kh, vh, jnp.ones((2, 5), bool))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_split_equals_dense_then_slice(dtype, with_bias):
    """Values and all three gradients of the split K|V projection against dense + slicing."""
    ks = jax.random.split(jax.random.key(4), 5)
    x = jax.random.normal(ks[0], (2, 9, 12)).astype(dtype)
    w = (jax.random.normal(ks[1], (12, 10)) * 0.3).astype(dtype)
    b = jax.random.normal(ks[2], (10,)).astype(dtype) if with_bias else None
    ct = [jax.random.normal(ks[3], (2, 9, 4)), jax.random.normal(ks[4], (2, 9, 6))]  # split at 4 of 10

    def loss(fn):
        return lambda x, w, b: sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(fn(x, w, b), ct, strict=True))

    sliced = lambda x, w, b: (lambda y: (y[..., :4], y[..., 4:]))(dense(x, w, b))
    split = lambda x, w, b: dense_split(x, w, b, 4)
    for a, e in zip(split(x, w, b), sliced(x, w, b), strict=True):
        assert a.dtype == dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))
    argnums = (0, 1, 2) if with_bias else (0, 1)
    got = jax.jit(jax.grad(loss(split), argnums=argnums))(x, w, b)
    want = jax.grad(loss(sliced), argnums=argnums)(x, w, b)
    for name, a, e in zip(("dx", "dw", "db"), got, want, strict=False):
        assert a.dtype == dtype
        # bf16: the same 16-bit products and float32 accumulation; only the summation order differs.
        assert_close(np.asarray(a, np.float32), np.asarray(e, np.float32), 1e-6 if dtype == jnp.float32 else 1e-2, name)
