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
