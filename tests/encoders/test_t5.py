"""T5 v1.1 encoder: parity with transformers' T5EncoderModel (PyTorch, CPU), sharding, formats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, PartitionSpec
from transformers.models.t5.modeling_t5 import T5Attention

from rdt_jax.encoders import load_t5
from rdt_jax.encoders.t5 import relative_position_buckets

CONFIGS = {
    "base": dict(vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2),
    # Odd sizes, inner dim (3·5) != d_model, few buckets / short max distance so long
    # sequences reach the log-spaced and clipped buckets in both directions.
    "odd": dict(
        vocab_size=53,
        d_model=24,
        d_ff=37,
        d_kv=5,
        num_heads=3,
        num_layers=3,
        relative_attention_num_buckets=10,
        relative_attention_max_distance=20,
    ),
    # Other feed-forwards transformers' T5 builds: the original (v1.0) non-gated ReLU, gated SiLU, exact GELU.
    "v1_0_relu": dict(vocab_size=40, d_model=16, d_ff=40, d_kv=4, num_heads=4, num_layers=2, feed_forward_proj="relu"),
    "gated_silu": dict(vocab_size=40, d_model=16, d_ff=24, d_kv=8, num_heads=2, num_layers=2,
                       feed_forward_proj="gated-silu"),
    "gelu": dict(vocab_size=40, d_model=16, d_ff=20, d_kv=4, num_heads=4, num_layers=1, feed_forward_proj="gelu"),
}


def _batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids (pad id 0) and the matching mask, one row per length."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(2, vocab, n)
        ids[i, n - 1] = 1  # EOS
    return ids, ids != 0


def _ref(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


def _forward(enc, ids, mask) -> np.ndarray:
    mask = None if mask is None else jnp.asarray(mask)
    out = jax.jit(lambda e, i, m: e(i, m))(enc, jnp.asarray(ids, jnp.int32), mask)
    return np.asarray(out.astype(jnp.float32))


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (10, 20), (8, 8), (64, 300)])
def test_relative_position_buckets(num_buckets, max_distance):
    n = 700
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, n, num_buckets, max_distance), ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_float32_padded_batch(hf_factory, errs, name):
    rel_err, max_rel_err = errs
    cfg = CONFIGS[name]
    model, path = hf_factory("t5_encoder", **cfg)
    ids, mask = _batch(cfg["vocab_size"], [45, 30, 7, 1])
    ref = _ref(model, ids, mask)
    enc = load_t5(path)
    out = _forward(enc, ids, mask)
    assert out.shape == ref.shape == (4, 45, cfg["d_model"])
    # All positions, padded ones included (transformers computes them too).
    assert rel_err(out, ref) <= 1e-5 and max_rel_err(out, ref) <= 1e-5, (
        rel_err(out, ref),
        max_rel_err(out, ref),
    )
    # Unpadded rows equal the padded batch's rows on their real tokens (what RDT stores).
    alone = _forward(enc, ids[2:3, :7], mask[2:3, :7])
    assert rel_err(alone[0], out[2, :7]) <= 1e-6
    # No mask means every token is real.
    full = ids[:1]
    assert rel_err(_forward(enc, full, None), _ref(model, full, np.ones_like(full, bool))) <= 1e-5


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_parity_bfloat16(hf_factory, errs, layout):
    rel_err, _ = errs
    cfg = CONFIGS["odd"]
    model, path = hf_factory("t5_encoder", **cfg)
    ids, mask = _batch(cfg["vocab_size"], [33, 12], seed=1)
    ref = _ref(model, ids, mask)
    enc = load_t5(path, dtype=jnp.bfloat16, layer_layout=layout)
    block0 = enc.blocks[0] if layout == "per_layer" else enc.blocks
    assert block0.wi_0[...].dtype == jnp.bfloat16
    out = _forward(enc, ids, mask)
    assert np.isfinite(out).all()
    valid = mask[..., None].repeat(out.shape[-1], -1)
    assert rel_err(out[valid], ref[valid]) <= 2e-2, rel_err(out[valid], ref[valid])


def test_layer_layouts_agree(hf_factory):
    """Per-layer (unrolled) and stacked (scanned) parameters: the same float32 numbers, bit for bit."""
    cfg = CONFIGS["odd"]
    _, path = hf_factory("t5_encoder", **cfg)
    ids, mask = _batch(cfg["vocab_size"], [33, 12], seed=3)
    per_layer = load_t5(path)
    stacked = load_t5(path, layer_layout="stacked")
    # Dense weights keep torch's (out, in) layout.
    assert len(per_layer.blocks) == 3 and per_layer.blocks[1].wo.shape == (24, 37)
    assert stacked.blocks.wo.shape == (3, 24, 37)
    np.testing.assert_array_equal(_forward(per_layer, ids, mask), _forward(stacked, ids, mask))


def test_full_t5_checkpoint_and_bin_format(hf_factory, errs, tmp_path):
    """google/t5-v1_1-xxl ships a full T5ForConditionalGeneration: decoder + lm_head keys are skipped."""
    rel_err, _ = errs
    cfg = CONFIGS["base"]
    model, path = hf_factory("t5_full", **cfg)
    ids, mask = _batch(cfg["vocab_size"], [20, 11], seed=2)
    with torch.no_grad():
        ref = model.encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    ref = ref.last_hidden_state.numpy()
    assert rel_err(_forward(load_t5(path), ids, mask), ref) <= 1e-5

    # The same weights as a pytorch_model.bin (read with torch.load(weights_only=True, mmap=True)).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, bin_dir / "pytorch_model.bin")
    enc = load_t5(bin_dir, jnp.bfloat16)  # dtype may be given positionally: load_t5(hf_dir, dtype)
    assert enc.dtype == jnp.bfloat16 and enc.embed[...].dtype == jnp.bfloat16
    assert rel_err(_forward(enc, ids, mask), ref) <= 2e-2

    # The legacy (pre-PyTorch-1.6, non-zip) .bin format cannot be memory-mapped; it is read whole.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert rel_err(_forward(load_t5(legacy), ids, mask), ref) <= 1e-5


def test_out_of_range_token_ids_are_an_error(hf_factory):
    cfg = CONFIGS["base"]
    _, path = hf_factory("t5_encoder", **cfg)
    enc = load_t5(path)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 64\); got values in \[1, 64\]"):
        enc(jnp.asarray([[1, 64]], jnp.int32))


def test_sharded_safetensors_index(hf_factory, errs, tmp_path):
    rel_err, _ = errs
    cfg = CONFIGS["base"]
    model, _ = hf_factory("t5_encoder", **cfg)
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask = _batch(cfg["vocab_size"], [9, 4], seed=3)
    assert rel_err(_forward(load_t5(tmp_path), ids, mask), _ref(model, ids, mask)) <= 1e-5


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_mesh_sharding(hf_factory, errs, layout):
    """Loading onto an 8-device (fsdp=4, tensor=2) mesh shards the weights and keeps the outputs."""
    rel_err, _ = errs
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    cfg = CONFIGS["base"]
    model, path = hf_factory("t5_encoder", **cfg)
    ids, mask = _batch(cfg["vocab_size"], [16, 16, 9, 3], seed=4)
    ref = _ref(model, ids, mask)
    plain = _forward(load_t5(path, layer_layout=layout), ids, mask)
    # Stacked parameters carry a leading (unsharded) layer axis.
    lead, n = ((None,), (2,)) if layout == "stacked" else ((), ())
    block = (lambda e: e.blocks) if layout == "stacked" else (lambda e: e.blocks[1])

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    enc = load_t5(path, mesh=mesh, layer_layout=layout)
    q = block(enc).q[...]
    # Dense weights are (out, in): q is (heads, embed), wo is (embed, mlp).
    assert q.sharding.spec == PartitionSpec(*lead, "tensor", "fsdp")
    assert {s.data.shape for s in q.addressable_shards} == {(*n, 32 // 2, 32 // 4)}
    assert block(enc).wo[...].sharding.spec == PartitionSpec(*lead, "fsdp", "tensor")
    assert enc.embed[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    sharded = _forward(enc, ids, mask)
    assert rel_err(sharded, plain) <= 1e-6
    assert rel_err(sharded, ref) <= 1e-5

    # FSDP only: one mesh axis, every width dimension split 8 ways.
    mesh8 = Mesh(np.array(jax.devices()), ("fsdp",))
    enc8 = load_t5(path, mesh=mesh8, layer_layout=layout)
    assert block(enc8).wi_0[...].sharding.spec == PartitionSpec(*lead, None, "fsdp")
    assert rel_err(_forward(enc8, ids, mask), plain) <= 1e-6


def test_offloaded_blocks_live_on_the_host_and_give_the_same_output(hf_factory, errs):
    """load_t5(..., offload=True): every block weight in pinned host memory (on one device or laid out over
    a mesh), the rest on the device, and the encoder's output unchanged, jitted or not."""
    cfg = CONFIGS["base"]
    _, path = hf_factory("t5_encoder", **cfg)
    ids, mask = _batch(cfg["vocab_size"], [12, 5], seed=5)
    plain = _forward(load_t5(path), ids, mask)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    for enc in (load_t5(path, offload=True), load_t5(path, offload=True, mesh=mesh)):
        blocks = [v for layer in enc.blocks for v in jax.tree.leaves(nnx.state(layer))]
        assert blocks and all(w.sharding.memory_kind == "pinned_host" for w in blocks)
        assert enc.embed[...].sharding.memory_kind == "device"
        assert errs[0](_forward(enc, ids, mask), plain) <= 1e-6  # the mesh changes reduction orders only
    eager = np.asarray(load_t5(path, offload=True)(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    assert errs[0](eager, plain) <= 1e-6
    # On CPU host and device memory are one; lowered for a GPU, every block weight is copied to the device.
    enc = load_t5(path, offload=True)
    gpu = (jax.jit(lambda e, i, m: e(i, m)).trace(enc, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
           .lower(lowering_platforms=("cuda",)).as_text())
    n_block_weights = sum(len(jax.tree.leaves(nnx.state(layer))) for layer in enc.blocks)
    assert gpu.count('_xla_buffer_placement = "device"') == n_block_weights
    with pytest.raises(ValueError, match="per_layer"):
        load_t5(path, offload=True, layer_layout="stacked")
