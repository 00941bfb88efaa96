"""Checks of concrete inputs that jit cannot make (inside a trace the values are unknown)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def check_index_range(name: str, values: Any, size: int) -> Any:
    """Raise if concrete integer ``values`` leave [0, ``size``): a traced gather would clamp them or fill
    NaN where PyTorch raises. Returns them as a NumPy array; traced values pass unchecked and unchanged."""
    if isinstance(values, jax.core.Tracer):
        return values
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= size):
        raise ValueError(f"{name} must lie in [0, {size}); got values in [{values.min()}, {values.max()}]")
    return values


def check_key_mask(name: str, mask: Any, *, right_padded: bool = False) -> None:
    """Raise if a concrete (B, L) boolean key mask has a row with no True (no token to attend to: the
    official code gives NaN there, our kernels an average over padding) or, with ``right_padded``, a row
    that is not valid tokens then padding (what the cuDNN kernel's sequence lengths can express). Traced
    masks pass unchecked."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    mask = np.asarray(mask, bool)
    empty = np.flatnonzero(~mask.any(axis=-1))
    if empty.size:
        raise ValueError(f"{name} rows {empty.tolist()} have no valid token (every entry False)")
    if right_padded:
        prefix = np.arange(mask.shape[-1]) < mask.sum(axis=-1, keepdims=True)
        bad = np.flatnonzero((mask != prefix).any(axis=-1))
        if bad.size:
            raise ValueError(f"{name} rows {bad.tolist()} are not right-padded (valid tokens first), which "
                             "attention_impl='cudnn' needs; use attention_impl='xla' for such masks")
