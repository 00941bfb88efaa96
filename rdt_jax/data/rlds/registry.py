"""Registry: every Open X-Embodiment (RLDS) pretraining dataset → unified 128-d vector.

One row per dataset, transcribing the facts of the official per-dataset preprocess scripts
(thu-ml/RoboticsDiffusionTransformer `data/preprocess_scripts/<name>.py`): which raw step
feature goes to which unified slots, with which rescaling / rotation conversion; where the
instruction comes from; which cameras feed the exterior / right-wrist / left-wrist slots
(`dataset_img_keys.json`); the control frequency (`dataset_control_freq.json`); the episode
filters of `data/vla_dataset.py`; the tfds version directory of `data/utils.dataset_to_path`.

Only the *state* mapping matters: actions are future states (DATA.md §5.3), so the scripts'
action conversions are not transcribed, except where the state itself is built from actions
(previous-step base velocity; datasets without proprioception).

The six pretraining datasets that the official pipeline reads from its own per-step
TFRecords instead of RLDS (`NON_RLDS_DATASETS`: aloha_mobile, aloha_static, roboset, rh20t,
calvin, bridgev2) are registered too (`_CUSTOM_SPECS`). Their step feature paths are those
of the RLDS-shaped copy that `rdt_jax.data.rlds.official_convert` writes (the structure the
official `_parse_function`s return); see `official_formats.py` for the on-disk formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from rdt_jax.data.rlds.spec import DatasetSpec, EpisodeFilter, Instruction, Part

# Length thresholds of the official config (configs/base.yaml, DATA.md §5.1).
EPSD_LEN_THRESH_LOW = 32  # drop episodes with fewer steps
EPSD_LEN_THRESH_HIGH = 2048  # longer episodes: 2048 random steps per visit

NON_RLDS_DATASETS = ("aloha_mobile", "aloha_static", "roboset", "rh20t", "calvin", "bridgev2")

J7 = "arm_joint_{0..6}_pos"
J6 = "arm_joint_{0..5}_pos"
V7 = "arm_joint_{0..6}_vel"
POS = "eef_pos_{x,y,z}"
ANG = "eef_angle_{0..5}"
EVEL = "eef_vel_{x,y,z}"
EANG = "eef_angular_vel_{roll,pitch,yaw}"

LANG = Instruction("language_instruction")  # top-level step feature (most *_converted_externally)
NL = Instruction("observation/natural_language_instruction")


def r(a: int, b: int, step: int = 1) -> tuple[int, ...]:
    return tuple(range(a, b, step))


def one_minus(key: str, names: str, take: tuple[int, ...] | None = None, lag: int = 0) -> Part:
    return Part(key, names, take, scale=-1.0, offset=1.0, lag=lag)


def pos_quat(key: str, start: int = 0, prefix: str = "") -> tuple[Part, Part]:
    """xyz at `start`, quaternion (x, y, z, w) right after it."""
    return (
        Part(key, prefix + POS, r(start, start + 3)),
        Part(key, prefix + ANG, r(start + 3, start + 7), op="quat_6d"),
    )


def pos_euler(
    key: str, pos: tuple[int, ...], euler: tuple[int, ...], pos_scale: float = 1.0, prefix: str = ""
) -> tuple[Part, Part]:
    """xyz at `pos` (times `pos_scale`), roll/pitch/yaw read at indices `euler` (in that order)."""
    return (Part(key, prefix + POS, pos, scale=pos_scale), Part(key, prefix + ANG, euler, op="euler_6d"))


def mat4(key: str, start: int = 0) -> tuple[Part, Part]:
    """A column-major flattened 4×4 end-effector pose at `start`."""
    return (Part(key, POS, r(start, start + 16), op="mat4_pos"), Part(key, ANG, r(start, start + 16), op="mat4_6d"))


def _ds(
    name: str,
    hz: float,
    cams: tuple[str | None, str | None, str | None],
    *parts: Part | tuple[Part, ...],
    instruction: Instruction = LANG,
    **kw: object,
) -> DatasetSpec:
    flat: list[Part] = []
    for p in parts:
        flat += list(p) if isinstance(p, tuple) else [p]
    return DatasetSpec(name=name, parts=tuple(flat), instruction=instruction, cameras=cams, ctrl_freq=hz, **kw)  # type: ignore[arg-type]


OBS = "observation/"
_SPECS: tuple[DatasetSpec, ...] = (
    _ds(
        "fractal20220817_data",
        3,
        ("image", None, None),
        pos_quat(OBS + "base_pose_tool_reached"),
        one_minus(OBS + "gripper_closed", "gripper_open"),
        # Previous step's base action × 3 Hz (m/s, rad/s).
        Part("action/base_displacement_vector", "base_vel_{x,y}", scale=3.0, lag=1),
        Part("action/base_displacement_vertical_rotation", "base_angular_vel", scale=3.0, lag=1),
        instruction=NL,
    ),
    _ds(
        "jaco_play",
        10,
        ("image", "image_wrist", None),
        Part(OBS + "joint_pos", J6 + ",gripper_joint_{0..1}_pos"),
        pos_quat(OBS + "end_effector_cartesian_pos"),
        Part(OBS + "end_effector_cartesian_velocity", EVEL, r(0, 3)),
        instruction=NL,
    ),
    _ds(
        "taco_play",
        15,
        ("rgb_static", "rgb_gripper", None),
        # robot_obs: eef xyz, eef euler, gripper width, 7 joints, gripper action
        Part(OBS + "robot_obs", J7, r(7, 14)),
        Part(OBS + "robot_obs", "gripper_open", (6,), scale=12.3843),
        pos_euler(OBS + "robot_obs", r(0, 3), r(3, 6)),
        instruction=NL,
    ),
    _ds(
        "berkeley_cable_routing",
        10,
        ("image", "wrist45_image", None),
        pos_quat(OBS + "robot_state"),
        instruction=Instruction(
            kind="constant", constant="Route cable through the tight-fitting clip mounted on the table."
        ),
    ),
    _ds(
        "viola",
        20,
        ("agentview_rgb", "eye_in_hand_rgb", None),
        Part(OBS + "joint_states", J7),
        Part(OBS + "gripper_states", "gripper_open", scale=12.905),
        mat4(OBS + "ee_states"),
        instruction=NL,
    ),
    _ds(
        "berkeley_autolab_ur5",
        5,
        ("image", "hand_image", None),
        # robot_state: 6 joints, xyz, quat, gripper_is_closed, action_blocked
        Part(OBS + "robot_state", J6, r(0, 6)),
        one_minus(OBS + "robot_state", "gripper_open", (13,)),
        pos_quat(OBS + "robot_state", 6),
        instruction=NL,
    ),
    _ds("toto", 30, ("image", None, None), Part(OBS + "state", J7), instruction=NL),
    _ds(
        "nyu_door_opening_surprising_effectiveness",
        3,
        ("image", None, None),
        # No proprioception: the state is the previous step's action (DATASET_NAMES_NO_STATE).
        Part("action/world_vector", EVEL, scale=3.0, lag=1),
        Part("action/rotation_delta", EANG, scale=3.0, lag=1),
        one_minus("action/gripper_closedness_action", "gripper_open", lag=1),
        instruction=Instruction(kind="constant", constant="Open the cabinet door."),
        version="",
    ),
    _ds(
        "columbia_cairlab_pusht_real",
        10,
        ("image", "wrist_image", None),
        Part(OBS + "robot_state", "eef_pos_{x,y}"),
        instruction=NL,
    ),
    _ds(
        "stanford_kuka_multimodal_dataset_converted_externally_to_rlds",
        20,
        ("image", None, None),
        Part(OBS + "joint_pos", J7),
        Part(OBS + "state", "gripper_open", (7,)),
        Part(OBS + "joint_vel", V7),
        Part(OBS + "ee_position", POS),
        Part(OBS + "ee_orientation", ANG, op="quat_6d"),
        Part(OBS + "ee_vel", EVEL),
        Part(OBS + "ee_orientation_vel", EANG),
    ),
    _ds(
        "austin_buds_dataset_converted_externally_to_rlds",
        20,
        ("image", "wrist_image", None),
        Part(OBS + "state", J7, r(0, 7)),
        Part(OBS + "state", "gripper_joint_0_pos", (7,), scale=12.5),
        mat4(OBS + "state", 8),
    ),
    _ds(
        "kuka",
        10,
        ("image", None, None),
        pos_quat(OBS + "clip_function_input/base_pose_tool_reached"),
        one_minus(OBS + "gripper_closed", "gripper_open"),
        Part("action/base_displacement_vector", "base_vel_{x,y}", lag=1),
        Part("action/base_displacement_vertical_rotation", "base_angular_vel", lag=1),
        instruction=NL,
        episode_filter=EpisodeFilter("success", "episode", "true"),
    ),
    _ds(
        "utokyo_xarm_bimanual_converted_externally_to_rlds",
        10,
        ("image", None, None),
        # action_l / action_r: xyz, yaw/pitch/roll, gripper (1 = closed)
        pos_euler(OBS + "action_l", r(0, 3), (5, 4, 3), prefix="left_"),
        one_minus(OBS + "action_l", "left_gripper_open", (6,)),
        pos_euler(OBS + "action_r", r(0, 3), (5, 4, 3), prefix="right_"),
        one_minus(OBS + "action_r", "right_gripper_open", (6,)),
        episode_filter=EpisodeFilter("language_instruction", "first_step", "eq", "Unfold a wrinkled towel."),
    ),
    _ds(
        "stanford_hydra_dataset_converted_externally_to_rlds",
        10,
        ("image", "wrist_image", None),
        # state: xyz, quat, euler, 7 joints, 7 joint vels, 3 gripper
        Part(OBS + "state", J7, r(10, 17)),
        Part(OBS + "state", "gripper_joint_0_pos", (24,), scale=12.324),
        Part(OBS + "state", "gripper_joint_{1..2}_pos", (25, 26)),
        Part(OBS + "state", V7, r(17, 24)),
        pos_euler(OBS + "state", r(0, 3), r(7, 10)),
    ),
    _ds(
        "maniskill_dataset_converted_externally_to_rlds",
        20,
        ("image", "wrist_image", None),
        Part(OBS + "state", J7, r(0, 7)),
        Part(OBS + "state", "gripper_joint_{0..1}_pos", (7, 8), scale=25.0),
    ),
    _ds(
        "ucsd_kitchen_dataset_converted_externally_to_rlds",
        2,
        ("image", None, None),
        Part(OBS + "state", J7, r(0, 7)),
        Part(OBS + "state", V7, r(7, 14)),
    ),
    _ds(
        "ucsd_pick_and_place_dataset_converted_externally_to_rlds",
        3,
        ("image", None, None),
        pos_euler(OBS + "state", r(0, 3), r(3, 6), pos_scale=0.1),  # dm → m
        Part(OBS + "state", "gripper_open", (6,), scale=1 / 6.03),
        episode_filter=EpisodeFilter("episode_metadata/success", "episode", "true"),
    ),
    _ds(
        "austin_sailor_dataset_converted_externally_to_rlds",
        20,
        ("image", "wrist_image", None),
        Part(OBS + "state_joint", J7),
        Part(OBS + "state", "gripper_joint_0_pos", (7,), scale=12.85),
        pos_quat(OBS + "state"),
    ),
    _ds(
        "austin_sirius_dataset_converted_externally_to_rlds",
        20,
        ("image", "wrist_image", None),
        Part(OBS + "state", J7, r(0, 7)),
        Part(OBS + "state", "gripper_joint_0_pos", (7,), scale=12.55),
        mat4(OBS + "state_ee"),
    ),
    _ds(
        "bc_z",
        10,
        ("image", None, None),
        Part(OBS + "present/xyz", POS),
        # The official script converts this axis-angle vector as if it were Euler angles.
        Part(OBS + "present/axis_angle", ANG, op="euler_6d"),
        one_minus(OBS + "present/sensed_close", "gripper_open"),
        instruction=NL,
        episode_filter=EpisodeFilter(OBS + "episode_success", "first_step", "gt", 0.5),
    ),
    _ds(
        "utokyo_pr2_opening_fridge_converted_externally_to_rlds",
        10,
        ("image", None, None),
        pos_euler(OBS + "state", r(0, 3), r(3, 6), pos_scale=1e-3),  # mm → m
        Part(OBS + "state", "gripper_joint_0_pos", (6,), scale=11.54 / 1000),
    ),
    _ds(
        "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds",
        10,
        ("image", None, None),
        pos_euler(OBS + "state", r(0, 3), r(3, 6), pos_scale=1e-3),
        Part(OBS + "state", "gripper_joint_0_pos", (6,), scale=1 / 86.12126922607422),
    ),
    _ds(
        "utokyo_xarm_pick_and_place_converted_externally_to_rlds",
        10,
        ("image", "hand_image", None),
        Part(OBS + "joint_state", J7, r(0, 7)),
        pos_euler(OBS + "end_effector_pose", r(0, 3), (5, 4, 3)),
    ),
    _ds(
        "berkeley_mvp_converted_externally_to_rlds",
        5,
        (None, "hand_image", None),
        Part(OBS + "joint_pos", J7),
        pos_quat(OBS + "pose"),
        one_minus(OBS + "gripper", "gripper_open"),
    ),
    _ds(
        "berkeley_rpt_converted_externally_to_rlds",
        30,
        (None, "hand_image", None),
        Part(OBS + "joint_pos", J7),
        one_minus(OBS + "gripper", "gripper_open"),
    ),
    _ds(
        "kaist_nonprehensile_converted_externally_to_rlds",
        10,
        ("image", None, None),
        # state: 7 interleaved (position, velocity) joint pairs, xyz, quat
        Part(OBS + "state", J7, r(0, 14, 2)),
        Part(OBS + "state", V7, r(1, 14, 2)),
        pos_quat(OBS + "state", 14),
    ),
    _ds(
        "tokyo_u_lsmo_converted_externally_to_rlds",
        10,
        ("image", None, None),
        Part(OBS + "state", J6, r(6, 12)),
        one_minus(OBS + "state", "gripper_joint_0_pos", (12,)),
        pos_euler(OBS + "state", r(0, 3), r(3, 6)),
    ),
    _ds(
        "dlr_sara_grid_clamp_converted_externally_to_rlds",
        10,
        ("image", None, None),
        # Orientation stored as scipy as_euler("zxy"); reordered to xyz like the script.
        pos_euler(OBS + "state", r(0, 3), (4, 5, 3)),
        instruction=Instruction(
            kind="constant",
            constant="Place the grid clamp on the table, aligning the "
            "protrusion on its bottom with the slots on the table.",
        ),
    ),
    _ds(
        "stanford_robocook_converted_externally_to_rlds",
        5,
        ("image_2", None, None),
        Part(OBS + "state", "gripper_joint_0_pos", (6,), scale=13.03),
        pos_euler(OBS + "state", r(0, 3), r(3, 6)),
    ),
    _ds(
        "imperialcollege_sawyer_wrist_cam",
        10,
        (None, "wrist_image", None),
        # No proprioception: previous step's action (deltas × 10 Hz → velocities).
        Part("action", EVEL, r(0, 3), scale=10.0, lag=1),
        Part("action", EANG, r(3, 6), scale=10.0, lag=1),
        one_minus("action", "gripper_open", (6,), lag=1),
    ),
    _ds(
        "iamlab_cmu_pickup_insert_converted_externally_to_rlds",
        20,
        ("image", "wrist_image", None),
        Part(OBS + "state", J7, r(0, 7)),
        Part(OBS + "state", "gripper_open", (7,)),
    ),
    _ds(
        "utaustin_mutex",
        20,
        ("image", "wrist_image", None),
        Part(OBS + "state", J7, r(0, 7)),
        Part(OBS + "state", "gripper_joint_0_pos", (7,), scale=13.21),
        mat4(OBS + "state", 8),
    ),
    _ds(
        "berkeley_fanuc_manipulation",
        10,
        ("image", "wrist_image", None),
        Part(OBS + "state", J6, r(0, 6)),
        one_minus(OBS + "state", "gripper_open", (6,)),
        pos_quat(OBS + "end_effector_state"),
    ),
    _ds(
        "cmu_play_fusion",
        5,
        ("image", None, None),
        Part(OBS + "state", J7, r(0, 7)),
        Part(OBS + "state", "gripper_joint_0_pos", (7,), scale=11.765),
        version="",
    ),
    _ds(
        "language_table",
        10,
        ("rgb", None, None),
        Part(OBS + "effector_translation", "eef_pos_{x,y}"),
        instruction=Instruction(OBS + "instruction", kind="codepoints"),
        version="0.0.1",
    ),
    _ds(
        "furniture_bench_dataset_converted_externally_to_rlds",
        10,
        ("image", "wrist_image", None),
        # state: xyz, quat, eef lin vel, eef ang vel, 7 joints, 7 joint vels, 7 torques, width
        Part(OBS + "state", J7, r(13, 20)),
        Part(OBS + "state", "gripper_open", (34,), scale=12.507),
        Part(OBS + "state", V7, r(20, 27)),
        pos_quat(OBS + "state"),
        Part(OBS + "state", EVEL, r(7, 10)),
        Part(OBS + "state", EANG, r(10, 13)),
    ),
    _ds(
        "droid",
        15,
        ("exterior_image_1_left", "wrist_image_left", None),
        Part(OBS + "joint_position", J7),
        one_minus(OBS + "gripper_position", "gripper_joint_0_pos"),
        pos_euler(OBS + "cartesian_position", r(0, 3), r(3, 6)),
        version="1.0.0",
    ),
    _ds(
        "fmb",
        10,
        ("image_side_1", "image_wrist_1", None),
        Part(OBS + "joint_pos", J7),
        Part(OBS + "joint_vel", V7),
        one_minus(OBS + "state_gripper_pose", "gripper_open"),
        pos_quat(OBS + "eef_pose"),
        Part(OBS + "eef_vel", EVEL, r(0, 3)),
        Part(OBS + "eef_vel", EANG, r(3, 6)),
        instruction=Instruction(
            "language_instruction",
            extra_replacements=(("object", "brick and insert it into the slot of the matching shape"),),
        ),
        version="0.0.1",
        bgr=True,
    ),
    _ds(
        "dobbe",
        30,
        (None, "wrist_image", None),
        Part(OBS + "gripper", "gripper_open"),
        Part(OBS + "xyz", POS, clip=10.0),
        Part(OBS + "rot", ANG, op="euler_6d"),
        version="0.0.1",
    ),
    _ds(
        "qut_dexterous_manpulation",
        30,
        ("image", "wrist_image", None),
        Part(OBS + "state", "gripper_joint_{0..1}_pos", (14, 15), scale=24.707),
        pos_quat(OBS + "state"),
        Part(OBS + "state", J7, r(7, 14)),
        Part(OBS + "state", V7, r(16, 23)),
    ),
)

# Datasets converted from the official custom TFRecords (data/preprocess_scripts/<name>.py).
# Their instructions are stored per step by the converter, cleaned like the scripts do.
_ALOHA_ARMS = (
    # qpos / qvel: left 6 joints, left gripper, right 6 joints, right gripper (grippers used
    # as recorded; the gripper velocities are not used).
    Part("qpos", "left_" + J6, r(0, 6)),
    Part("qvel", "left_arm_joint_{0..5}_vel", r(0, 6)),
    Part("qpos", "left_gripper_open", (6,)),
    Part("qpos", "right_" + J6, r(7, 13)),
    Part("qvel", "right_arm_joint_{0..5}_vel", r(7, 13)),
    Part("qpos", "right_gripper_open", (13,)),
)
CUSTOM_VERSION = "1.0.0"  # version directory the official-TFRecord converter writes
_CUSTOM_SPECS: tuple[DatasetSpec, ...] = (
    _ds(
        "aloha_mobile",
        50,
        ("cam_high", "cam_right_wrist", "cam_left_wrist"),
        *_ALOHA_ARMS,
        # The base comes from the previous step's base action, labelled "base_vel_y" and
        # "base_angular_vel" by the official action format.
        Part("base_action", "base_vel_y", (0,), lag=1),
        Part("base_action", "base_angular_vel", (1,), lag=1),
        instruction=Instruction("instruction"),
        version=CUSTOM_VERSION,
    ),
    _ds(
        "aloha_static",
        50,
        ("cam_high", "cam_right_wrist", "cam_left_wrist"),
        *_ALOHA_ARMS,
        instruction=Instruction("instruction"),
        version=CUSTOM_VERSION,
    ),
    _ds(
        "roboset",
        5,
        ("rgb_top", "rgb_right", "rgb_left"),
        Part("qpos", J7),
        Part("qpos_gripper", "gripper_joint_0_pos"),  # used as recorded
        instruction=Instruction("instruction"),
        version=CUSTOM_VERSION,
    ),
    _ds(
        "rh20t",
        10,
        ("image", None, None),
        # The script decides the state format per step: 6 or 7 joints; the base-frame TCP
        # pose (xyz + quaternion x, y, z, w) and the gripper width / 110 only when recorded.
        Part("joint", J6, r(0, 6)),
        Part("joint", "arm_joint_6_pos", (6,), when=("joint_dim", 7)),
        Part("tcp_base", POS, r(0, 3), when=("tcp_base_valid", 1)),
        Part("tcp_base", ANG, r(3, 7), op="quat_6d", when=("tcp_base_valid", 1)),
        Part("gripper", "gripper_joint_0_pos", (0,), scale=1 / 110, when=("gripper_valid", 1)),
        instruction=Instruction("instruction"),
        version=CUSTOM_VERSION,
    ),
    _ds(
        "calvin",
        30,
        ("rgb_static", "rgb_gripper", None),
        # robot_obs: tcp xyz, tcp euler xyz, gripper width, 7 joints, gripper action (-1/1)
        Part(OBS + "robot_obs", J7, r(7, 14)),
        Part(OBS + "robot_obs", "gripper_open", (14,), scale=0.5, offset=0.5),
        pos_euler(OBS + "robot_obs", r(0, 3), r(3, 6)),
        instruction=Instruction("instruction"),
        version=CUSTOM_VERSION,
    ),
    _ds(
        "bridgev2",
        5,
        ("images0", None, None),
        # state: xyz, euler roll/pitch/yaw, gripper; qpos: 6 joints
        Part(OBS + "qpos", J6),
        Part(OBS + "state", "gripper_joint_0_pos", (6,)),
        pos_euler(OBS + "state", r(0, 3), r(3, 6)),
        instruction=Instruction("language"),
        version=CUSTOM_VERSION,
    ),
)

REGISTRY: Mapping[str, DatasetSpec] = MappingProxyType({s.name: s for s in (*_SPECS, *_CUSTOM_SPECS)})
assert len(REGISTRY) == len(_SPECS) + len(_CUSTOM_SPECS), "duplicate dataset name in the registry"
assert {s.name for s in _CUSTOM_SPECS} == set(NON_RLDS_DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The mapping of a registered dataset; a clear error for unknown names."""
    try:
        return REGISTRY[name]
    except KeyError:
        pass
    import difflib

    close = difflib.get_close_matches(name, list(REGISTRY), n=3)
    raise KeyError(
        f"unknown RLDS dataset {name!r}: not in the registry of {len(REGISTRY)} datasets; close matches: {close}"
    )
