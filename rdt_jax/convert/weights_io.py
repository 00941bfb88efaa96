"""Streaming readers for the official weight files: one tensor in memory at a time.

* ``.safetensors``: read with ``safetensors`` (NumPy framework, bfloat16 via ml_dtypes) — no torch.
* ``.bin`` / ``.pt`` / ``.pth``: ``torch.load(weights_only=True, mmap=True)`` — tensors stay on disk
  until asked for. A DeepSpeed ``mp_rank_00_model_states.pt`` keeps the weights under ``module``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import pathlib
import struct
import zipfile
from collections.abc import Iterator
from typing import Any, Protocol

import ml_dtypes
import numpy as np


class WeightFileError(ValueError):
    """A weight file that cannot be read, or whose contents do not match the model."""


class MissingShardError(WeightFileError, FileNotFoundError):
    """A shard that a checkpoint's index file lists is not there."""


class WeightReader(Protocol):
    path: pathlib.Path

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> np.ndarray: ...
    def release(self, key: str) -> None: ...


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsReader:
    """Reads tensors with explicit file reads rather than a memory map.

    ``safetensors.safe_open`` maps the whole file, and every page it touches stays resident: after a
    full conversion the entire source would count against memory next to the output. Reading each
    tensor into its own buffer keeps only the tensor in flight. The header is still validated by the
    ``safetensors`` library before anything is read.
    """

    def __init__(self, path: pathlib.Path):
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="numpy") as f:  # validates the header and offsets
                self._keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from e
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self._data_start = 8 + header_len
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in self._entries.values()), default=0)
        size = path.stat().st_size
        if self._data_start + end > size:
            raise WeightFileError(
                f"{path}: truncated safetensors file ({size} bytes, header expects {self._data_start + end})"
            )

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise WeightFileError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        out = np.empty(tuple(entry["shape"]), dtype=dtype)
        if out.nbytes != end - begin:
            raise WeightFileError(f"{self.path}: tensor {key!r}: {end - begin} bytes for shape {out.shape}")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            # Read through a uint8 view: memoryview cannot export ml_dtypes' bfloat16.
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise WeightFileError(f"{self.path}: tensor {key!r} is truncated")
        return out

    def release(self, key: str) -> None:
        """Nothing to release: every ``get`` returns a fresh array."""


def weight_problem(value: np.ndarray) -> str | None:
    """Why a stored weight cannot be used (not floating point, NaN/inf), or None: a corrupt release would
    otherwise convert or load cleanly and compute NaN. One pass over the tensor."""
    if value.dtype.kind != "f" and value.dtype != ml_dtypes.bfloat16:
        return f"is {value.dtype}, expected floating point"
    if not np.all(np.isfinite(value)):
        return "holds NaN/inf"
    return None


def torch_to_numpy(t: Any) -> np.ndarray:
    """A CPU tensor as NumPy without rounding; bfloat16 bits reinterpreted as ml_dtypes.bfloat16."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


_MADV_DONTNEED = 4  # <sys/mman.h>, Linux


def _drop_mapped_pages(address: int, nbytes: int) -> None:
    """Unmaps the whole pages of a read-only file mapping's range from this process's resident set.

    The pages stay in the page cache and are re-read transparently if touched again, so this is
    only ever an RSS saving. Linux-only; silently nothing elsewhere.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    stop = (address + nbytes) // page * page
    if stop > start:
        libc = ctypes.CDLL(libc_name)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_DONTNEED)


