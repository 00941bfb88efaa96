"""Differentiating a scanned function with its 16-bit float residuals kept as bit patterns.

``lax.scan`` stacks every residual the backward pass needs across iterations with a
dynamic-update-slice, and the backward loop slices them out again. XLA:CPU has no 16-bit float
dynamic-update-slice: it widens the stacked buffer to float32, so each bf16 residual is stored at
twice its size and converted in full passes between the loops (rdt-170m, batch 2, no remat: the
saved image K/V alone were 2 x 250 MB of float32 and ~1 s of conversions per step). As uint16 the
same values are stacked and sliced in place.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from rdt_jax.model.attention import as_bits, from_bits


@jax.tree_util.register_pytree_node_class
class _BitResiduals:
    """A VJP closure's residuals, 16-bit ones as their uint16 bit patterns (``as_bits``; the structure
    and the original dtypes are static)."""

    def __init__(self, treedef, dtypes: tuple, leaves: list):
        self.treedef, self.dtypes, self.leaves = treedef, dtypes, leaves

    @classmethod
    def pack(cls, vjp_fn) -> _BitResiduals:
        leaves, treedef = jax.tree.flatten(vjp_fn)
        return cls(treedef, tuple(x.dtype for x in leaves), [as_bits(x) for x in leaves])

    def unpack(self):
        leaves = [from_bits(x, d) for x, d in zip(self.leaves, self.dtypes, strict=True)]
        return jax.tree.unflatten(self.treedef, leaves)

    def tree_flatten(self):
        return self.leaves, (self.treedef, self.dtypes)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(aux[0], aux[1], list(leaves))


def with_bit_residuals(fn: Callable) -> Callable:
    """``fn`` (positional array/pytree arguments) with the same values and gradients, whose 16-bit
    float residuals are handed to the backward pass as bit patterns (what a surrounding
    ``lax.scan`` then stacks). Remat policies applied to ``fn`` (``jax.checkpoint``) decide which
    residuals there are, as before."""

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def fwd(*args):
        out, vjp_fn = jax.vjp(fn, *args)
        return out, _BitResiduals.pack(vjp_fn)

    def bwd(res: _BitResiduals, ct):
        return res.unpack()(ct)

    wrapped.defvjp(fwd, bwd)
    return wrapped
