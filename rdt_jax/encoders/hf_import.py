"""Streaming, strict import of Hugging Face checkpoints into stacked NNX parameters.

A Hugging Face model directory holds ``config.json`` and the weights in one of four layouts:
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
``pytorch_model.bin``, or sharded ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json``.
:class:`CheckpointReader` lists every tensor (name, shape, dtype) without reading data and
then reads tensors one at a time, so a 19 GB T5-XXL checkpoint never needs a second full copy
in host memory:

* safetensors files are memory-mapped and parsed from their (documented, JSON) header. We do
  not use ``safetensors.safe_open(framework="numpy")`` because its numpy backend rejects
  bfloat16, the dtype most published checkpoints use; ``ml_dtypes`` gives numpy a bfloat16.
* ``.bin`` files are opened with ``torch.load(..., weights_only=True, mmap=True)``: no pickle
  code execution, and tensors stay on disk until touched. torch is only imported for them.

:func:`import_params` then fills every parameter of an abstract NNX state from a list of
:class:`ParamSource` rules. It is strict: every checkpoint key must be consumed by a rule or be
explicitly ignored, every rule key must exist, every shape is checked before any data is read,
and each failure raises :class:`CheckpointMismatchError` naming the file, the key and the shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from rdt_jax.convert.weights_io import (
    MissingShardError,
    WeightFileError,
    load_torch_file,
    read_shard_index,
    torch_to_numpy,
    weight_problem,
)

__all__ = [
    "CheckpointMismatchError",
    "CheckpointReader",
    "ParamSource",
    "TensorInfo",
    "import_params",
    "logical_sharding",
    "make_sharding_fn",
    "per_layer_sources",
    "read_config",
    "read_safetensors",
    "torch_linear_source",
]

# safetensors dtype tags -> numpy dtypes (bfloat16 through ml_dtypes).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class CheckpointMismatchError(ValueError):
    """The checkpoint does not match the model: missing/extra key, wrong shape, wrong architecture."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    file: pathlib.Path


def read_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
    """Parse ``config.json`` as plain JSON (no code from the config is ever executed)."""
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    with path.open() as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise CheckpointMismatchError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _weight_files(hf_dir: pathlib.Path) -> tuple[list[pathlib.Path], str]:
    """The weight files of a model directory and their format, preferring safetensors."""
    for index_name, fmt in (
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "bin"),
    ):
        index = hf_dir / index_name
        if index.is_file():
            try:
                return sorted(set(read_shard_index(index).values())), fmt
            except MissingShardError:
                raise  # a FileNotFoundError
            except WeightFileError as e:
                raise CheckpointMismatchError(str(e)) from None
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"], "safetensors"
    if (hf_dir / "pytorch_model.bin").is_file():
        return [hf_dir / "pytorch_model.bin"], "bin"
    raise FileNotFoundError(
        f"{hf_dir}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
        "pytorch_model.bin.index.json"
    )


def _safetensors_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise CheckpointMismatchError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return header, 8 + n


