"""Precomputed T5 instruction embeddings: their files, the empty instruction, right-padding.

Two file formats, both holding the **unpadded** embedding ``(L, D)`` of one instruction (``L`` its
token count including EOS; ``D`` = 4096 for T5-XXL):

* **official** ``.pt``, in either of RDT's layouts: ``encode_lang_batch.py``'s bare bfloat16 tensor
  ``(L, D)``, or single-instruction ``encode_lang.py``'s dict ``{"name", "instruction", "embeddings":
  (1, L, D)}`` (what the deployment script loads as ``torch.load(p)["embeddings"]``). Read with
  ``torch.load(weights_only=True)`` (no pickle code execution; torch imported lazily).
* **ours** ``.safetensors``: tensor ``embeddings`` ``(L, D)`` and metadata ``instruction``.

:func:`read_embedding` returns a file's values as stored (bfloat16 ones as ``ml_dtypes.bfloat16``);
:func:`load_embedding` is what the data pipeline reads: float32, ``D`` = 4096, finite.
``EmbeddingStore`` maps instruction text to a file in a directory by the SHA-256 of the text.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib

import numpy as np

from rdt_jax.convert.weights_io import SafetensorsReader, WeightFileError, torch_to_numpy
from rdt_jax.file_modes import as_created

LANG_DIM = 4096
_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"


@functools.cache
def empty_embedding() -> np.ndarray:
    """The official empty-instruction embedding (1, 4096) float32 (bf16 values, exact)."""
    e = np.load(_ASSETS / "empty_lang_embed_f32.npy", allow_pickle=False)
    e.setflags(write=False)
    return e


def _checked_shape(shape: tuple[int, ...], path: str, width: int | None = LANG_DIM) -> tuple[int, int]:
    """(L, D) of an embedding stored as (L, D) or RDT's single-instruction (1, L, D); ``width``: the
    required D (None: any)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or shape[0] == 0 or (width is not None and shape[1] != width):
        expected = f"(L, {width})" if width is not None else "(L, D)"
        raise ValueError(f"{path}: language embedding has shape {shape}, expected {expected}")
    return shape


def _safetensors_file(path: str) -> SafetensorsReader:
    """A reader of our safetensors format (header checked; bfloat16 through ml_dtypes, which
    ``safetensors.numpy`` cannot load)."""
    try:
        reader = SafetensorsReader(pathlib.Path(path))
    except WeightFileError as e:  # a truncated or foreign file
        raise ValueError(f"{path}: cannot read safetensors ({e})") from e
    if "embeddings" not in reader.keys():
        raise ValueError(f"{path}: missing key 'embeddings' (has {sorted(reader.keys())})")
    return reader


def embedding_length(path: str | os.PathLike) -> int:
    """The token count L of an embedding file, checking its (L, 4096) shape: from the header alone for
    .safetensors (an embedding store can hold many thousands), by loading for .pt."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return load_embedding(path).shape[0]
    return _checked_shape(_safetensors_file(path).shape("embeddings"), path)[0]


def _torch(path: str, doing: str):
    """torch, imported lazily; without it, a ValueError naming ``path`` and how to install it."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: {doing} .pt embeddings needs torch: pip install 'rdt-jax[torch]' (or "
                         "use .safetensors embeddings, scripts/encode_lang.py --formats safetensors)") from None
    return torch


def _read_pt(path: str) -> np.ndarray:
    torch = _torch(path, "reading")
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
    return torch_to_numpy(obj)


def read_embedding(path: str | os.PathLike, width: int | None = None) -> np.ndarray:
    """(L, D) from a .pt or .safetensors file, in its stored dtype (bfloat16 as ml_dtypes.bfloat16);
    ``width``: the D it must have (None: any)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        e = _safetensors_file(path).get("embeddings")
    elif path.endswith(".pt"):
        e = _read_pt(path)
    else:
        raise ValueError(f"{path}: unknown embedding format (expected .pt or .safetensors)")
    return e.reshape(_checked_shape(e.shape, path, width))


def load_embedding(path: str | os.PathLike) -> np.ndarray:
    """(L, 4096) float32 from a .pt or .safetensors file, checked finite: what training reads."""
    return _finite(read_embedding(path, LANG_DIM).astype(np.float32, copy=False), os.fspath(path))


def _finite(e: np.ndarray, path: str) -> np.ndarray:
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{path}: language embedding contains NaN or inf")
    return e


def _to_write(path: str | os.PathLike, embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` as a float32 (L, D) array, refused (naming ``path``) if misshapen or not finite."""
    path, e = os.fspath(path), np.asarray(embeddings)
    e = e.reshape(_checked_shape(e.shape, path, None)).astype(np.float32)
    return np.ascontiguousarray(_finite(e, path))


def save_embedding(path: str | os.PathLike, embeddings: np.ndarray, instruction: str,
                   dtype: np.typing.DTypeLike = np.float32) -> None:
    """Write our safetensors format: ``embeddings`` (L, D) in ``dtype`` + metadata ``instruction``.

    float32 by default: bf16-computed values are stored exactly, and any safetensors reader can
    read them (numpy has no bfloat16)."""
    from safetensors.numpy import save_file

    e = _to_write(path, embeddings).astype(dtype)
    save_file({"embeddings": e}, os.fspath(path), metadata={"instruction": instruction})
    as_created(path)  # safetensors writes 0600: a shared embedding store must be readable by its users


def save_embedding_pt(path: str | os.PathLike, embeddings: np.ndarray, *, bfloat16: bool = True,
                      instruction: str | None = None, name: str | None = None) -> None:
    """Write an official ``.pt`` (bfloat16 like RDT's files, else float32): with ``instruction``, the
    single-instruction dict ``{"name", "instruction", "embeddings": (1, L, D)}`` (``name`` defaults to
    the file stem); without, the batch script's bare ``(L, D)`` tensor."""
    torch = _torch(os.fspath(path), "writing")
    t = torch.from_numpy(_to_write(path, embeddings))
    t = t.to(torch.bfloat16) if bfloat16 else t
    if instruction is None:
        torch.save(t, os.fspath(path))
        return
    name = pathlib.Path(path).stem if name is None else name
    torch.save({"name": name, "instruction": instruction, "embeddings": t[None]}, os.fspath(path))


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
