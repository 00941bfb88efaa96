"""Full-size parameter trees vs the Hugging Face key/shape lists (published configs, no memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rdt_jax.encoders import SIGLIP_SO400M_384, T5_V1_1_XXL, SiglipVisionConfig, T5EncoderConfig
from rdt_jax.encoders.siglip import SiglipVisionTower, siglip_sources
from rdt_jax.encoders.t5 import T5Encoder, t5_sources

# google/siglip-so400m-patch14-384/config.json (as published).
SO400M_CONFIG = {
    "architectures": ["SiglipModel"],
    "initializer_factor": 1.0,
    "model_type": "siglip",
    "text_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
    },
    "torch_dtype": "float32",
    "transformers_version": "4.37.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}

# google/t5-v1_1-xxl/config.json (as published).
T5_XXL_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}


def _hf_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _our_leaves(model: nnx.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    _, state = nnx.split(model)
    return {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _check_one_to_one(sources, ours, hf, aliases=()):
    """Every HF key feeds exactly one of our params (with its shape), every param is fed."""
    assert {s.path for s in sources} == set(ours)
    fed: dict[str, tuple[str, ...]] = {}
    for s in sources:
        shape = ours[s.path]
        assert len(s.keys) == (shape[0] if s.stacked else 1), s.path
        want = shape[1:] if s.stacked else shape
        assert s.transform(np.empty(s.hf_shape, np.int8)).shape == want, s.path
        for alts in s.keys:
            present = [k for k in alts if k in hf]
            assert present, f"{alts} not in the HF model"
            for k in present:
                assert hf[k] == s.hf_shape, (k, hf[k], s.hf_shape)
                assert k not in fed, f"{k} feeds both {fed[k]} and {s.path}"
                fed[k] = s.path
    assert set(hf) - set(fed) - set(aliases) == set()


def test_published_configs_parse():
    assert SiglipVisionConfig.from_hf(SO400M_CONFIG) == SIGLIP_SO400M_384
    assert T5EncoderConfig.from_hf(T5_XXL_CONFIG) == T5_V1_1_XXL
    assert SIGLIP_SO400M_384.num_patches == 729 and SIGLIP_SO400M_384.head_dim == 72


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_siglip_so400m_tree(param_dtype, layout):
    cfg = SIGLIP_SO400M_384
    ours = _our_leaves(
        nnx.eval_shape(lambda: SiglipVisionTower(cfg, param_dtype=param_dtype, layer_layout=layout, rngs=nnx.Rngs(0)))
    )
    with torch.device("meta"):
        full = transformers.SiglipModel(transformers.SiglipConfig.from_dict(SO400M_CONFIG))
    hf = {k: v for k, v in _hf_shapes(full).items() if k.startswith("vision_model.") and ".head." not in k}
    assert len(hf) == 5 + 16 * 27
    _check_one_to_one(siglip_sources(cfg, "vision_model.", layout), ours, hf)
    assert len(ours) == 5 + 16 * (27 if layout == "per_layer" else 1)
    n_params = sum(int(np.prod(s)) for s in ours.values())
    assert n_params == sum(int(np.prod(s)) for s in hf.values())
    assert 0.41e9 < n_params < 0.42e9  # so400m's tower without the pooling head


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_t5_xxl_tree(layout):
    cfg = T5_V1_1_XXL
    ours = _our_leaves(
        nnx.eval_shape(lambda: T5Encoder(cfg, param_dtype="bfloat16", layer_layout=layout, rngs=nnx.Rngs(0)))
    )
    hf_cfg = transformers.T5Config.from_dict(T5_XXL_CONFIG)
    with torch.device("meta"):
        enc = transformers.T5EncoderModel(hf_cfg)
    hf = _hf_shapes(enc)
    assert len(hf) == 2 + 1 + 1 + 9 * 24
    _check_one_to_one(t5_sources(cfg, layout), ours, hf, aliases=("encoder.embed_tokens.weight",))
    assert len(ours) == 3 + 9 * (24 if layout == "per_layer" else 1)
    n_params = sum(int(np.prod(s)) for s in ours.values())
    assert n_params == sum(int(np.prod(s)) for k, s in hf.items() if k != "encoder.embed_tokens.weight")
    assert 4.7e9 < n_params < 4.8e9
    # The published checkpoint is a full T5: its encoder keys are the same set.
    with torch.device("meta"):
        full = transformers.T5ForConditionalGeneration(transformers.T5Config.from_dict(T5_XXL_CONFIG))
    enc_keys = {k for k in _hf_shapes(full) if not k.startswith(("decoder.", "lm_head."))}
    assert enc_keys == set(hf)
