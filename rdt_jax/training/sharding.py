"""Parameter sharding by path rules, big_vision style: no annotations in the model code.

A parameter's "/"-joined path is matched against ``PARAM_RULES`` (regex, first match wins) to get one
*logical* axis name per dimension; ``LOGICAL_TO_MESH`` maps logical names to mesh axes. A dimension
that the mesh axis does not divide stays replicated (tiny test models, odd vocabularies). The same
rules apply to the optimiser state and the EMA, whose leaves carry the parameter path as a suffix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rdt_jax.training.mesh import BATCH_AXES

# (regex on the path, logical axes per dimension). Kernels are stored (in, out); stacked blocks
# carry a leading layer axis, per-layer blocks (``lang_blocks/<i>/...``) do not.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"_blocks/\d+/.*/kernel$", ("embed", "mlp")),
    (r"_blocks/\d+/.*/(bias|weight)$", ("norm",)),
    (r"_blocks/.*/kernel$", ("layers", "embed", "mlp")),
    (r"_blocks/.*/(bias|weight)$", ("layers", "norm")),
    (r"pos_embed$", (None, "seq", "embed")),
    (r"kernel$", ("embed", "mlp")),
    (r".*", ()),  # biases, norm weights, scalars: replicated
)
# FSDP shards the input side of every matmul (the largest axis of most kernels).
LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp", "mlp": None, "layers": None, "norm": None, "seq": None,
}


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path):
            if axes and len(axes) != ndim:
                raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} axes for {path} with {ndim} dims")
            return axes or (None,) * ndim
    raise AssertionError("the catch-all rule always matches")


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    out = []
    for dim, name in zip(shape, logical_axes(path, len(shape)), strict=True):
        axis = LOGICAL_TO_MESH.get(name) if name else None
        size = 1
        for a in (axis,) if isinstance(axis, str) else axis or ():
            size *= mesh.shape[a]
        out.append(axis if axis is not None and size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimiser state, EMA)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_str(p), tuple(x.shape), mesh)), tree)


def unsharded_fraction(tree: Any, mesh: Mesh) -> float:
    """The fraction of the tree's bytes whose rule asks for a sharded dimension that the mesh axis does not
    divide, so they are replicated on every device (e.g. fsdp 6 with a width of 2048): a layout to warn about,
    since memory per device is then that of pure data parallelism."""
    total = fallback = 0
    for p, x in jax.tree_util.tree_leaves_with_path(tree):
        size = x.size * x.dtype.itemsize
        total += size
        path = path_str(p)
        wanted = [LOGICAL_TO_MESH.get(n) for n in logical_axes(path, len(x.shape)) if n]
        asks_sharding = any(isinstance(a, str) and mesh.shape.get(a, 1) > 1 for a in wanted)
        if asks_sharding and all(d is None for d in spec_for(path, tuple(x.shape), mesh)):
            fallback += size
    return fallback / total if total else 0.0


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