def read_safetensors(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a small safetensors file as numpy arrays (bfloat16 via ml_dtypes), and its metadata."""
    path = pathlib.Path(path)
    header, start = _safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    raw = np.fromfile(path, dtype=np.uint8)
    out: dict[str, np.ndarray] = {}
    for key, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointMismatchError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[key] = raw[start + begin : start + end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out, dict(metadata)


class CheckpointReader:
    """Lists and reads the tensors of a Hugging Face model directory one at a time."""

    def __init__(self, hf_dir: str | pathlib.Path):
        self.hf_dir = pathlib.Path(hf_dir)
        files, self.format = _weight_files(self.hf_dir)
        self.entries: dict[str, TensorInfo] = {}
        self._st_offsets: dict[str, tuple[int, int, int]] = {}  # key -> (file data start, begin, end)
        self._bin: dict[pathlib.Path, Mapping[str, Any]] = {}
        self._mmaps: dict[pathlib.Path, np.memmap] = {}
        for path in files:
            if self.format == "safetensors":
                header, start = _safetensors_header(path)
                size = path.stat().st_size
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    if info["dtype"] not in _ST_DTYPES:
                        raise CheckpointMismatchError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
                    self._add(key, TensorInfo(tuple(info["shape"]), info["dtype"], path))
                    begin, end = info["data_offsets"]
                    if start + end > size:
                        raise CheckpointMismatchError(f"{path}: tensor {key!r} ends at byte {start + end}, past the "
                                                      f"end of the file ({size} bytes): truncated?")
                    self._st_offsets[key] = (start, begin, end)
            else:
                try:
                    sd, _ = load_torch_file(path)
                except WeightFileError as e:
                    raise CheckpointMismatchError(f"{path}: not a readable PyTorch state dict ({e})") from e
                if not isinstance(sd, Mapping):
                    raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(sd).__name__}")
                self._bin[path] = sd
                for key, t in sd.items():
                    if not (hasattr(t, "shape") and hasattr(t, "dtype")):
                        raise CheckpointMismatchError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
                    self._add(key, TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), path))

    def _add(self, key: str, info: TensorInfo) -> None:
        if key in self.entries:
            raise CheckpointMismatchError(f"{info.file}: key {key!r} also present in {self.entries[key].file}")
        self.entries[key] = info

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_weight(self, key: str) -> np.ndarray:
        """:meth:`read`, refusing a tensor that is not floating point or holds NaN/inf (a corrupt download
        would load cleanly and encode NaN)."""
        value = self.read(key)
        problem = weight_problem(value)
        if problem:
            raise CheckpointMismatchError(f"{self.entries[key].file}: tensor {key!r} {problem}")
        return value

    def read(self, key: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (a view into the mmap where possible)."""
        info = self.entries[key]
        if self.format == "bin":
            return torch_to_numpy(self._bin[info.file][key])
        mm = self._mmaps.get(info.file)
        if mm is None:
            mm = self._mmaps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        start, begin, end = self._st_offsets[key]
        dtype = _ST_DTYPES[info.dtype]
        expected = int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointMismatchError(
                f"{info.file}: tensor {key!r} has {end - begin} bytes, expected {expected} for shape {info.shape}"
            )
        return mm[start + begin : start + end].view(dtype).reshape(info.shape)

    def close(self) -> None:
        self._mmaps.clear()
        self._bin.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Where one (possibly layer-stacked) parameter comes from in a Hugging Face checkpoint.

    ``keys`` has one entry per slice along the leading (stacked-layer) axis when ``stacked``,
    else exactly one entry. Each key may list alternatives (first present wins), e.g. a tied
    embedding stored under either name. ``transform`` maps the HF array (``hf_shape``) to the
    parameter's layout (e.g. a Linear weight transpose); it must be a pure layout change.
    """

    path: tuple[str, ...]
    keys: tuple[tuple[str, ...], ...]
    hf_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda a: a
    stacked: bool = False


def _linear(a: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> our kernel (in, out)."""
    return a.T


def linear_source(path: tuple[str, ...], keys: Sequence[str], d_in: int, d_out: int) -> ParamSource:
    """A layer-stacked torch Linear weight, transposed to our (in, out) kernel."""
    return ParamSource(path, tuple((k,) for k in keys), (d_out, d_in), _linear, stacked=True)


def torch_linear_source(path: tuple[str, ...], keys: Sequence[str], d_in: int, d_out: int) -> ParamSource:
    """A layer-stacked torch Linear weight kept in torch's (out, in) layout (no transform).

    For weights applied as ``W @ x`` by ``_ops.dense_t`` (T5): with few tokens XLA:CPU's bf16
    GEMMs are fastest when the weight is the left operand and contracts over its last axis.
    """
    return ParamSource(path, tuple((k,) for k in keys), (d_out, d_in), stacked=True)


def vector_source(path: tuple[str, ...], keys: Sequence[str], n: int) -> ParamSource:
    return ParamSource(path, tuple((k,) for k in keys), (n,), stacked=True)


def per_layer_sources(sources: Iterable[ParamSource]) -> list[ParamSource]:
    """The same rules for the ``per_layer`` layout: a stacked source ``(group, *rest)`` becomes one
    unstacked source ``(group, "i", *rest)`` per layer (the path of layer ``i`` of an ``nnx.List``)."""
    out: list[ParamSource] = []
    for src in sources:
        if not src.stacked:
            out.append(src)
            continue
        group, *rest = src.path
        out += [dataclasses.replace(src, path=(group, str(i), *rest), keys=(k,), stacked=False)
                for i, k in enumerate(src.keys)]
    return out


def _state_leaves(state: nnx.State) -> dict[tuple[str, ...], nnx.Variable]:
    flat = nnx.to_flat_state(state)
    return {tuple(str(p) for p in path): var for path, var in flat}


def logical_sharding(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules: Mapping[str, str | Sequence[str] | None],
) -> jax.sharding.NamedSharding:
    """Map logical axis names to a NamedSharding on ``mesh``.

    A logical name shards its dimension over the mesh axes ``rules[name]``, keeping only mesh
    axes that exist in ``mesh``, are not already used by another dimension, and divide the
    dimension (so small test configs and odd sizes fall back to replication instead of failing).
    """
    spec: list[Any] = []
    used: set[str] = set()
    for i, dim in enumerate(shape):
        name = names[i] if names is not None and i < len(names) else None
        target = rules.get(name) if name is not None else None
        axes = [target] if isinstance(target, str) else list(target or [])
        kept: list[str] = []
        size = 1
        for ax in axes:
            if ax in mesh.shape and ax not in used and dim % (size * mesh.shape[ax]) == 0:
                kept.append(ax)
                size *= mesh.shape[ax]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def import_params(
    reader: CheckpointReader,
    abstract_state: nnx.State,
    sources: Iterable[ParamSource],
    *,
    ignore: Sequence[str] = (),
    sharding_for: Callable[[nnx.Variable], jax.sharding.Sharding | None] | None = None,
    memory_kind_for: Callable[[tuple[str, ...]], str | None] | None = None,
) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.eval_shape``) from the checkpoint, strictly.

    ``ignore`` holds regular expressions (``re.fullmatch``) for checkpoint keys that are known and
    deliberately unused (e.g. the T5 decoder in a full T5 checkpoint). ``sharding_for`` gives
    each parameter's sharding (default: None = the default device); ``memory_kind_for(path)`` the
    memory it lives in (e.g. ``"pinned_host"`` for weights offloaded to the host; None = device
    memory). Each tensor goes straight from the file to that memory.
    """
    sources = list(sources)
    leaves = _state_leaves(abstract_state)
    by_path = {s.path: s for s in sources}
    where = f"{reader.hf_dir}"

    # 1. The rules cover the parameter tree exactly.
    missing_rules = sorted(set(leaves) - set(by_path))
    extra_rules = sorted(set(by_path) - set(leaves))
    if missing_rules or extra_rules:
        raise CheckpointMismatchError(
            f"internal mapping error: params without a source {missing_rules}, sources without a param {extra_rules}"
        )

    for path, src in by_path.items():
        var = leaves[path]
        if src.stacked and (len(src.keys) != var.shape[0]):
            raise CheckpointMismatchError(
                f"internal mapping error: {path} stacks {len(src.keys)} keys, shape {var.shape}"
            )
        want = var.shape[1:] if src.stacked else var.shape
        got = src.transform(np.empty(src.hf_shape, np.int8)).shape
        if got != want:
            raise CheckpointMismatchError(f"internal mapping error: {path} expects {want}, transform gives {got}")

    # 2. Resolve every key (alternatives: first present) and check presence and shapes before reading.
    resolved: dict[tuple[str, ...], list[str]] = {}
    consumed: set[str] = set()
    problems: list[str] = []
    for src in sources:
        names: list[str] = []
        for alts in src.keys:
            found = [k for k in alts if k in reader.entries]
            if not found:
                problems.append(f"missing key {alts[0]!r}" + (f" (or {list(alts[1:])})" if len(alts) > 1 else ""))
                continue
            names.append(found[0])
            consumed.update(found)  # a tied duplicate stored under both names counts as used
            for k in found:
                shape = reader.entries[k].shape
                if shape != src.hf_shape:
                    problems.append(
                        f"{reader.entries[k].file.name}: key {k!r} has shape {shape}, expected {src.hf_shape}"
                    )
        resolved[src.path] = names
    unexpected = [k for k in reader.entries if k not in consumed and not any(re.fullmatch(p, k) for p in ignore)]
    for k in sorted(unexpected):
        problems.append(f"{reader.entries[k].file.name}: unexpected key {k!r} with shape {reader.entries[k].shape}")
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointMismatchError(f"{where}: checkpoint does not match the model:\n  {shown}")

    # 3. Stream tensor by tensor. A stacked parameter is allocated once on its devices and filled
    #    one layer at a time (donated in-place update), so the host never holds more than one
    #    layer's slice and the devices never hold two copies of a parameter.
    shard = sharding_for or (lambda var: None)
    out: list[tuple[tuple[str, ...], nnx.Variable]] = []
    for path, var in leaves.items():
        src = by_path[path]
        dtype = np.dtype(var.dtype)
        keys = resolved[path]
        sharding = shard(var)
        kind = memory_kind_for(path) if memory_kind_for is not None else None
        if kind is not None:
            if src.stacked:
                raise ValueError(f"{'/'.join(path)}: stacked parameters cannot be kept in {kind} memory "
                                 "(they are filled layer by layer on the device); use the per-layer layout")
            sharding = (sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])).with_memory_kind(kind)
        if src.stacked:
            value = _zeros(tuple(var.shape), dtype, sharding)
            for i, k in enumerate(keys):
                host = np.ascontiguousarray(src.transform(reader.read_weight(k)).astype(dtype, copy=False))
                value = _set_layer(value, host, np.int32(i))
        else:
            host = np.ascontiguousarray(src.transform(reader.read_weight(keys[0])).astype(dtype, copy=False))
            value = jax.device_put(host, sharding)
        del host
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def _zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buf: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buf, layer.astype(buf.dtype), i, 0)


def make_sharding_fn(
    mesh: jax.sharding.Mesh | None, rules: Mapping[str, Any]
) -> Callable[[nnx.Variable], jax.sharding.Sharding | None]:
    """``sharding_for`` for :func:`import_params`: default device, or the mesh layout of the logical names."""
    if mesh is None:
        return lambda var: None
    return lambda var: logical_sharding(var.get_metadata().get("out_sharding"), tuple(var.shape), mesh, rules)
