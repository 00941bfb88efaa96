"""Rotation conversions into the 6-D representation of the unified vector (DATA.md §1).

Conventions follow the official preprocess code (tensorflow_graphics):
* Euler angles are (roll, pitch, yaw) about the fixed x, y, z axes, i.e.
  ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (scipy's ``Rotation.from_euler("xyz")``);
* quaternions are ``(x, y, z, w)`` and L2-normalised before use;
* 6-D = the first two *columns* of R flattened column-wise ``[R00, R10, R20, R01, R11, R21]``
  (Zhou et al. 2019); back to a matrix by Gram-Schmidt.
All functions take arrays with arbitrary leading batch axes.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-8  # same floor as the official normalize_vector


def _float(x: np.typing.ArrayLike) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _check_last(x: np.ndarray, n: int, what: str) -> None:
    if x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"{what}: expected shape (..., {n}), got {x.shape}")


def euler_to_matrix(euler: np.typing.ArrayLike) -> np.ndarray:
    """(..., 3) roll, pitch, yaw (radians, extrinsic xyz) → (..., 3, 3)."""
    e = _float(euler)
    _check_last(e, 3, "euler_to_matrix")
    sx, sy, sz = np.sin(e[..., 0]), np.sin(e[..., 1]), np.sin(e[..., 2])
    cx, cy, cz = np.cos(e[..., 0]), np.cos(e[..., 1]), np.cos(e[..., 2])
    rows = (
        (cy * cz, sx * sy * cz - cx * sz, cx * sy * cz + sx * sz),
        (cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - sx * cz),
        (-sy, sx * cy, cx * cy),
    )
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def quaternion_to_matrix(quat: np.typing.ArrayLike) -> np.ndarray:
    """(..., 4) quaternion (x, y, z, w), normalised here → (..., 3, 3)."""
    q = _float(quat)
    _check_last(q, 4, "quaternion_to_matrix")
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), _EPS)
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
        (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
        (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)),
    )
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_6d(matrix: np.typing.ArrayLike) -> np.ndarray:
    """(..., 3, 3) → (..., 6): first two columns, column-major."""
    m = _float(matrix)
    if m.ndim < 2 or m.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_6d: expected shape (..., 3, 3), got {m.shape}")
    return np.concatenate([m[..., :, 0], m[..., :, 1]], axis=-1)


def rotation_6d_to_matrix(d6: np.typing.ArrayLike) -> np.ndarray:
    """(..., 6) → (..., 3, 3) by Gram-Schmidt (columns x, y, z)."""
    d = _float(d6)
    _check_last(d, 6, "rotation_6d_to_matrix")

    def normalise(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), _EPS)

    x = normalise(d[..., 0:3])
    z = normalise(np.cross(x, d[..., 3:6]))
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=-1)


def euler_to_6d(euler: np.typing.ArrayLike) -> np.ndarray:
    """(..., 3) roll, pitch, yaw → (..., 6)."""
    return matrix_to_6d(euler_to_matrix(euler))


def quaternion_to_6d(quat: np.typing.ArrayLike) -> np.ndarray:
    """(..., 4) quaternion (x, y, z, w) → (..., 6)."""
    return matrix_to_6d(quaternion_to_matrix(quat))
