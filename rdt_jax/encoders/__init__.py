"""Frozen RDT encoders in Flax NNX: SigLIP so400m vision tower and T5-v1.1-XXL text encoder.

Both load Hugging Face checkpoints strictly and tensor by tensor (:mod:`.hf_import`); see
:mod:`.siglip`, :mod:`.t5`, :mod:`.tokenizer` and :mod:`.image_encoding`. The language embedding
files T5's outputs are stored in are :mod:`rdt_jax.data.language`'s (exported here under the names
``load_lang_embedding``, ``save_lang_embedding_safetensors`` and ``save_lang_embedding_pt`` too).
"""

from rdt_jax.data.language import read_embedding as load_lang_embedding
from rdt_jax.data.language import save_embedding as save_lang_embedding_safetensors
from rdt_jax.data.language import save_embedding_pt as save_lang_embedding_pt
from rdt_jax.encoders.hf_import import CheckpointMismatchError, CheckpointReader
from rdt_jax.encoders.image_encoding import encode_images, make_image_encoder, preprocess_images
from rdt_jax.encoders.siglip import SIGLIP_SO400M_384, SiglipVisionConfig, SiglipVisionTower, load_siglip
from rdt_jax.encoders.t5 import T5_V1_1_XXL, T5Encoder, T5EncoderConfig, load_t5
from rdt_jax.encoders.tokenizer import load_t5_tokenizer, tokenize

__all__ = [
    "SIGLIP_SO400M_384",
    "T5_V1_1_XXL",
    "CheckpointMismatchError",
    "CheckpointReader",
    "SiglipVisionConfig",
    "SiglipVisionTower",
    "T5Encoder",
    "T5EncoderConfig",
    "encode_images",
    "load_lang_embedding",
    "load_siglip",
    "load_t5",
    "load_t5_tokenizer",
    "make_image_encoder",
    "preprocess_images",
    "save_lang_embedding_pt",
    "save_lang_embedding_safetensors",
    "tokenize",
]
