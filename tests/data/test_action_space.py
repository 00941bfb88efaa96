"""The 128-slot table against DATA.md §1, written out independently here."""

import numpy as np
import pytest

from rdt_jax.data import action_space as asp


def _expected_mapping() -> dict[str, int]:
    m: dict[str, int] = {}
    for side, off in (("right_", 0), ("left_", 50)):
        prefixes = [side] + ([""] if side == "right_" else [])
        for p in prefixes:
            for i in range(10):
                m[f"{p}arm_joint_{i}_pos"] = off + i
                m[f"{p}arm_joint_{i}_vel"] = off + 15 + i
            for i in range(5):
                m[f"{p}gripper_joint_{i}_pos"] = off + 10 + i
                m[f"{p}gripper_joint_{i}_vel"] = off + 25 + i
            m[f"{p}gripper_open"] = off + 10
            m[f"{p}gripper_open_vel"] = off + 25
            for j, a in enumerate("xyz"):
                m[f"{p}eef_pos_{a}"] = off + 30 + j
                m[f"{p}eef_vel_{a}"] = off + 39 + j
            for i in range(6):
                m[f"{p}eef_angle_{i}"] = off + 33 + i
            for j, a in enumerate(("roll", "pitch", "yaw")):
                m[f"{p}eef_angular_vel_{a}"] = off + 42 + j
    m.update(base_vel_x=100, base_vel_y=101, base_angular_vel=102)
    return m


def test_table_matches_reference():
    assert dict(asp.NAME_TO_INDEX) == _expected_mapping()
    assert len(asp.SLOT_NAMES) == asp.STATE_DIM == 128
    reserved = [i for i, n in enumerate(asp.SLOT_NAMES) if n.startswith("reserved_")]
    assert reserved == [*range(45, 50), *range(95, 100), *range(103, 128)]
    assert asp.SLOT_NAMES[10] == "right_gripper_joint_0_pos"
    assert asp.SLOT_NAMES[60] == "left_gripper_joint_0_pos"
    assert asp.SLOT_NAMES[44] == "right_eef_angular_vel_yaw"


def test_scatter_extract_roundtrip():
    names = ["left_arm_joint_0_pos", "gripper_open", "eef_angle_5", "base_angular_vel"]
    vals = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    vec, mask = asp.scatter(vals, names)
    assert vec.shape == (2, 3, 128) and vec.dtype == np.float32
    assert np.flatnonzero(mask).tolist() == [10, 38, 50, 102]
    np.testing.assert_array_equal(vec[..., 50], vals[..., 0])
    np.testing.assert_array_equal(vec[..., 10], vals[..., 1])
    np.testing.assert_array_equal(vec[..., 38], vals[..., 2])
    np.testing.assert_array_equal(vec[..., 102], vals[..., 3])
    assert np.count_nonzero(vec) == vals.size
    np.testing.assert_array_equal(asp.extract(vec, names), vals)


def test_fill_unified_fields():
    vec, mask = asp.fill_unified({"eef_pos_x": np.array([1.0, 2.0]), "right_eef_pos_z": np.array([3.0, 4.0])})
    assert vec.shape == (2, 128) and vec.dtype == np.float64
    assert vec[1, 30] == 2.0 and vec[1, 32] == 4.0 and mask.sum() == 2


def test_errors():
    with pytest.raises(KeyError, match="eef_pos_w"):
        asp.index_of("eef_pos_w")
    with pytest.raises(ValueError, match="same slot"):
        asp.scatter(np.zeros(2), ["gripper_open", "right_gripper_joint_0_pos"])
    with pytest.raises(ValueError, match="shape"):
        asp.scatter(np.zeros(3), ["gripper_open", "eef_pos_x"])
    with pytest.raises(ValueError, match="different shapes"):
        asp.fill_unified({"eef_pos_x": np.zeros(2), "eef_pos_y": np.zeros(3)})
    with pytest.raises(ValueError, match="128"):
        asp.extract(np.zeros(14), ["eef_pos_x"])
