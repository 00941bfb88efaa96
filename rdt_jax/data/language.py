"""Precomputed T5 instruction embeddings: loading, the empty instruction, right-padding.

Formats: the official `.pt` files (a tensor (L, 4096) or (1, L, 4096), or the
`encode_lang.py` dict with key "embeddings"), read with `torch.load(weights_only=True)`
(torch imported lazily); and ours, a safetensors file with tensor `embeddings` (L, 4096)
and metadata `instruction`. `EmbeddingStore` maps instruction text to a file in a directory
by the SHA-256 of the text.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib

import numpy as np

from rdt_jax.file_modes import as_created

LANG_DIM = 4096
_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"


@functools.cache
def empty_embedding() -> np.ndarray:
    """The official empty-instruction embedding (1, 4096) float32 (bf16 values, exact)."""
    e = np.load(_ASSETS / "empty_lang_embed_f32.npy", allow_pickle=False)
    e.setflags(write=False)
    return e


def _checked_shape(shape: tuple[int, ...], path: str) -> tuple[int, int]:
    """(L, 4096) of an embedding stored as (L, 4096) or RDT's single-instruction (1, L, 4096)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or shape[1] != LANG_DIM or shape[0] == 0:
        raise ValueError(f"{path}: language embedding has shape {shape}, expected (L, {LANG_DIM})")
    return shape


def _check(e: np.ndarray, path: str) -> np.ndarray:
    e = e.reshape(_checked_shape(e.shape, path))
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{path}: language embedding contains NaN or inf")
    return e


def embedding_length(path: str | os.PathLike) -> int:
    """The token count L of an embedding file, checking its (L, 4096) shape: from the header alone for
    .safetensors (an embedding store can hold many thousands), by loading for .pt."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return load_embedding(path).shape[0]
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            if "embeddings" not in f.keys():
                raise ValueError(f"{path}: missing key 'embeddings' (has {sorted(f.keys())})")
            shape = tuple(f.get_slice("embeddings").get_shape())
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: cannot read safetensors ({e})") from e
    return _checked_shape(shape, path)[0]


def load_embedding(path: str | os.PathLike) -> np.ndarray:
    """(L, 4096) float32 from a .pt or .safetensors file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: cannot read safetensors ({e})") from e
        if "embeddings" not in tensors:
            raise ValueError(f"{path}: missing key 'embeddings' (has {sorted(tensors)})")
        return _check(np.asarray(tensors["embeddings"], np.float32), path)
    if path.endswith(".pt"):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path}: reading .pt embeddings needs torch: pip install 'rdt-jax[torch]' (or "
                             "re-encode the instructions as .safetensors with scripts/encode_lang.py)") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or not a torch file: torch raises OSError, KeyError, pickle errors
            raise ValueError(f"{path}: cannot read the .pt embedding ({type(e).__name__}: {e})") from e
        if isinstance(obj, dict):
            if "embeddings" not in obj:
                raise ValueError(f"{path}: missing key 'embeddings' (has {sorted(obj)})")
            obj = obj["embeddings"]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(obj).__name__}")
        return _check(obj.detach().float().numpy(), path)
    raise ValueError(f"{path}: unknown embedding format (expected .pt or .safetensors)")


def save_embedding(path: str | os.PathLike, embeddings: np.ndarray, instruction: str) -> None:
    """Write our safetensors format: `embeddings` (L, 4096) + metadata `instruction`."""
    from safetensors.numpy import save_file

    save_file({"embeddings": np.ascontiguousarray(_check(np.asarray(embeddings), os.fspath(path)))},
              os.fspath(path), metadata={"instruction": instruction})
    as_created(path)  # safetensors writes 0600: a shared embedding store must be readable by its users


class EmbeddingStore:
    """Directory of `<sha256(text)[:32]>.safetensors` files, one per instruction text."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)

    @staticmethod
    def filename(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32] + ".safetensors"

    def path(self, text: str) -> pathlib.Path:
        return self.directory / self.filename(text)

    def put(self, text: str, embeddings: np.ndarray) -> pathlib.Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        p = self.path(text)
        save_embedding(p, embeddings, text)
        return p

    def get(self, text: str) -> np.ndarray:
        p = self.path(text)
        if not p.exists():
            raise KeyError(f"no precomputed embedding for instruction {text!r} (expected {p})")
        return load_embedding(p)


# The shortest padded length "bucket" padding uses: instructions are mostly 10-40 T5 tokens, so a batch
# takes one of two or three shapes (one compiled train step each).
MIN_BUCKET = 16


def bucket_length(longest: int, max_len: int) -> int:
    """The length a batch whose longest instruction has ``longest`` tokens is padded to under "bucket"
    padding: the smallest power of two >= max(longest, MIN_BUCKET), at most ``max_len``."""
    if longest > max_len:
        raise ValueError(f"language embedding has {longest} tokens, more than max_lang_len={max_len}")
    return min(max_len, 1 << (max(longest, MIN_BUCKET) - 1).bit_length())


def pad_embeddings(embs: list[np.ndarray], length: int, dtype: np.typing.DTypeLike = np.float32
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad each (L_i, 4096) with zeros into one (B, length, 4096) batch; mask (B, length) True on
    each row's first L_i positions (as the official collator, DATA.md section 4.5)."""
    out = np.zeros((len(embs), length, LANG_DIM), dtype)
    mask = np.zeros((len(embs), length), bool)
    for i, e in enumerate(embs):
        if e.shape[0] > length:
            raise ValueError(f"language embedding has {e.shape[0]} tokens, more than the batch's {length}")
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return out, mask


def extend_padding(embeds: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A padded (B, L, 4096) batch and its (B, L) mask right-padded further, to ``length`` >= L tokens."""
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {embeds.shape[1]} language tokens to fewer ({length})")
    return np.pad(embeds, ((0, 0), (0, extra), (0, 0))), np.pad(mask, ((0, 0), (0, extra)))


def pad_embedding(e: np.ndarray, max_len: int, dtype: np.typing.DTypeLike = np.float32
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (L, 4096) with zeros to (max_len, 4096); mask True on the first L rows."""
    if e.shape[0] > max_len:
        raise ValueError(f"language embedding has {e.shape[0]} tokens, more than max_lang_len={max_len}")
    out, mask = pad_embeddings([e], max_len, dtype)
    return out[0], mask[0]
