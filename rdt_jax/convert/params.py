"""Official state dict <-> our parameter tree, strictly: every key used, every shape checked."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from rdt_jax.convert.keys import KeySpec, key_specs
from rdt_jax.convert.weights_io import WeightFileError, WeightReader, weight_problem
from rdt_jax.model.config import RDTConfig
from rdt_jax.model.layer_layout import is_per_layer, stack_blocks

PureParams = dict[str, Any]


def _set(tree: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def check_keys(reader: WeightReader, specs: list[KeySpec]) -> None:
    """Fails before any tensor is read if the key set or a shape differs from the config's."""
    have = set(reader.keys())
    want = {s.torch_key for s in specs}
    missing, extra = sorted(want - have), sorted(have - want)
    problems = []
    if missing:
        shapes = {s.torch_key: s.torch_shape for s in specs}
        listed = ", ".join(f"{k} {shapes[k]}" for k in missing[:8])
        more = " ..." if len(missing) > 8 else ""
        problems.append(f"{len(missing)} missing key(s) (expected shapes): {listed}{more}")
    if extra:
        listed = ", ".join(f"{k} {reader.shape(k)}" for k in extra[:8])
        problems.append(f"{len(extra)} unexpected key(s): {listed}{' ...' if len(extra) > 8 else ''}")
    for spec in specs:
        if spec.torch_key in have:
            shape = reader.shape(spec.torch_key)
            if shape != spec.torch_shape:
                problems.append(
                    f"shape mismatch for {spec.torch_key}: file has {shape}, config expects {spec.torch_shape}"
                )
    if problems:
        raise WeightFileError(f"{reader.path}: weights do not match the config:\n  " + "\n  ".join(problems))


def params_from_torch(reader: WeightReader, cfg: RDTConfig, dtype: Any = np.float32) -> PureParams:
    """Streams tensors into preallocated arrays of ``dtype``; peak memory ~ one copy of the output."""
    specs = key_specs(cfg)
    check_keys(reader, specs)
    dtype = np.dtype(dtype)
    n_layers = {"lang_blocks": cfg.num_lang_blocks, "img_blocks": cfg.num_img_blocks}
    tree: PureParams = {}
    for spec in specs:
        if spec.layer is not None:
            try:
                _get(tree, spec.path)
            except KeyError:
                _set(tree, spec.path, np.empty((n_layers[spec.path[1]], *spec.jax_shape), dtype))
    for spec in specs:
        value = reader.get(spec.torch_key)
        if value.shape != spec.torch_shape:  # the header lied (corrupt file)
            raise WeightFileError(
                f"{reader.path}: tensor {spec.torch_key} has shape {value.shape}, expected {spec.torch_shape}"
            )
        problem = weight_problem(value)
        if problem:
            raise WeightFileError(f"{reader.path}: tensor {spec.torch_key} {problem}")
        if spec.transpose:
            value = value.T
        if spec.layer is not None:
            _get(tree, spec.path)[spec.layer] = value.astype(dtype)
        else:
            _set(tree, spec.path, np.ascontiguousarray(value.astype(dtype)))
        del value
        reader.release(spec.torch_key)  # copied above (astype always copies)
    return tree


def check_params(params: PureParams, cfg: RDTConfig, what: str = "params") -> None:
    n_layers = {"lang_blocks": cfg.num_lang_blocks, "img_blocks": cfg.num_img_blocks}
    for spec in key_specs(cfg):
        try:
            arr = _get(params, spec.path)
        except (KeyError, TypeError):
            raise WeightFileError(f"{what}: missing parameter {'/'.join(map(str, spec.path))}") from None
        want = spec.jax_shape if spec.layer is None else (n_layers[spec.path[1]], *spec.jax_shape)
        if tuple(arr.shape) != want:
            raise WeightFileError(
                f"{what}: parameter {'/'.join(map(str, spec.path))} has shape {tuple(arr.shape)}, expected {want}"
            )


def torch_state_from_params(params: PureParams, cfg: RDTConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(official key, array in the official layout), in the official state-dict order.

    ``params`` may be in either layer layout (stacked, or per-layer as a CPU runner holds them).
    """
    if is_per_layer(params):
        params = stack_blocks(params)
    check_params(params, cfg)
    for spec in key_specs(cfg):
        value = np.asarray(_get(params, spec.path))
        if spec.layer is not None:
            value = value[spec.layer]
        yield spec.torch_key, np.ascontiguousarray(value.T if spec.transpose else value)
