"""The unified 128-slot state/action vector of RDT (DATA.md §1) as one declarative table.

State (proprioception) and actions share this layout. Every robot writes its quantities
into named slots and marks them in a 0/1 mask; unused slots stay 0. Names without a
``right_``/``left_`` prefix are aliases of the right-arm names (single-arm robots use the
right-arm slots).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

STATE_DIM = 128


@dataclasses.dataclass(frozen=True)
class SlotRange:
    """`size` consecutive slots from `start`, named by formatting `name` with each suffix.

    `name`/`aliases` are templates with one ``{}`` placeholder (filled with the suffix) or
    plain names when `size == 1`.
    """

    start: int
    size: int
    name: str
    aliases: tuple[str, ...] = ()
    suffixes: tuple[str, ...] | None = None  # default: "0", "1", ...
    meaning: str = ""

    def slot_names(self, template: str) -> list[tuple[str, int]]:
        if self.size == 1 and "{}" not in template:
            return [(template, self.start)]
        sfx = self.suffixes if self.suffixes is not None else tuple(str(i) for i in range(self.size))
        if len(sfx) != self.size:
            raise ValueError(f"range {self.name}: {len(sfx)} suffixes for {self.size} slots")
        return [(template.format(s), self.start + i) for i, s in enumerate(sfx)]


_XYZ = ("x", "y", "z")
_RPY = ("roll", "pitch", "yaw")

# THE table. Rows whose range repeats an earlier one (e.g. `right_gripper_open` at slot 10)
# only add names; the canonical name of a slot is the name of the first row covering it.
TABLE: tuple[SlotRange, ...] = (
    SlotRange(0, 10, "right_arm_joint_{}_pos", ("arm_joint_{}_pos",), meaning="right arm joint positions"),
    SlotRange(10, 5, "right_gripper_joint_{}_pos", ("gripper_joint_{}_pos",),
              meaning="right gripper joint positions"),
    SlotRange(10, 1, "right_gripper_open", ("gripper_open",), meaning="right gripper opening in [0, 1]"),
    SlotRange(15, 10, "right_arm_joint_{}_vel", ("arm_joint_{}_vel",), meaning="right arm joint velocities"),
    SlotRange(25, 5, "right_gripper_joint_{}_vel", ("gripper_joint_{}_vel",),
              meaning="right gripper joint velocities"),
    SlotRange(25, 1, "right_gripper_open_vel", ("gripper_open_vel",),
              meaning="right gripper opening velocity"),
    SlotRange(30, 3, "right_eef_pos_{}", ("eef_pos_{}",), _XYZ, "right end-effector position"),
    SlotRange(33, 6, "right_eef_angle_{}", ("eef_angle_{}",), meaning="right end-effector 6-D rotation"),
    SlotRange(39, 3, "right_eef_vel_{}", ("eef_vel_{}",), _XYZ, "right end-effector linear velocity"),
    SlotRange(42, 3, "right_eef_angular_vel_{}", ("eef_angular_vel_{}",), _RPY,
              "right end-effector angular velocity"),
    SlotRange(50, 10, "left_arm_joint_{}_pos", meaning="left arm joint positions"),
    SlotRange(60, 5, "left_gripper_joint_{}_pos", meaning="left gripper joint positions"),
    SlotRange(60, 1, "left_gripper_open", meaning="left gripper opening in [0, 1]"),
    SlotRange(65, 10, "left_arm_joint_{}_vel", meaning="left arm joint velocities"),
    SlotRange(75, 5, "left_gripper_joint_{}_vel", meaning="left gripper joint velocities"),
    SlotRange(75, 1, "left_gripper_open_vel", meaning="left gripper opening velocity"),
    SlotRange(80, 3, "left_eef_pos_{}", (), _XYZ, "left end-effector position"),
    SlotRange(83, 6, "left_eef_angle_{}", meaning="left end-effector 6-D rotation"),
    SlotRange(89, 3, "left_eef_vel_{}", (), _XYZ, "left end-effector linear velocity"),
    SlotRange(92, 3, "left_eef_angular_vel_{}", (), _RPY, "left end-effector angular velocity"),
    SlotRange(100, 2, "base_vel_{}", (), ("x", "y"), "base linear velocity"),
    SlotRange(102, 1, "base_angular_vel", meaning="base angular velocity"),
)
# Slots 45–49, 95–99 and 103–127 are reserved (never named).


def _build() -> tuple[dict[str, int], list[str | None]]:
    name_to_index: dict[str, int] = {}
    canonical: list[str | None] = [None] * STATE_DIM
    for row in TABLE:
        for template in (row.name, *row.aliases):
            for name, idx in row.slot_names(template):
                if not 0 <= idx < STATE_DIM:
                    raise ValueError(f"slot {idx} of {name} outside [0, {STATE_DIM})")
                if name_to_index.setdefault(name, idx) != idx:
                    raise ValueError(f"name {name} mapped to two slots")
                if template == row.name and canonical[idx] is None:
                    canonical[idx] = name
    return name_to_index, canonical


_NAME_TO_INDEX, _CANONICAL = _build()
NAME_TO_INDEX: Mapping[str, int] = MappingProxyType(_NAME_TO_INDEX)
# Canonical name per slot ("reserved_<i>" for unnamed slots).
SLOT_NAMES: tuple[str, ...] = tuple(n if n is not None else f"reserved_{i}" for i, n in enumerate(_CANONICAL))


def index_of(name: str) -> int:
    """Slot index of a canonical name or alias; KeyError with close matches otherwise."""
    try:
        return NAME_TO_INDEX[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(NAME_TO_INDEX), n=3)
        raise KeyError(f"unknown unified action-space name {name!r}; close matches: {close}") from None


def indices_of(names: Iterable[str], *, allow_duplicates: bool = False) -> np.ndarray:
    """Slot indices of `names` (int64). Two names for the same slot are an error by default."""
    idx = np.asarray([index_of(n) for n in names], dtype=np.int64)
    if not allow_duplicates and len(set(idx.tolist())) != len(idx):
        names = list(names)
        dup = sorted({SLOT_NAMES[i] for i in idx.tolist() if idx.tolist().count(i) > 1})
        raise ValueError(f"names {names} write the same slot twice: {dup}")
    return idx


def mask_of(names: Iterable[str], dtype: np.typing.DTypeLike = np.float64) -> np.ndarray:
    """(128,) 0/1 mask with ones at the slots of `names`."""
    mask = np.zeros(STATE_DIM, dtype=dtype)
    mask[indices_of(names)] = 1
    return mask


def scatter(values: np.typing.ArrayLike, names: Sequence[str], *, dtype: np.typing.DTypeLike = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Scatter `values` (..., k) whose last axis is labelled by `names` (k) into (..., 128).

    Returns `(vec, mask)` with `mask` (128,) 0/1 of the vector's dtype. This is the official
    `fill_in_state` with a format list.
    """
    values = np.asarray(values)
    if values.ndim == 0 or values.shape[-1] != len(names):
        raise ValueError(f"values of shape {values.shape} do not match {len(names)} names {list(names)}")
    dtype = np.result_type(values.dtype, np.float32) if dtype is None else np.dtype(dtype)
    idx = indices_of(names)
    vec = np.zeros((*values.shape[:-1], STATE_DIM), dtype=dtype)
    vec[..., idx] = values
    mask = np.zeros(STATE_DIM, dtype=dtype)
    mask[idx] = 1
    return vec, mask


def fill_unified(fields: Mapping[str, np.typing.ArrayLike], *, dtype: np.typing.DTypeLike = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Build `(vec (..., 128), mask (128,))` from `{name: value}`; each value has the same shape (...)."""
    if not fields:
        raise ValueError("fill_unified needs at least one field")
    names = list(fields)
    arrays = [np.asarray(fields[n]) for n in names]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        got = {n: a.shape for n, a in zip(names, arrays, strict=True)}
        raise ValueError(f"fields have different shapes: {got}")
    return scatter(np.stack(arrays, axis=-1), names, dtype=dtype)


def extract(vec: np.typing.ArrayLike, names: Sequence[str]) -> np.ndarray:
    """Inverse of `scatter`: the (..., k) values of `names` from a (..., 128) vector."""
    vec = np.asarray(vec)
    if vec.ndim == 0 or vec.shape[-1] != STATE_DIM:
        raise ValueError(f"expected a (..., {STATE_DIM}) vector, got shape {vec.shape}")
    return vec[..., indices_of(names, allow_duplicates=True)]
