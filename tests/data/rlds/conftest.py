"""Tiny RLDS datasets with the real feature names / shapes / dtypes of each registered dataset.

Written once per session by a tfds builder as TFRecord (the published layout), converted to
ArrayRecord with scripts/convert_rlds.py's functions, shared by all tests. Feature specs
follow the official preprocess scripts and the published OXE tfds specs; only the features
the mapping (or the episode filter / cameras / instruction) reads are included, plus the
ubiquitous RLDS step flags. Images are 4×5 PNG (lossless, so pixels can be compared).

Episodes per dataset: ep 0 has 40 steps (used), ep 1 has 5 steps (< 32: dropped); datasets
with an episode filter get an ep 2 of 36 steps that the filter rejects.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

IMG_HW = (4, 5)
LONG, SHORT, FILTERED = 40, 5, 36
TEXT = "pick_up the red-block 50 times"  # exercises the official cleaning
TEXT_CLEAN = "Pick up the red block   times."

# Raw step features: path → (shape, dtype) | "text" | "img" | "codepoints".
F4, F8, BOOL, I4 = "float32", "float64", "bool", "int32"
V = lambda n, dt=F4: ((n,), dt)
S = lambda dt=F4: ((), dt)
OBS_NL = {"observation/natural_language_instruction": "text"}
LANG = {"language_instruction": "text"}
RAW: dict[str, dict[str, object]] = {
    "fractal20220817_data": {
        "observation/base_pose_tool_reached": V(7),
        "observation/gripper_closed": V(1),
        "observation/image": "img",
        "action/base_displacement_vector": V(2),
        "action/base_displacement_vertical_rotation": V(1),
        "action/world_vector": V(3),
        "action/terminate_episode": V(3, I4),
        **OBS_NL,
    },
    "jaco_play": {
        "observation/joint_pos": V(8),
        "observation/end_effector_cartesian_pos": V(7),
        "observation/end_effector_cartesian_velocity": V(6),
        "observation/image": "img",
        "observation/image_wrist": "img",
        "action/world_vector": V(3),
        **OBS_NL,
    },
    "taco_play": {
        "observation/robot_obs": V(15),
        "observation/rgb_static": "img",
        "observation/rgb_gripper": "img",
        "action/actions": V(7),
        **OBS_NL,
    },
    "berkeley_cable_routing": {
        "observation/robot_state": V(7),
        "observation/image": "img",
        "observation/wrist45_image": "img",
        "observation/wrist225_image": "img",
        "action/world_vector": V(3),
        **OBS_NL,
    },
    "viola": {
        "observation/joint_states": V(7),
        "observation/gripper_states": V(1),
        "observation/ee_states": V(16),
        "observation/agentview_rgb": "img",
        "observation/eye_in_hand_rgb": "img",
        "action/gripper_closedness_action": S(),
        **OBS_NL,
    },
    "berkeley_autolab_ur5": {
        "observation/robot_state": V(15),
        "observation/image": "img",
        "observation/hand_image": "img",
        "action/world_vector": V(3),
        **OBS_NL,
    },
    "toto": {"observation/state": V(7), "observation/image": "img", "action/open_gripper": S(BOOL), **OBS_NL},
    "nyu_door_opening_surprising_effectiveness": {
        "observation/image": "img",
        "action/world_vector": V(3),
        "action/rotation_delta": V(3),
        "action/gripper_closedness_action": V(1),
        **OBS_NL,
    },
    "columbia_cairlab_pusht_real": {
        "observation/robot_state": V(2),
        "observation/image": "img",
        "observation/wrist_image": "img",
        **OBS_NL,
    },
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds": {
        "observation/joint_pos": V(7),
        "observation/joint_vel": V(7),
        "observation/state": V(8),
        "observation/ee_position": V(3),
        "observation/ee_orientation": V(4),
        "observation/ee_vel": V(3),
        "observation/ee_orientation_vel": V(3),
        "observation/image": "img",
        "action": V(4),
        **LANG,
    },
    "austin_buds_dataset_converted_externally_to_rlds": {
        "observation/state": V(24),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(7),
        **LANG,
    },
    "kuka": {
        "observation/clip_function_input/base_pose_tool_reached": V(7),
        "observation/gripper_closed": V(1),
        "observation/image": "img",
        "action/base_displacement_vector": V(2),
        "action/base_displacement_vertical_rotation": V(1),
        **OBS_NL,
    },
    "utokyo_xarm_bimanual_converted_externally_to_rlds": {
        "observation/action_l": V(7),
        "observation/action_r": V(7),
        "observation/image": "img",
        "action": V(14),
        **LANG,
    },
    "stanford_hydra_dataset_converted_externally_to_rlds": {
        "observation/state": V(27),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(7),
        **LANG,
    },
    "maniskill_dataset_converted_externally_to_rlds": {
        "observation/state": V(18),
        "observation/base_pose": V(7),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(7),
        **LANG,
    },
    "ucsd_kitchen_dataset_converted_externally_to_rlds": {
        "observation/state": V(21),
        "observation/image": "img",
        "action": V(8),
        **LANG,
    },
    "ucsd_pick_and_place_dataset_converted_externally_to_rlds": {
        "observation/state": V(7),
        "observation/image": "img",
        "action": V(4),
        **LANG,
    },
    "austin_sailor_dataset_converted_externally_to_rlds": {
        "observation/state": V(8),
        "observation/state_joint": V(7),
        "observation/state_ee": V(16),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(7),
        **LANG,
    },
    "austin_sirius_dataset_converted_externally_to_rlds": {
        "observation/state": V(8),
        "observation/state_ee": V(16),
        "observation/state_joint": V(7),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(7),
        **LANG,
    },
    "bc_z": {
        "observation/present/xyz": V(3),
        "observation/present/axis_angle": V(3),
        "observation/present/sensed_close": V(1),
        "observation/episode_success": S(),
        "observation/image": "img",
        "action/future/xyz_residual": V(30),
        **OBS_NL,
    },
    "utokyo_pr2_opening_fridge_converted_externally_to_rlds": {
        "observation/state": V(7),
        "observation/image": "img",
        "action": V(8),
        **LANG,
    },
    "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds": {
        "observation/state": V(7),
        "observation/image": "img",
        "action": V(8),
        **LANG,
    },
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds": {
        "observation/joint_state": V(14),
        "observation/end_effector_pose": V(6),
        "observation/image": "img",
        "observation/hand_image": "img",
        "action": V(7),
        **LANG,
    },
    "berkeley_mvp_converted_externally_to_rlds": {
        "observation/joint_pos": V(7),
        "observation/pose": V(7),
        "observation/gripper": S(BOOL),
        "observation/hand_image": "img",
        "action": V(8),
        **LANG,
    },
    "berkeley_rpt_converted_externally_to_rlds": {
        "observation/joint_pos": V(7),
        "observation/gripper": S(BOOL),
        "observation/hand_image": "img",
        "action": V(8),
        **LANG,
    },
    "kaist_nonprehensile_converted_externally_to_rlds": {
        "observation/state": V(21),
        "observation/image": "img",
        "action": V(20),
        **LANG,
    },
    "tokyo_u_lsmo_converted_externally_to_rlds": {
        "observation/state": V(13),
        "observation/image": "img",
        "action": V(7),
        **LANG,
    },
    "dlr_sara_grid_clamp_converted_externally_to_rlds": {
        "observation/state": V(12),
        "observation/image": "img",
        "action": V(7),
        **LANG,
    },
    "stanford_robocook_converted_externally_to_rlds": {
        "observation/state": V(7),
        "observation/image_1": "img",
        "observation/image_2": "img",
        "action": V(7),
        **LANG,
    },
    "imperialcollege_sawyer_wrist_cam": {
        "observation/state": V(1),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(8),
        **LANG,
    },
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": {
        "observation/state": V(20),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(8),
        **LANG,
    },
    "utaustin_mutex": {
        "observation/state": V(24),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(7),
        **LANG,
    },
    "berkeley_fanuc_manipulation": {
        "observation/state": V(13),
        "observation/end_effector_state": V(7),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(6),
        **LANG,
    },
    "cmu_play_fusion": {"observation/state": V(8), "observation/image": "img", "action": V(9), **LANG},
    "language_table": {
        "observation/effector_translation": V(2),
        "observation/instruction": "codepoints",
        "observation/rgb": "img",
        "action": V(2),
    },
    "furniture_bench_dataset_converted_externally_to_rlds": {
        "observation/state": V(35),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(8),
        **LANG,
    },
    "droid": {
        "observation/cartesian_position": V(6, F8),
        "observation/joint_position": V(7, F8),
        "observation/gripper_position": V(1, F8),
        "observation/exterior_image_1_left": "img",
        "observation/exterior_image_2_left": "img",
        "observation/wrist_image_left": "img",
        "action": V(7, F8),
        **LANG,
    },
    "fmb": {
        "observation/joint_pos": V(7),
        "observation/joint_vel": V(7),
        "observation/eef_pose": V(7),
        "observation/eef_vel": V(6),
        "observation/state_gripper_pose": S(),
        "observation/image_side_1": "img",
        "observation/image_wrist_1": "img",
        "action": V(7),
        **LANG,
    },
    "dobbe": {
        "observation/xyz": V(3),
        "observation/rot": V(3),
        "observation/gripper": V(1),
        "observation/wrist_image": "img",
        "action": V(7),
        **LANG,
    },
    "qut_dexterous_manpulation": {
        "observation/state": V(23),
        "observation/image": "img",
        "observation/wrist_image": "img",
        "action": V(8),
        **LANG,
    },
}
# Episode-level features (path → (shape, dtype)) and the values of the used / filtered episode.
EPISODE_FEATURES = {
    "kuka": ({"success": S(BOOL)}, {"success": True}, {"success": False}),
    "ucsd_pick_and_place_dataset_converted_externally_to_rlds": (
        {"episode_metadata/success": S(BOOL)},
        {"episode_metadata/success": True},
        {"episode_metadata/success": False},
    ),
}
# Per-step overrides making ep 0 pass / ep 2 fail a first-step filter.
STEP_FILTER = {
    "bc_z": ("observation/episode_success", 1.0, 0.0),
    "utokyo_xarm_bimanual_converted_externally_to_rlds": (
        "language_instruction",
        "Unfold a wrinkled towel.",
        "Fold the towel.",
    ),
}
FILTERED_DATASETS = set(EPISODE_FEATURES) | set(STEP_FILTER)
TEXT_OVERRIDE = {
    "fmb": ("insert_object", "Insert brick and insert it into the slot of the matching shape."),
    # its filter keeps only this instruction (STEP_FILTER overwrites the text)
    "utokyo_xarm_bimanual_converted_externally_to_rlds": ("Unfold a wrinkled towel.", "Unfold a wrinkled towel."),
}


def _nest(flat: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        d = out
        for p in parents:
            d = d.setdefault(p, {})  # type: ignore[assignment]
        d[leaf] = v
    return out


def _feature(kind: object):
    import tensorflow_datasets as tfds

    f = tfds.features
    if kind == "img":
        return f.Image(shape=(*IMG_HW, 3), dtype=np.uint8, encoding_format="png")
    if kind == "text":
        return f.Text()
    if kind == "codepoints":
        return f.Tensor(shape=(512,), dtype=np.int32)
    shape, dtype = kind  # type: ignore[misc]
    return f.Scalar(dtype=np.dtype(dtype)) if shape == () else f.Tensor(shape=shape, dtype=np.dtype(dtype))


def _value(kind: object, rng: np.random.Generator, text: str):
    if kind == "img":
        return rng.integers(0, 256, (*IMG_HW, 3), dtype=np.uint8)
    if kind == "text":
        return text
    if kind == "codepoints":
        cp = np.zeros(512, np.int32)
        cp[: len(text)] = [ord(c) for c in text]
        return cp
    shape, dtype = kind  # type: ignore[misc]
    if dtype == BOOL:
        return np.bool_(rng.random() < 0.5)
    x = rng.uniform(-1.0, 1.0, shape).astype(dtype)
    return x


@dataclasses.dataclass
class TinyDataset:
    name: str
    tfrecord_dir: pathlib.Path
    dir: pathlib.Path  # converted ArrayRecord dir
    episodes: list[dict[str, np.ndarray]]  # per episode: flat path → (T, ...) raw values
    text: str  # instruction text of ep 0
    expected_instruction: str


def _build_one(name: str, root: pathlib.Path, seed: int) -> TinyDataset:
    import tensorflow_datasets as tfds

    from rdt_jax.data.rlds.convert import convert_to_array_record, write_step_index
    from rdt_jax.data.rlds.registry import REGISTRY

    rng = np.random.default_rng(seed)
    raw = dict(RAW[name])
    raw.update({"is_first": S(BOOL), "is_last": S(BOOL), "is_terminal": S(BOOL), "reward": S(), "discount": S()})
    ep_feats, ep_ok, ep_bad = EPISODE_FEATURES.get(name, ({}, {}, {}))
    features = tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(_nest({k: _feature(v) for k, v in raw.items()})),
            **_nest({k: _feature(v) for k, v in ep_feats.items()}),
        }
    )
    text, expected = TEXT_OVERRIDE.get(name, (TEXT, TEXT_CLEAN))
    lengths = [LONG, SHORT] + ([FILTERED] if name in FILTERED_DATASETS else [])
    examples, flat_eps = [], []
    for e, t_len in enumerate(lengths):
        steps, flat = [], {k: [] for k in raw}
        for t in range(t_len):
            step = {k: _value(v, rng, text) for k, v in raw.items()}
            step.update(is_first=np.bool_(t == 0), is_last=np.bool_(t == t_len - 1))
            if name in STEP_FILTER:
                key, good, bad = STEP_FILTER[name]
                step[key] = (
                    np.float32(good if e != 2 else bad) if isinstance(good, float) else (good if e != 2 else bad)
                )
            for k in raw:
                flat[k].append(step[k])
            steps.append(_nest(step))
        meta = ep_bad if e == 2 else ep_ok
        examples.append((e, {"steps": steps, **_nest(meta)}))
        flat_eps.append(
            {k: np.asarray(v) if raw[k] != "text" else np.asarray(v, dtype=object) for k, v in flat.items()}
        )
    version = REGISTRY[name].version or "1.0.0"
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version=version,
        features=features,
        split_datasets={"train": examples},
        data_dir=str(root / "tfrecord"),
        file_format="tfrecord",
        disable_shuffling=True,
    )
    src = pathlib.Path(builder.data_dir)
    dst = root / "array_record" / name / version
    convert_to_array_record(src, dst)
    write_step_index(dst, name)
    return TinyDataset(name, src, dst, flat_eps, text, expected)


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyDataset]:
    pytest.importorskip("tensorflow", reason="writing TFRecord RLDS test data needs the rlds extra")
    root = tmp_path_factory.mktemp("rlds")
    return {name: _build_one(name, root, seed) for seed, name in enumerate(RAW)}
