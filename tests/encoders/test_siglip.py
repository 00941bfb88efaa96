"""SigLIP vision tower: parity with transformers' SiglipVisionModel (PyTorch, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rdt_jax.encoders import _ops, load_siglip
from rdt_jax.encoders.image_encoding import encode_images, make_image_encoder

# (name, config): includes odd widths / head dims / MLP sizes and an image size not divisible
# by the patch size (the last pixels are never seen, as in so400m's 384 = 27·14 + 6).
CONFIGS = {
    "base": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    ),
    "odd": dict(
        hidden_size=36,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=3,
        image_size=31,
        patch_size=5,
    ),
    "one_layer_big_patch": dict(
        hidden_size=24,
        intermediate_size=50,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=40,
        patch_size=14,
    ),
    # Other activations transformers' SiglipVisionConfig accepts: exact GELU, quick GELU.
    "exact_gelu": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                       image_size=14, patch_size=7, hidden_act="gelu"),
    "quick_gelu": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                       image_size=21, patch_size=7, hidden_act="quick_gelu"),
}


def _forward(tower, x, **kw):
    return np.asarray(jax.jit(lambda t, x: t(x, **kw))(tower, jnp.asarray(x)).astype(jnp.float32))


def _ref(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_float32(hf_factory, errs, name):
    rel_err, max_rel_err = errs
    model, path = hf_factory("siglip_vision", **CONFIGS[name])
    cfg = CONFIGS[name]
    x = np.random.default_rng(1).uniform(-1, 1, (3, 3, cfg["image_size"], cfg["image_size"])).astype(np.float32)
    ref = _ref(model, x)
    tower = load_siglip(path)
    out = _forward(tower, x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5 and max_rel_err(out, ref) <= 1e-5, (
        rel_err(out, ref),
        max_rel_err(out, ref),
    )
    # Our pipeline's channels-last layout gives the same tokens.
    out_nhwc = _forward(tower, x.transpose(0, 2, 3, 1), channels_last=True)
    assert rel_err(out_nhwc, ref) <= 1e-5


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_parity_bfloat16(hf_factory, errs, layout):
    rel_err, _ = errs
    model, path = hf_factory("siglip_vision", **CONFIGS["odd"])
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 31, 31)).astype(np.float32)
    ref = _ref(model, x)
    tower = load_siglip(path, dtype=jnp.bfloat16, layer_layout=layout)
    layer0 = tower.layers[0] if layout == "per_layer" else tower.layers
    assert layer0.q_kernel[...].dtype == jnp.bfloat16
    out = _forward(tower, x)
    assert np.isfinite(out).all()
    assert rel_err(out, ref) <= 2e-2, rel_err(out, ref)


def test_layer_layouts_agree(hf_factory):
    """Per-layer (unrolled) and stacked (scanned) parameters: the same float32 numbers, bit for bit."""
    _model, path = hf_factory("siglip_vision", **CONFIGS["odd"])
    x = np.random.default_rng(6).uniform(-1, 1, (2, 3, 31, 31)).astype(np.float32)
    per_layer = load_siglip(path)
    stacked = load_siglip(path, layer_layout="stacked")
    assert len(per_layer.layers) == 3 and per_layer.layers[2].fc1_kernel.shape == (36, 37)
    assert stacked.layers.fc1_kernel.shape == (3, 36, 37)
    np.testing.assert_array_equal(_forward(per_layer, x), _forward(stacked, x))
    with pytest.raises(ValueError, match="layer_layout"):
        load_siglip(path, layer_layout="scan")


def test_full_siglip_checkpoint(hf_factory, errs):
    """The published so400m repo is a full SiglipModel: vision_model.* keys, a text tower, logit scale."""
    rel_err, _ = errs
    cfg = CONFIGS["base"]
    model, path = hf_factory("siglip_full", **cfg)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    out = _forward(load_siglip(path), x)
    assert rel_err(out, ref) <= 1e-5


def test_image_encoding_six_images(hf_factory, errs):
    """(B, 6, C, H, W) -> (B, 6·P, D) with token = image·P + patch, both layouts, jitted."""
    rel_err, _ = errs
    cfg = CONFIGS["base"]
    model, path = hf_factory("siglip_vision", **cfg)
    imgs = np.random.default_rng(4).uniform(-1, 1, (2, 6, 3, 28, 28)).astype(np.float32)
    ref = _ref(model, imgs.reshape(12, 3, 28, 28)).reshape(2, 6 * 16, 32)
    tower = load_siglip(path)
    enc = make_image_encoder(tower)
    out = np.asarray(enc(imgs))
    assert out.shape == (2, 96, 32)
    assert rel_err(out, ref) <= 1e-5
    out_nhwc = np.asarray(enc(imgs.transpose(0, 1, 3, 4, 2)))
    assert rel_err(out_nhwc, ref) <= 1e-5
    # The un-jitted function agrees too (one image's tokens land in its own slot).
    one = np.asarray(encode_images(tower, jnp.asarray(imgs[:1])))
    np.testing.assert_allclose(one[0, 16:32], ref[0, 16:32], rtol=0, atol=1e-5 * np.abs(ref).max())
    # One sample's six images, unbatched: (6, C, H, W) -> (6·P, D), jitted or not.
    single = np.asarray(enc(imgs[1]))
    assert single.shape == (96, 32) and rel_err(single, ref[1]) <= 1e-5
    assert np.asarray(encode_images(tower, jnp.asarray(imgs[1]))).shape == (96, 32)


def test_wrong_image_size_is_an_error(hf_factory):
    _, path = hf_factory("siglip_vision", **CONFIGS["base"])
    tower = load_siglip(path)
    with pytest.raises(ValueError, match="patches"):
        tower(jnp.zeros((1, 3, 35, 35)))


def test_preprocess_and_encode_raw_images(hf_factory, errs):
    """Raw uint8 frames (one camera missing) -> data-pipeline preprocessing -> tokens, vs transformers."""
    rel_err, _ = errs
    image_transform = pytest.importorskip("rdt_jax.data.image_transform")
    from rdt_jax.encoders.image_encoding import preprocess_images

    cfg = dict(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=96
    )
    model, path = hf_factory("siglip_vision", **cfg)
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(5)]
    frames.insert(2, None)
    pix = preprocess_images(frames)
    assert pix.shape == (6, 3, 384, 384) and pix.dtype == np.float32
    np.testing.assert_array_equal(pix[0], image_transform.preprocess(frames[0]))
    np.testing.assert_allclose(pix[2], (127 / 255 - 0.5) / 0.5, rtol=1e-6)
    ref = _ref(model, pix).reshape(1, 6 * 16, 16)
    out = np.asarray(make_image_encoder(load_siglip(path))(pix[None]))
    assert rel_err(out, ref) <= 1e-5
    # The pipeline's uint8 pixels (resized, not yet normalised) are normalised by the encoder itself with
    # the same table: the same tokens (raw 0..255 values went into the patch embedding before).
    resized = np.stack([image_transform.preprocess_uint8(f) for f in frames[:2]])  # (2, 3, 384, 384) uint8
    uint8_tokens = encode_images(load_siglip(path), jnp.asarray(resized))
    np.testing.assert_array_equal(np.asarray(uint8_tokens), np.asarray(encode_images(
        load_siglip(path), jnp.asarray(pix[:2]))))


# One group of all 6 (batch, head) pairs; 2 groups of 8 (256-token scores); one pair per group
# (so400m-sized scores, and longer).
@pytest.mark.parametrize("shape", [(2, 9, 3, 8), (4, 256, 4, 16), (1, 729, 4, 72), (2, 1200, 2, 16)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-3)])
def test_self_attention_matches_float64(errs, shape, dtype, tol):
    """float32: the textbook attention; bf16: bf16 products, float32 accumulation and softmax. Both
    against float64 math on the same (rounded) inputs, with logits large enough (x30) that
    exponentials without the row maximum subtracted would overflow float32."""
    rel_err, _ = errs
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype) for i in range(3))
    q = (30 * q).astype(dtype)
    scale = shape[-1] ** -0.5
    q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    p64 = np.exp(logits - logits.max(-1, keepdims=True))
    ref64 = np.einsum("bhqk,bkhd->bqhd", p64 / p64.sum(-1, keepdims=True), v64)
    out = _ops.self_attention(q, k, v)
    assert out.dtype == dtype and out.shape == shape
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all() and rel_err(out, ref64) <= tol
    # A convex combination of equal values is that value.
    ones = _ops.self_attention(q, k, jnp.ones(shape, dtype))
    np.testing.assert_allclose(np.asarray(ones.astype(jnp.float32)), 1.0, rtol=1e-6)


def test_self_attention_refuses_mixed_dtypes():
    x = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="one dtype"):
        _ops.self_attention(x, x.astype(jnp.bfloat16), x)