def load_torch_file(path: str | pathlib.Path) -> tuple[Any, bool]:
    """``(object, memory_mapped)`` of a ``.bin``/``.pt`` file, read with ``torch.load(weights_only=True)``
    (tensors and containers only, never arbitrary pickled objects). Memory-mapped when it is torch's zip
    format; the legacy (pre-1.6) format cannot be, and is read whole. WeightFileError otherwise."""
    try:
        import torch
    except ImportError as e:
        raise WeightFileError(
            f"{path}: reading .bin/.pt files needs torch; install the extra: pip install 'rdt-jax[torch]'"
        ) from e
    mapped = zipfile.is_zipfile(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped), mapped
    except Exception as e:  # RuntimeError / UnpicklingError / EOFError: truncated or not a torch file
        raise WeightFileError(f"{path}: cannot load torch file ({type(e).__name__}: {e})") from e


class TorchReader:
    def __init__(self, path: pathlib.Path):
        self.path = path
        obj, self._mapped = load_torch_file(path)  # first: its error says how to install torch
        import torch

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
            return torch_to_numpy(self._tensors[key])
        except Exception as e:
            raise WeightFileError(f"{self.path}: cannot read tensor {key!r} ({e})") from e

    def release(self, key: str) -> None:
        """Done with ``key``: its pages of the memory-mapped file leave the resident set.

        Pages read from a memory map stay resident (rdt-1b: the whole 2.46 GB file by the end,
        on top of the converted output). Only for mmap-loaded files: the legacy format is loaded
        into anonymous memory, where dropping pages would lose data.
        """
        if self._mapped:
            storage = self._tensors[key].untyped_storage()
            _drop_mapped_pages(storage.data_ptr(), storage.nbytes())


# Single files, then the index files ``save_pretrained`` writes when it shards a large checkpoint.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json")


def find_weights(src: pathlib.Path) -> pathlib.Path:
    """The weight file (or shard index) inside a Hugging Face-style directory (safetensors preferred)."""
    for name in WEIGHT_FILE_NAMES:
        if (src / name).is_file():
            return src / name
    raise WeightFileError(f"{src}: no weight file found (looked for {', '.join(WEIGHT_FILE_NAMES)})")


def read_shard_index(index: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> shard file of a Hugging Face index file (``*.index.json``, its ``weight_map``), every
    listed shard checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightFileError(f"{index}: not a shard index with a 'weight_map' ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFileError(f"{index}: 'weight_map' must map tensor names to shard files")
    shard_of = {k: index.parent / v for k, v in weight_map.items()}
    for shard in sorted(set(shard_of.values())):
        if not shard.is_file():
            raise MissingShardError(f"{index}: shard {shard.name} does not exist")
    return shard_of


class ShardedReader:
    """The shards a Hugging Face index file (``*.index.json``: ``weight_map`` key -> shard file) lists, read as
    one checkpoint; each shard is opened when one of its tensors is first asked for."""

    def __init__(self, index: pathlib.Path):
        self.path = index
        self._shard_of = read_shard_index(index)
        self._readers: dict[pathlib.Path, WeightReader] = {}

    def _reader(self, key: str) -> WeightReader:
        if key not in self._shard_of:
            raise WeightFileError(f"{self.path}: no tensor {key!r} in the index")
        shard = self._shard_of[key]
        if shard not in self._readers:
            reader = open_weights(shard)
            missing = sorted({k for k, s in self._shard_of.items() if s == shard} - set(reader.keys()))
            if missing:
                raise WeightFileError(f"{shard}: {len(missing)} tensor(s) that {self.path.name} places there are "
                                      f"missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
            self._readers[shard] = reader
        return self._readers[shard]

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader(key).shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._reader(key).get(key)

    def release(self, key: str) -> None:
        self._reader(key).release(key)


def open_weights(path: str | pathlib.Path) -> WeightReader:
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file does not exist")
    if path.name.endswith(".index.json"):
        return ShardedReader(path)
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return TorchReader(path)
    raise WeightFileError(f"{path}: unknown weight file type {path.suffix!r} (.safetensors, .bin, .pt, .pth, "
                          "or a *.index.json shard index)")


def iter_tensors(reader: WeightReader) -> Iterator[tuple[str, np.ndarray]]:
    for key in reader.keys():
        yield key, reader.get(key)
