"""Streaming readers for the official weight files: one tensor in memory at a time.

* ``.safetensors``: read with ``safetensors`` (NumPy framework, bfloat16 via ml_dtypes) — no torch.
* ``.bin`` / ``.pt`` / ``.pth``: ``torch.load(weights_only=True, mmap=True)`` — tensors stay on disk
  until asked for. A DeepSpeed ``mp_rank_00_model_states.pt`` keeps the weights under ``module``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any, Protocol

import ml_dtypes
import numpy as np


class WeightFileError(ValueError):
    """A weight file that cannot be read, or whose contents do not match the model."""


class WeightReader(Protocol):
    path: pathlib.Path

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> np.ndarray: ...


class SafetensorsReader:
    def __init__(self, path: pathlib.Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="numpy")
            self._keys = list(self._file.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from e
        self._check_size()

    def _check_size(self) -> None:
        # A truncated file has an intact header but data offsets past the end of the file.
        import json
        import struct

        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = self.path.stat().st_size
        if 8 + header_len + end > size:
            raise WeightFileError(
                f"{self.path}: truncated safetensors file ({size} bytes, header expects {8 + header_len + end})"
            )

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            raise WeightFileError(f"{self.path}: cannot read tensor {key!r} ({e})") from e


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchReader:
    def __init__(self, path: pathlib.Path):
        try:
            import torch
        except ImportError as e:
            raise WeightFileError(
                f"{path}: reading .bin/.pt files needs torch; install the extra: pip install 'rdt-jax[torch]'"
            ) from e
        self.path = path
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise WeightFileError(f"{path}: cannot load torch file ({e})") from e
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:
            raise WeightFileError(f"{path}: cannot load torch file ({type(e).__name__}: {e})") from e
        if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
            obj = obj["module"]  # DeepSpeed model-states file
        if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
            raise WeightFileError(f"{path}: expected a state dict (str -> tensor), got {type(obj).__name__}")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != len(obj):
            bad = sorted(set(obj) - set(tensors))[:5]
            raise WeightFileError(f"{path}: non-tensor entries in the state dict: {bad}")
        if tensors and all(k.startswith("module.") for k in tensors):
            tensors = {k[len("module.") :]: v for k, v in tensors.items()}
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> np.ndarray:
        try:
            return _torch_to_numpy(self._tensors[key])
        except Exception as e:
            raise WeightFileError(f"{self.path}: cannot read tensor {key!r} ({e})") from e


WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


def find_weights(src: pathlib.Path) -> pathlib.Path:
    """The weight file inside a Hugging Face-style directory (safetensors preferred)."""
    for name in WEIGHT_FILE_NAMES:
        if (src / name).is_file():
            return src / name
    raise WeightFileError(f"{src}: no weight file found (looked for {', '.join(WEIGHT_FILE_NAMES)})")


def open_weights(path: str | pathlib.Path) -> WeightReader:
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file does not exist")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return TorchReader(path)
    raise WeightFileError(f"{path}: unknown weight file type {path.suffix!r} (.safetensors, .bin, .pt, .pth)")


def iter_tensors(reader: WeightReader) -> Iterator[tuple[str, np.ndarray]]:
    for key in reader.keys():
        yield key, reader.get(key)
