"""Converting a policy's parameters between the stacked and the per-layer block layout.

Checkpoints, the converter and training use the stacked layout (``lang_blocks`` / ``img_blocks``
leaves carry a leading layer axis). ``RDTConfig.layer_layout == "per_layer"`` stores each block
separately (``lang_blocks`` is a list of blocks), which XLA:CPU runs without copying every layer's
weights out of the stack at each step. Both functions work on pure parameter dicts (``{"model":
{...}, ...}``), move one leaf at a time and drop the source leaf before the next, so converting a
model never holds more than one extra tensor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_GROUPS = ("lang_blocks", "img_blocks")


def _leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out.extend(_leaves(v, (*prefix, k)))
        else:
            out.append((*prefix, k))
    return out


def _get(tree: dict, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _pop(tree: dict, path: tuple) -> Any:
    return _get(tree, path[:-1]).pop(path[-1])


def _put(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def is_per_layer(params: dict) -> bool:
    """Whether a pure parameter dict holds its blocks per layer (integer keys under ``lang_blocks``)."""
    blocks = params.get("model", {}).get("lang_blocks", {})
    return bool(blocks) and all(isinstance(k, int) for k in blocks)


def _layers_of(arr: Any) -> list:
    """``arr``'s slices along its first axis, as arrays of the same kind."""
    concrete = isinstance(arr, jax.Array) and not isinstance(arr, jax.core.Tracer)
    if concrete and len(arr.devices()) == 1 and next(iter(arr.devices())).platform == "cpu":
        # Copied out of a host view: slicing the jax array dispatched one compiled program per shape,
        # and their compilations and buffers left 0.4 GiB of heap behind for rdt-170m.
        host = np.asarray(arr)
        return [jax.device_put(host[i], arr.sharding) for i in range(arr.shape[0])]
    return [arr[i] for i in range(arr.shape[0])]


def unstack_blocks(params: dict) -> dict:
    """Stacked -> per-layer. ``params`` is consumed (its block leaves are popped); returns the new dict."""
    model = dict(params["model"])
    for group in BLOCK_GROUPS:
        stacked = model.get(group)
        if not stacked:
            continue
        per_layer: dict[int, dict] = {}
        for path in _leaves(stacked):
            arr = _pop(stacked, path)
            for i, layer in enumerate(_layers_of(arr)):
                _put(per_layer, (i, *path), layer)
            del arr
        model[group] = per_layer
    return {**params, "model": model}


def stack_blocks(params: dict) -> dict:
    """Per-layer -> stacked (the checkpoint / converter layout). ``params`` is not modified."""
    model = dict(params["model"])
    for group in BLOCK_GROUPS:
        layers = model.get(group)
        if not layers:
            continue
        n = len(layers)
        if sorted(layers) != list(range(n)):
            raise ValueError(f"model.{group}: per-layer keys must be 0..{n - 1}, got {sorted(layers)}")
        stacked: dict = {}
        for path in _leaves(layers[0]):
            _put(stacked, path, jnp.stack([_get(layers[i], path) for i in range(n)]))
        model[group] = stacked
    return {**params, "model": model}


def _is_param_tree(x: Any) -> bool:
    return isinstance(x, dict) and "model" in x and isinstance(x["model"], dict)


def to_layer_layout(tree: Any, per_layer: bool) -> Any:
    """Every parameter dict inside ``tree`` (a parameter dict, or a train state, whose params, EMA and
    optimiser moments are such dicts) in the per-layer (``per_layer=True``) or stacked layout;
    everything else as it is. ``tree`` is not modified."""
    def convert(x: Any) -> Any:
        if not _is_param_tree(x) or is_per_layer(x) == per_layer:
            return x
        return unstack_blocks(jax.tree.map(lambda a: a, x)) if per_layer else stack_blocks(x)

    return jax.tree.map(convert, tree, is_leaf=_is_param_tree)
