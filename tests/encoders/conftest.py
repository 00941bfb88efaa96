"""Helpers for the encoder tests: small random transformers models saved to temporary HF dirs."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """Relative error: Frobenius norm of the difference over that of the reference."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def max_rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """Largest elementwise difference relative to the largest reference magnitude."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def save_hf(model, path: pathlib.Path, **kw) -> pathlib.Path:
    model.save_pretrained(str(path), **kw)
    return path


@pytest.fixture
def errs():
    return rel_err, max_rel_err


@pytest.fixture(scope="session")
def hf_factory(tmp_path_factory):
    """``make(kind, seed=0, **config)`` -> (torch model in eval mode, saved dir), cached per arguments."""
    cache: dict = {}

    def make(kind: str, seed: int = 0, **cfg):
        key = (kind, seed, tuple(sorted(cfg.items())))
        if key not in cache:
            torch.manual_seed(seed)
            if kind == "siglip_vision":
                model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg))
            elif kind == "siglip_full":
                text = dict(
                    hidden_size=16,
                    intermediate_size=20,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    vocab_size=40,
                    max_position_embeddings=8,
                )
                model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=dict(cfg)))
            elif kind == "t5_encoder":
                model = transformers.T5EncoderModel(transformers.T5Config(**{"feed_forward_proj": "gated-gelu", **cfg}))
            elif kind == "t5_full":
                model = transformers.T5ForConditionalGeneration(
                    transformers.T5Config(**{"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, **cfg})
                )
            else:
                raise ValueError(kind)
            model.eval()
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(str(path))
            cache[key] = (model, path)
        return cache[key]

    return make
