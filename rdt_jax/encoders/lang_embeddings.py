"""Pre-computed language embedding files (T5-XXL ``last_hidden_state`` of one instruction).

Two formats, both holding the **unpadded** embedding ``(L, 4096)`` of one instruction
(``L`` = its token count including EOS):

* **official** ``.pt``, in either of RDT's two layouts: ``encode_lang_batch.py``'s bare bfloat16
  tensor ``(L, 4096)``, or single-instruction ``encode_lang.py``'s dict
  ``{"name", "instruction", "embeddings": (1, L, 4096)}`` (what the deployment script loads, as
  ``torch.load(p)["embeddings"]``). :func:`save_lang_embedding_pt` writes the dict when given the
  instruction; :func:`load_lang_embedding` reads both, with ``torch.load(..., weights_only=True)``
  (no pickle code execution).
* **ours** ``.safetensors``: key ``embeddings`` ``(L, 4096)`` float32, metadata
  ``{"instruction": <text>}``. float32 (bf16-computed values are stored exactly) because the
  data pipeline (``rdt_jax.data.language.load_embedding``) reads it with
  ``safetensors.numpy``, which has no bfloat16.

``rdt_jax.data.language.load_embedding`` reads both formats (float32); :func:`load_lang_embedding`
here does too and keeps a bfloat16 ``.pt`` in ``ml_dtypes.bfloat16`` (no 4096 check, so tests
can use small widths).
"""

from __future__ import annotations

import pathlib

import ml_dtypes
import numpy as np

from rdt_jax.encoders.hf_import import read_safetensors
from rdt_jax.file_modes import as_created

__all__ = ["load_lang_embedding", "save_lang_embedding_pt", "save_lang_embedding_safetensors"]


def _check(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.ndim != 2:
        raise ValueError(f"language embedding must be (L, D), got shape {emb.shape}")
    return emb


def save_lang_embedding_safetensors(
    path: str | pathlib.Path, emb: np.ndarray, instruction: str, *, dtype: np.dtype = np.float32
) -> None:
    from safetensors.numpy import save_file

    save_file(
        {"embeddings": np.ascontiguousarray(_check(emb).astype(dtype))},
        str(path),
        {"instruction": instruction},
    )
    as_created(path)  # safetensors writes 0600


def save_lang_embedding_pt(
    path: str | pathlib.Path,
    emb: np.ndarray,
    *,
    bfloat16: bool = True,
    instruction: str | None = None,
    name: str | None = None,
) -> None:
    """An official ``.pt`` (bfloat16 like RDT's files, else float32): with ``instruction``, the
    single-instruction dict ``{"name", "instruction", "embeddings": (1, L, D)}`` (``name`` defaults to
    the file stem); without, the batch script's bare ``(L, D)`` tensor."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(_check(emb).astype(np.float32)))
    t = t.to(torch.bfloat16) if bfloat16 else t
    if instruction is None:
        torch.save(t, str(path))
        return
    name = pathlib.Path(path).stem if name is None else name
    torch.save({"name": name, "instruction": instruction, "embeddings": t[None]}, str(path))


def load_lang_embedding(path: str | pathlib.Path) -> np.ndarray:
    """``(L, D)`` from either format (``.safetensors`` by suffix, otherwise the official ``.pt``)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path)
        if "embeddings" not in tensors:
            raise KeyError(f"{path}: no 'embeddings' tensor (keys {sorted(tensors)})")
        return _check(tensors["embeddings"])
    import torch

    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if "embeddings" not in obj:
            raise KeyError(f"{path}: dict without 'embeddings' (keys {sorted(obj)})")
        obj = obj["embeddings"]
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"{path}: expected a tensor, got {type(obj).__name__}")
    if obj.dtype == torch.bfloat16:
        return _check(obj.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return _check(obj.float().numpy())
