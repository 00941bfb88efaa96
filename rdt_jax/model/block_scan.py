"""A ``lax.scan`` over stacked layers with its own VJP: the compute dtype's residuals and weight
gradients are kept in it, as bit patterns.

Two things plain autodiff of a scan does at rdt-1b scale, which this avoids:

* **16-bit residuals widened.** A scan stacks every residual the backward needs with a
  dynamic-update-slice. XLA:CPU has no 16-bit float dynamic-update-slice: it widens the stacked
  buffer to float32, storing each bf16 residual at twice its size and converting it in full passes
  between the loops (rdt-170m, batch 2, no remat: 2 x 250 MB of saved image K/V and ~1 s of
  conversions per step). Stacked as uint16 the same values are written and sliced in place.
* **Weight gradients stacked in float32.** With float32 master weights and bf16 compute, a layer
  uses each weight through one cast to bf16; its gradient is the cast's transpose, a bf16 value
  widened to float32, and the scan stacks those float32 values: at rdt-1b a 4.9 GB buffer, zero-
  filled, written and read again by the optimiser. Here the backward stacks the bf16 gradient (the
  same values, 2.45 GB) and widens it only when the optimiser reads it.

Values and gradients are the same numbers as plain autodiff gives (tests), except the summation
order of a loop-invariant argument's gradient (per layer its contributions are summed first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from rdt_jax.model.attention import as_bits, from_bits


def compute_dtype_casts(fn: Callable, carry: Any, x: Any, consts: Any) -> list[Any]:
    """For each leaf of ``x`` (one layer's slice), the 16-bit float dtype ``fn(carry, x, consts)``
    casts it to when that one cast is its only use, else None.

    Such a leaf can be cast before ``fn`` runs and differentiated as the cast: its gradient is the
    same number (the transpose of a cast only widens). A leaf used in any other way (a float32
    norm weight, an input cast twice, whose two gradients would be summed in float32) is left alone.
    """
    closed = jax.make_jaxpr(fn)(carry, x, consts)
    jaxpr = closed.jaxpr
    n_carry, n_x = len(jax.tree.leaves(carry)), len(jax.tree.leaves(x))
    x_vars = jaxpr.invars[n_carry:n_carry + n_x]
    uses: dict[Any, list] = {v: [] for v in x_vars}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, jcore.Var) and v in uses:
                uses[v].append(eqn)
    returned = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    casts = []
    for v in x_vars:
        eqns = uses[v]
        new = eqns[0].params.get("new_dtype") if len(eqns) == 1 else None
        ok = (v not in returned and new is not None and eqns[0].primitive.name == "convert_element_type"
              and jnp.issubdtype(new, jnp.floating) and jnp.dtype(new).itemsize == 2
              and jnp.issubdtype(v.aval.dtype, jnp.floating) and jnp.dtype(v.aval.dtype).itemsize > 2)
        casts.append(jnp.dtype(new) if ok else None)
    return casts


def sum_of_squares(tree: Any) -> jax.Array:
    """The sum of squares of a tree's floating-point leaves, in float32."""
    floats = [a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    return sum((jnp.sum(jnp.square(a.astype(jnp.float32))) for a in floats), jnp.zeros((), jnp.float32))


@dataclasses.dataclass
class _Layout:
    """Where each leaf of a layer's VJP closure comes from (found while the forward is traced): the
    layer's (cast) weights ``("x", i)``, the loop-invariant arguments ``("c", i)``, or the stacked
    residuals ``("s", i, dtype)`` (static)."""

    treedef: Any = None
    slots: list = dataclasses.field(default_factory=list)


def scan_layers(fn: Callable, carry: Any, xs: Any, consts: Any, *, policy: Callable | None = None,
                grad_sq: jax.Array | None = None) -> tuple[Any, Any]:
    """``lax.scan(lambda c, x: fn(c, x, consts), carry, xs)``, differentiable in ``carry``, ``xs`` and
    ``consts``.

    ``fn(carry, x, consts) -> (carry, y)`` runs one layer (``x``: its slice of the stacked ``xs``);
    ``policy`` is a ``jax.checkpoint`` policy for it (None: save every residual). Residuals that are
    the layer's own weights or the loop-invariant ``consts`` are not stacked: the backward slices and
    casts the weights again, and reads ``consts`` as they are.

    ``grad_sq`` (a float32 scalar the result does not depend on) is a side channel out of the
    backward pass, not a derivative: its cotangent is the sum of squares of the gradient of ``xs``,
    summed layer by layer while each layer's gradient is at hand. Global-norm clipping needs that sum
    before the update; computed afterwards from the gradient, XLA:CPU writes the whole gradient out
    in float32 first (its reductions read a materialised input), which is what keeping it in bf16
    saves. Valid for one backward pass per value of ``grad_sq`` (accumulating over micro-batches
    would add the squares of the parts, not square their sum).
    """
    if grad_sq is not None and (jnp.shape(grad_sq) != () or jnp.result_type(grad_sq) != jnp.float32):
        raise ValueError(f"grad_sq must be a float32 scalar, got {jnp.result_type(grad_sq)}{list(jnp.shape(grad_sq))}")
    x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    casts = compute_dtype_casts(fn, carry, x0, consts)
    x_def = jax.tree.structure(xs)
    layer = fn if policy is None else jax.checkpoint(fn, policy=policy)

    def cast(x):
        leaves = [a if d is None else a.astype(d) for a, d in zip(jax.tree.leaves(x), casts, strict=True)]
        return jax.tree.unflatten(x_def, leaves)

    layout = _Layout()
    want_sq = grad_sq is not None

    @jax.custom_vjp
    def run(carry, xs, consts, probe):
        del probe
        return jax.lax.scan(lambda c, x: layer(c, cast(x), consts), carry, xs)

    def fwd(carry, xs, consts, probe):
        del probe

        def body(loop, x):
            # The constants are carried unchanged, so that here they are the body's own arguments: closed
            # over, they would reach the VJP as new (lifted) values, and be stacked as residuals.
            c, consts = loop
            xc = cast(x)
            (c, y), vjp_fn = jax.vjp(layer, c, xc, consts)
            leaves, layout.treedef = jax.tree.flatten(vjp_fn)
            # Identified by identity: a weight or constant the backward needs is the very array passed in.
            known = {id(a): ("x", i) for i, a in enumerate(jax.tree.leaves(xc))}
            known.update({id(a): ("c", i) for i, a in enumerate(jax.tree.leaves(consts))})
            layout.slots, saved = [], []
            for a in leaves:
                if id(a) in known:
                    layout.slots.append(known[id(a)])
                else:
                    layout.slots.append(("s", len(saved), a.dtype))
                    saved.append(as_bits(a))
            return (c, consts), (y, saved)

        (carry, _), (ys, saved) = jax.lax.scan(body, (carry, consts), xs)
        return (carry, ys), (saved, xs, consts)

    def bwd(res, ct):
        saved, xs, consts = res
        ct_carry, ct_ys = ct
        c_leaves = jax.tree.leaves(consts)
        differentiable = [jnp.issubdtype(a.dtype, jnp.inexact) for a in c_leaves]
        acc0 = [jnp.zeros_like(a) if d else None for a, d in zip(c_leaves, differentiable, strict=True)]

        def body(loop, inp):
            ct_c, acc, sq = loop
            x, s, ct_y = inp
            xc_leaves = jax.tree.leaves(cast(x))
            leaves = []
            for kind, i, *dtype in layout.slots:
                if kind == "x":
                    leaves.append(xc_leaves[i])
                elif kind == "c":
                    leaves.append(c_leaves[i])
                else:
                    leaves.append(from_bits(s[i], dtype[0]))
            vjp_fn = jax.tree.unflatten(layout.treedef, leaves)
            d_c, d_x, d_consts = vjp_fn((ct_c, ct_y))
            acc = [None if a is None else a + d for a, d in zip(acc, jax.tree.leaves(d_consts), strict=True)]
            if want_sq:
                sq = sq + sum_of_squares(d_x)
            return (d_c, acc, sq), jax.tree.map(as_bits, d_x)

        init = (ct_carry, acc0, jnp.zeros((), jnp.float32))
        (d_carry, acc, sq), d_bits = jax.lax.scan(body, init, (xs, saved, ct_ys), reverse=True)
        # Widened to the weights' dtype here; XLA fuses the conversion into the optimiser's reads, so the
        # float32 gradient is never stored (as long as no reduction reads it whole: hence grad_sq).
        d_leaves = [from_bits(b, a.dtype if d is None else d).astype(a.dtype)
                    for b, a, d in zip(jax.tree.leaves(d_bits), jax.tree.leaves(xs), casts, strict=True)]
        d_xs = jax.tree.unflatten(x_def, d_leaves)
        return d_carry, d_xs, jax.tree.unflatten(jax.tree.structure(consts), acc), sq

    run.defvjp(fwd, bwd)
    return run(carry, xs, consts, jnp.zeros((), jnp.float32) if grad_sq is None else grad_sq)

