"""Strict import: a checkpoint that does not match the model fails with a clear error."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rdt_jax.encoders import CheckpointMismatchError, load_siglip, load_t5

T5_CFG = dict(vocab_size=40, d_model=16, d_ff=24, d_kv=4, num_heads=4, num_layers=2)
SIGLIP_CFG = dict(
    hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=14, patch_size=7
)


@pytest.fixture
def t5_dir(hf_factory, tmp_path):
    _, src = hf_factory("t5_encoder", **T5_CFG)
    dst = tmp_path / "t5"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def siglip_dir(hf_factory, tmp_path):
    _, src = hf_factory("siglip_vision", **SIGLIP_CFG)
    dst = tmp_path / "siglip"
    shutil.copytree(src, dst)
    return dst


def _edit(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_key(t5_dir):
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    _edit(t5_dir, lambda t: t.pop(key))
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"missing key '{key}'")) as e:
        load_t5(t5_dir)
    assert str(t5_dir) in str(e.value)


def test_missing_tied_embedding(t5_dir):
    _edit(t5_dir, lambda t: t.pop("shared.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'shared\.weight'.*encoder\.embed_tokens\.weight"):
        load_t5(t5_dir)


def test_extra_key(siglip_dir):
    _edit(siglip_dir, lambda t: t.__setitem__("encoder.layers.2.mlp.fc1.weight", np.zeros((24, 16), np.float32)))
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape("model.safetensors: unexpected key 'encoder.layers.2.mlp.fc1.weight' with shape (24, 16)"),
    ):
        load_siglip(siglip_dir)


def test_wrong_shape(siglip_dir):
    key = "encoder.layers.1.self_attn.q_proj.weight"
    _edit(siglip_dir, lambda t: t.__setitem__(key, np.zeros((16, 15), np.float32)))
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape(f"model.safetensors: key '{key}' has shape (16, 15), expected (16, 16)"),
    ):
        load_siglip(siglip_dir)


def test_config_disagreeing_with_weights(t5_dir):
    cfg = json.loads((t5_dir / "config.json").read_text())
    cfg["num_layers"] = 3  # block 2 is missing from the weights
    (t5_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointMismatchError, match=re.escape("missing key 'encoder.block.2.layer.0.SelfAttention.q.weight'")
    ):
        load_t5(t5_dir)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (dict(model_type="bert", architectures=["BertModel"]), "model_type 'bert'.*not a T5 model"),
        (dict(architectures=["MT5ForConditionalGeneration"]), "not a T5 model"),
        (dict(feed_forward_proj="gated-tanhshrink"), "feed_forward_proj 'gated-tanhshrink' is not supported"),
        (dict(feed_forward_proj="double-gated-gelu"), "feed_forward_proj 'double-gated-gelu' is not supported"),
    ],
)
def test_wrong_architecture_t5(t5_dir, edit, match):
    cfg = json.loads((t5_dir / "config.json").read_text())
    cfg.update(edit)
    (t5_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=match) as e:
        load_t5(t5_dir)
    assert "config.json" in str(e.value)


def test_wrong_architecture_siglip(t5_dir):
    """Pointing the vision loader at the T5 directory names the file and what it found."""
    with pytest.raises(CheckpointMismatchError, match=r"config.json: model_type 't5'.*is not a SigLIP model"):
        load_siglip(t5_dir)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(FileNotFoundError, match=re.escape("no model.safetensors")):
        load_siglip(tmp_path)


def test_unsupported_siglip_activation_names_the_config(siglip_dir):
    cfg = json.loads((siglip_dir / "config.json").read_text())
    cfg["hidden_act"] = "tanhshrink"
    (siglip_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=re.escape("config.json: unsupported hidden_act 'tanhshrink'")):
        load_siglip(siglip_dir)


def test_unreadable_bin_names_the_file(t5_dir):
    (t5_dir / "model.safetensors").unlink()
    (t5_dir / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointMismatchError, match=r"pytorch_model\.bin: not a readable PyTorch state dict"):
        load_t5(t5_dir)


def test_truncated_safetensors_names_the_file_and_tensor(t5_dir):
    path = t5_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointMismatchError, match=r"model\.safetensors: tensor '.*' ends at byte \d+, past the end "
                                                      r"of the file .*truncated"):
        load_t5(t5_dir)


def test_non_tensor_bin_entry_names_the_key(t5_dir):
    import torch

    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(str(t5_dir / "model.safetensors")).items()}
    (t5_dir / "model.safetensors").unlink()
    torch.save({**state, "extra_step": 5}, t5_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match=r"pytorch_model\.bin: entry 'extra_step' is a int, not a tensor"):
        load_t5(t5_dir)


@pytest.mark.parametrize("bad", ["int", "nan"])
def test_non_float_or_non_finite_weights_are_refused(t5_dir, bad):
    key = "encoder.final_layer_norm.weight"

    def corrupt(t):
        if bad == "int":
            t[key] = t[key].astype(np.int64)
        else:
            t[key] = t[key].copy()
            t[key][2] = np.nan

    _edit(t5_dir, corrupt)
    message = "is int64, expected floating point" if bad == "int" else "holds NaN/inf"
    with pytest.raises(CheckpointMismatchError, match=rf"model\.safetensors: tensor '{re.escape(key)}' {message}"):
        load_t5(t5_dir)
