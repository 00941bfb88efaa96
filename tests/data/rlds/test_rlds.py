"""RLDS / Open X-Embodiment: every registered dataset, converted and read back.

Expected unified vectors are written here by hand from DATA.md §1 slot numbers and the
official per-dataset preprocess scripts, with scipy for rotations — not with the code under
test. Cameras / frequencies come from the official JSON files in ../shared.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from rdt_jax.data.rlds.registry import NON_RLDS_DATASETS, REGISTRY, get_spec
from rdt_jax.data.rlds.source import RldsSource, StepIndex

LONG = 40  # steps of the used episode of every tiny dataset (conftest.py)

# --- independent expected mappings -----------------------------------------------------------


def q6(q: np.ndarray) -> np.ndarray:
    m = Rotation.from_quat(q.astype(np.float64)).as_matrix()  # scipy: (x, y, z, w)
    return np.concatenate([m[:, :, 0], m[:, :, 1]], axis=1)


def e6(e: np.ndarray) -> np.ndarray:
    m = Rotation.from_euler("xyz", e.astype(np.float64)).as_matrix()  # extrinsic roll, pitch, yaw
    return np.concatenate([m[:, :, 0], m[:, :, 1]], axis=1)


def m4(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = v.astype(np.float64).reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major storage
    return m[:, :3, 3], np.concatenate([m[:, :3, 0], m[:, :3, 1]], axis=1)


def prev(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros_like(x[:1]), x[:-1]])


def blk(start: int, x: np.ndarray) -> dict[int, np.ndarray]:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return {start + k: x[:, k] for k in range(x.shape[1])}


def g(x: np.ndarray) -> np.ndarray:  # a scalar / 1-vector feature as (T,)
    return np.asarray(x, np.float64).reshape(len(x))


def pq(x: np.ndarray) -> dict[int, np.ndarray]:  # xyz + quaternion at 0..6
    return {**blk(30, x[:, :3]), **blk(33, q6(x[:, 3:7]))}


def pe(x: np.ndarray, pos=(0, 1, 2), eul=(3, 4, 5), s: float = 1.0, p: int = 30, a: int = 33):
    return {**blk(p, s * x[:, list(pos)]), **blk(a, e6(x[:, list(eul)]))}


def mat(x: np.ndarray) -> dict[int, np.ndarray]:
    pos, rot = m4(x)
    return {**blk(30, pos), **blk(33, rot)}


o = lambda s, k: s["observation/" + k]
EXPECTED = {
    "fractal20220817_data": lambda s: {
        **pq(o(s, "base_pose_tool_reached")),
        10: 1 - g(o(s, "gripper_closed")),
        **blk(100, prev(3 * s["action/base_displacement_vector"])),
        102: prev(3 * g(s["action/base_displacement_vertical_rotation"])),
    },
    "jaco_play": lambda s: {
        **blk(0, o(s, "joint_pos")[:, :6]),
        **blk(10, o(s, "joint_pos")[:, 6:8]),
        **pq(o(s, "end_effector_cartesian_pos")),
        **blk(39, o(s, "end_effector_cartesian_velocity")[:, :3]),
    },
    "taco_play": lambda s: {
        **blk(0, o(s, "robot_obs")[:, 7:14]),
        10: 12.3843 * o(s, "robot_obs")[:, 6],
        **pe(o(s, "robot_obs")),
    },
    "berkeley_cable_routing": lambda s: pq(o(s, "robot_state")),
    "viola": lambda s: {
        **blk(0, o(s, "joint_states")),
        10: 12.905 * g(o(s, "gripper_states")),
        **mat(o(s, "ee_states")),
    },
    "berkeley_autolab_ur5": lambda s: {
        **blk(0, o(s, "robot_state")[:, :6]),
        10: 1 - o(s, "robot_state")[:, 13],
        **pq(o(s, "robot_state")[:, 6:13]),
    },
    "toto": lambda s: blk(0, o(s, "state")),
    "nyu_door_opening_surprising_effectiveness": lambda s: {
        **blk(39, prev(3 * s["action/world_vector"])),
        **blk(42, prev(3 * s["action/rotation_delta"])),
        10: prev(1 - g(s["action/gripper_closedness_action"])),
    },
    "columbia_cairlab_pusht_real": lambda s: blk(30, o(s, "robot_state")),
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "joint_pos")),
        10: o(s, "state")[:, 7],
        **blk(15, o(s, "joint_vel")),
        **blk(30, o(s, "ee_position")),
        **blk(33, q6(o(s, "ee_orientation"))),
        **blk(39, o(s, "ee_vel")),
        **blk(42, o(s, "ee_orientation_vel")),
    },
    "austin_buds_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, :7]),
        10: 12.5 * o(s, "state")[:, 7],
        **mat(o(s, "state")[:, 8:24]),
    },
    "kuka": lambda s: {
        **pq(o(s, "clip_function_input/base_pose_tool_reached")),
        10: 1 - g(o(s, "gripper_closed")),
        **blk(100, prev(s["action/base_displacement_vector"])),
        102: prev(g(s["action/base_displacement_vertical_rotation"])),
    },
    "utokyo_xarm_bimanual_converted_externally_to_rlds": lambda s: {
        **pe(o(s, "action_l"), eul=(5, 4, 3), p=80, a=83),
        60: 1 - o(s, "action_l")[:, 6],
        **pe(o(s, "action_r"), eul=(5, 4, 3)),
        10: 1 - o(s, "action_r")[:, 6],
    },
    "stanford_hydra_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, 10:17]),
        10: 12.324 * o(s, "state")[:, 24],
        **blk(11, o(s, "state")[:, 25:27]),
        **blk(15, o(s, "state")[:, 17:24]),
        **pe(o(s, "state"), eul=(7, 8, 9)),
    },
    "maniskill_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, :7]),
        **blk(10, 25 * o(s, "state")[:, 7:9]),
    },
    "ucsd_kitchen_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, :7]),
        **blk(15, o(s, "state")[:, 7:14]),
    },
    "ucsd_pick_and_place_dataset_converted_externally_to_rlds": lambda s: {
        **pe(o(s, "state"), s=0.1),
        10: o(s, "state")[:, 6] / 6.03,
    },
    "austin_sailor_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state_joint")),
        10: 12.85 * o(s, "state")[:, 7],
        **pq(o(s, "state")),
    },
    "austin_sirius_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, :7]),
        10: 12.55 * o(s, "state")[:, 7],
        **mat(o(s, "state_ee")),
    },
    "bc_z": lambda s: {
        **blk(30, o(s, "present/xyz")),
        **blk(33, e6(o(s, "present/axis_angle"))),
        10: 1 - g(o(s, "present/sensed_close")),
    },
    "utokyo_pr2_opening_fridge_converted_externally_to_rlds": lambda s: {
        **pe(o(s, "state"), s=1e-3),
        10: o(s, "state")[:, 6] / 1000 * 11.54,
    },
    "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds": lambda s: {
        **pe(o(s, "state"), s=1e-3),
        10: o(s, "state")[:, 6] / 86.12126922607422,
    },
    "utokyo_xarm_pick_and_place_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "joint_state")[:, :7]),
        **pe(o(s, "end_effector_pose"), eul=(5, 4, 3)),
    },
    "berkeley_mvp_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "joint_pos")),
        **pq(o(s, "pose")),
        10: 1 - g(o(s, "gripper")),
    },
    "berkeley_rpt_converted_externally_to_rlds": lambda s: {**blk(0, o(s, "joint_pos")), 10: 1 - g(o(s, "gripper"))},
    "kaist_nonprehensile_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, 0:14:2]),
        **blk(15, o(s, "state")[:, 1:14:2]),
        **pq(o(s, "state")[:, 14:21]),
    },
    "tokyo_u_lsmo_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, 6:12]),
        10: 1 - o(s, "state")[:, 12],
        **pe(o(s, "state")),
    },
    "dlr_sara_grid_clamp_converted_externally_to_rlds": lambda s: pe(o(s, "state"), eul=(4, 5, 3)),
    "stanford_robocook_converted_externally_to_rlds": lambda s: {10: 13.03 * o(s, "state")[:, 6], **pe(o(s, "state"))},
    "imperialcollege_sawyer_wrist_cam": lambda s: {
        **blk(39, prev(10 * s["action"][:, :3])),
        **blk(42, prev(10 * s["action"][:, 3:6])),
        10: prev(1 - s["action"][:, 6]),
    },
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, :7]),
        10: o(s, "state")[:, 7],
    },
    "utaustin_mutex": lambda s: {
        **blk(0, o(s, "state")[:, :7]),
        10: 13.21 * o(s, "state")[:, 7],
        **mat(o(s, "state")[:, 8:24]),
    },
    "berkeley_fanuc_manipulation": lambda s: {
        **blk(0, o(s, "state")[:, :6]),
        10: 1 - o(s, "state")[:, 6],
        **pq(o(s, "end_effector_state")),
    },
    "cmu_play_fusion": lambda s: {**blk(0, o(s, "state")[:, :7]), 10: 11.765 * o(s, "state")[:, 7]},
    "language_table": lambda s: blk(30, o(s, "effector_translation")),
    "furniture_bench_dataset_converted_externally_to_rlds": lambda s: {
        **blk(0, o(s, "state")[:, 13:20]),
        10: 12.507 * o(s, "state")[:, 34],
        **blk(15, o(s, "state")[:, 20:27]),
        **pq(o(s, "state")),
        **blk(39, o(s, "state")[:, 7:10]),
        **blk(42, o(s, "state")[:, 10:13]),
    },
    "droid": lambda s: {
        **blk(0, o(s, "joint_position")),
        10: 1 - g(o(s, "gripper_position")),
        **pe(o(s, "cartesian_position")),
    },
    "fmb": lambda s: {
        **blk(0, o(s, "joint_pos")),
        **blk(15, o(s, "joint_vel")),
        10: 1 - g(o(s, "state_gripper_pose")),
        **pq(o(s, "eef_pose")),
        **blk(39, o(s, "eef_vel")[:, :3]),
        **blk(42, o(s, "eef_vel")[:, 3:]),
    },
    "dobbe": lambda s: {10: g(o(s, "gripper")), **blk(30, np.clip(o(s, "xyz"), -10, 10)), **blk(33, e6(o(s, "rot")))},
    "qut_dexterous_manpulation": lambda s: {
        **blk(10, 24.707 * o(s, "state")[:, 14:16]),
        **pq(o(s, "state")),
        **blk(0, o(s, "state")[:, 7:14]),
        **blk(15, o(s, "state")[:, 16:23]),
    },
}
CONSTANT_INSTRUCTION = {
    "berkeley_cable_routing": "Route cable through the tight-fitting clip mounted on the table.",
    "nyu_door_opening_surprising_effectiveness": "Open the cabinet door.",
    "dlr_sara_grid_clamp_converted_externally_to_rlds": "Place the grid clamp on the table, aligning the "
    "protrusion on its bottom with the slots on the table.",
}
DATASETS = sorted(EXPECTED)


def expected_states(name: str, steps: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    slots = EXPECTED[name](steps)
    t = len(next(iter(steps.values())))
    vec = np.zeros((t, 128))
    mask = np.zeros(128)
    for i, v in slots.items():
        vec[:, i] = v
        mask[i] = 1
    return vec, mask


@pytest.fixture(scope="module")
def official(shared_dir):
    d = shared_dir / "reference" / "data"
    return {
        k: json.loads((d / f"{k}.json").read_text())
        for k in ("pretrain_datasets", "dataset_img_keys", "dataset_control_freq", "dataset_stat")
    }


# --- registry-level checks -------------------------------------------------------------------


def test_registry_covers_every_pretraining_dataset(official):
    names = official["pretrain_datasets"]
    assert len(names) == 46
    assert set(REGISTRY) == set(names)  # every pretraining dataset is registered, nothing else
    # RLDS ones are checked here, the official-TFRecord ones in test_custom_tfrecord.py.
    assert set(REGISTRY) - set(NON_RLDS_DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", DATASETS)
def test_registry_matches_official_tables(name, official):
    spec = get_spec(name)
    keys = official["dataset_img_keys"][name]
    cams = tuple(k if m else None for k, m in zip(keys["image_keys"][:3], keys["image_mask"][:3], strict=True))
    assert spec.cameras == cams
    assert spec.ctrl_freq == official["dataset_control_freq"][name]
    # Every slot with non-zero std in the official statistics must be a mapped slot.
    std = np.asarray(official["dataset_stat"][name]["state_std"])
    assert set(np.flatnonzero(std)) <= set(np.flatnonzero(spec.mask()))


def test_unknown_dataset_name_is_a_clear_error():
    with pytest.raises(KeyError, match=r"unknown RLDS dataset 'fractal2022'.*fractal20220817_data"):
        get_spec("fractal2022")
    assert get_spec("calvin").name == "calvin"  # official-TFRecord datasets are registered too


# --- converted datasets read back --------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_read_back(name, tiny_datasets, official):
    ds = tiny_datasets[name]
    src = RldsSource(ds.dir, name)
    # Only the 40-step episode is used: the 5-step one is too short, a filtered one rejected.
    assert len(src) == LONG
    assert src.index.kept.tolist() == [True, False] + ([False] if len(ds.episodes) == 3 else [])
    steps = ds.episodes[0]
    vec, mask = expected_states(name, steps)
    keys = official["dataset_img_keys"][name]
    rng = np.random.default_rng(0)
    for t in (0, 1, 17, LONG - 1):
        s = src.get(t, rng)
        assert (s.dataset_name, s.step_id) == (name, t)
        np.testing.assert_allclose(s.state, vec[t : t + 1], rtol=1e-5, atol=1e-6)
        fut = np.concatenate([vec[t + 1 : t + 65], np.repeat(vec[-1:], max(0, 64 - (LONG - 1 - t)), axis=0)])[:64]
        np.testing.assert_allclose(s.actions, fut, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s.state_elem_mask, mask)
        np.testing.assert_allclose(s.state_std, vec.std(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.state_mean, vec.mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.state_norm, np.sqrt((vec**2).mean(axis=0)), rtol=1e-4, atol=1e-6)
        assert s.ctrl_freq == official["dataset_control_freq"][name]
        want = CONSTANT_INSTRUCTION.get(name, ds.expected_instruction)
        assert s.instruction == want
        for c in range(3):
            if not keys["image_mask"][c]:
                assert s.frames[c].size == 0 and not s.frame_masks[c].any()
                continue
            imgs = steps["observation/" + keys["image_keys"][c]]
            expect = np.stack([imgs[max(t - 1, 0)], imgs[t]])
            if name == "fmb":  # stored BGR, returned RGB
                expect = expect[..., ::-1]
            np.testing.assert_array_equal(s.frames[c], expect)
            assert s.frame_masks[c].tolist() == [t > 0, True]
        s.validate()


def test_long_episode_entries_draw_uniform_steps(tiny_datasets):
    ds = tiny_datasets["toto"]
    src = RldsSource(ds.dir, "toto")
    # Pretend the cap is 10 steps: the 40-step episode gets 10 entries, each a uniform step.
    idx = src.index
    capped = StepIndex(
        idx.dataset_name,
        idx.lengths,
        idx.kept,
        idx.dropped_by_filter,
        idx.dropped_short,
        idx.thresh_low,
        thresh_high=10,
    )
    src.index = capped
    src._starts = np.concatenate([[0], np.cumsum(capped.entries_per_record)])
    assert len(src) == 10
    rng = np.random.default_rng(1)
    steps = [src.locate(i, rng)[1] for i in range(4000)]
    counts = np.bincount(steps, minlength=LONG)
    assert counts.min() > 50 and counts.max() < 160  # ~100 each


def test_training_mixture_reads_steps_in_shuffled_order(tiny_datasets):
    """Through the training mixture an RLDS dataset's steps come in a shuffled order: one epoch visits
    each entry once, not step 0, 1, 2, ... of one episode (every batch a clip of consecutive frames)."""
    from rdt_jax.data.pipeline import PipelineConfig, build_mixture
    from rdt_jax.data.schema import IndexedStepSource

    class StepIds:  # the mixture's transform slot: report the step each sample was read from
        def __init__(self):
            self.dataset_ids = {"toto": 0}

        def __call__(self, raw, rng):
            return raw.step_id

    src = RldsSource(tiny_datasets["toto"].dir, "toto")
    assert isinstance(src, IndexedStepSource) and len(src) == LONG
    mixture = build_mixture({"toto": src}, {"toto": 1.0}, StepIds(), PipelineConfig(seed=0))
    epoch = [mixture[i] for i in range(LONG)]
    assert sorted(epoch) == list(range(LONG)) and epoch != list(range(LONG))
    assert sum(abs(a - b) == 1 for a, b in itertools.pairwise(epoch)) < LONG // 4
    other_seed = build_mixture({"toto": src}, {"toto": 1.0}, StepIds(), PipelineConfig(seed=1))
    assert [other_seed[i] for i in range(LONG)] != epoch


def test_missing_index_and_unconverted_dir_are_clear_errors(tiny_datasets, tmp_path):
    ds = tiny_datasets["toto"]
    with pytest.raises(ValueError, match=r"not ArrayRecord.*convert_rlds"):
        RldsSource(ds.tfrecord_dir, "toto")
    import shutil

    copy = tmp_path / "toto"
    shutil.copytree(ds.dir, copy)
    (copy / "rdt_step_index.npz").unlink()
    with pytest.raises(FileNotFoundError, match="no step index"):
        RldsSource(copy, "toto")
    with pytest.raises(KeyError, match="unknown RLDS dataset"):
        RldsSource(ds.dir, "totoo")


def test_registry_name_comes_from_the_step_index(tiny_datasets, tmp_path):
    """A dataset stored under another tfds name, indexed with convert_rlds.py --index-only --name toto,
    is read as toto without naming it again (training and encode_lang pass no name)."""
    import shutil

    local = tmp_path / "toto_local"
    shutil.copytree(tiny_datasets["toto"].dir, local)
    info = json.loads((local / "dataset_info.json").read_text())
    info["name"] = "toto_local"
    (local / "dataset_info.json").write_text(json.dumps(info))
    for shard in local.glob("toto-*"):
        shard.rename(local / shard.name.replace("toto-", "toto_local-", 1))
    script = pathlib.Path(__file__).resolve().parents[3] / "scripts" / "convert_rlds.py"
    subprocess.run([sys.executable, str(script), "--dst", str(local), "--index-only", "--name", "toto"],
                   check=True, capture_output=True)
    # A user error is one line, not a traceback: converting onto the existing directory again.
    again = subprocess.run([sys.executable, str(script), "--src", str(tiny_datasets["toto"].tfrecord_dir), "--dst",
                            str(local)], capture_output=True, text=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr  # (TensorFlow logs its own lines)
    last = again.stderr.strip().splitlines()[-1]
    assert last == f"error: {local} exists; pass overwrite=True (--overwrite) to replace it"
    src = RldsSource(local)
    assert (src.store.info.name, src.dataset_name) == ("toto_local", "toto")
    assert src.get(3, np.random.default_rng(0)).step_id == 3


def test_conversion_into_its_own_input_is_refused(tiny_datasets, tmp_path):
    """--dst equal to --src, or above it, with --overwrite would delete the input before reading it."""
    import shutil

    from rdt_jax.data.rlds.convert import convert_to_array_record

    src = tmp_path / "toto" / "0.1.0"
    shutil.copytree(tiny_datasets["toto"].tfrecord_dir, src)
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, src.parent):
        with pytest.raises(ValueError, match=r"is --src .* or a folder above it"):
            convert_to_array_record(src, dst, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before


def test_wrong_feature_shape_names_dataset_and_key(tiny_datasets):
    from dataclasses import replace

    from rdt_jax.data.rlds.spec import Part

    ds = tiny_datasets["toto"]
    src = RldsSource(ds.dir, "toto")
    src.spec = replace(src.spec, parts=(Part("observation/state", "arm_joint_{0..7}_pos"),))
    with pytest.raises(ValueError, match=r"toto.*'observation/state' has 7 values per step.*expects 8"):
        src.get(0, np.random.default_rng(0))
    src.spec = replace(src.spec, parts=(Part("observation/joints", "arm_joint_{0..6}_pos"),))
    src._cache.clear()
    with pytest.raises(KeyError, match=r"toto needs step feature 'observation/joints'"):
        src.get(0, np.random.default_rng(0))


def test_corrupt_frame_names_episode_camera_and_step(tiny_datasets):
    """tfds's image decoder fails on bytes that are not an image with an AttributeError on None; the
    reader says which episode, camera and step it was reading."""
    ds = tiny_datasets["toto"]
    store = RldsSource(ds.dir, "toto").store
    episode = store.read(0)
    frames = episode.steps["observation/image"].copy()
    frames[3] = b"not an image"
    episode.steps["observation/image"] = frames
    assert store.decode_image(episode, "image", 2).shape[-1] == 3  # its neighbours still decode
    with pytest.raises(ValueError, match=rf"^{re.escape(episode.where)}: camera 'image' step 3: the frame does "
                                         r"not decode as png \(AttributeError"):
        store.decode_image(episode, "image", 3)


def test_bad_frames_are_redrawn_when_skipping(tiny_datasets, caplog):
    """With skip_bad_episodes a sample whose frames do not decode is replaced by a draw from the same rng: the
    same samples from a fresh source (exact resume), each bad frame named once; without it the error stops."""
    from rdt_jax.data.rlds.reader import FrameError

    ds = tiny_datasets["toto"]
    bad_steps = {10, 11}  # samples at steps 10, 11 and 12 read one of them

    def with_bad_frames(src):
        decode = src.store.decode_image

        def decode_or_fail(episode, key, step):
            if step in bad_steps:
                raise FrameError(f"{episode.where}: camera {key!r} step {step}: the frame does not decode")
            return decode(episode, key, step)

        src.store.decode_image = decode_or_fail
        return src

    strict = with_bad_frames(RldsSource(ds.dir, "toto"))
    with pytest.raises(FrameError, match="step 10: the frame does not decode"):
        strict.get(11, np.random.default_rng(11))

    def steps(src):
        return [src.get(i, np.random.default_rng([7, i])).step_id for i in range(LONG)]

    skipping = with_bad_frames(RldsSource(ds.dir, "toto", skip_bad_episodes=True))
    with caplog.at_level("WARNING"):
        got = steps(skipping)
    assert [t for i, t in enumerate(got) if i not in (10, 11, 12)] == [i for i in range(LONG) if i not in (10, 11, 12)]
    assert all(t not in (10, 11, 12) for t in got)
    assert skipping.bad_samples.count >= 3
    assert caplog.text.count("skipping a sample that failed to read") == 2  # steps 10 and 11, once each
    assert steps(with_bad_frames(RldsSource(ds.dir, "toto", skip_bad_episodes=True))) == got
    bad_steps.update(range(LONG))
    with pytest.raises(FrameError, match=r"toto: 64 draws in a row failed to read; the last: .*does not decode"):
        skipping.get(0, np.random.default_rng(0))


class _CorruptRecords:
    """An ArrayRecord data source whose records ``bad`` come back as bytes that are not an episode."""

    def __init__(self, records, bad: set[int]):
        self.records, self.bad = records, bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> bytes:
        return b"\xff\xff\xff\xff not an episode" if i in self.bad else self.records[i]


def test_corrupt_record_is_an_episode_error_and_skippable(tiny_datasets, caplog):
    """A record that does not parse stops the run naming the record; with skip_bad_episodes it is redrawn
    like a bad frame (toto has one usable episode, so every draw fails and the source gives up)."""
    from rdt_jax.data.rlds.reader import EpisodeError

    ds = tiny_datasets["toto"]
    for skip in (False, True):
        src = RldsSource(ds.dir, "toto", skip_bad_episodes=skip)
        src.store._sources[0] = _CorruptRecords(src.store._sources[0], {0})
        where = re.escape(f"{ds.dir}[train][0]: cannot parse the episode record")
        if not skip:
            with pytest.raises(EpisodeError, match=f"^{where}"):
                src.get(3, np.random.default_rng(0))
            continue
        with caplog.at_level("WARNING"), pytest.raises(EpisodeError, match=f"toto: 64 draws in a row failed to "
                                                                          f"read; the last: {where}"):
            src.get(3, np.random.default_rng(0))
        assert src.bad_samples.count == 64
        assert caplog.text.count("skipping a sample that failed to read") == 1


def test_non_finite_states_are_an_episode_error(tiny_datasets):
    """NaN in an episode's state is found when the episode is first sampled (the step index does not map
    states); the error names the record and slot, and is one skip_bad_episodes redraws."""
    from rdt_jax.data.rlds.reader import EpisodeError

    ds = tiny_datasets["toto"]
    src = RldsSource(ds.dir, "toto")
    read = src.store.read

    def read_with_nan(record):
        raw = read(record)
        state = raw.steps["observation/state"].copy()
        state[5, 0] = np.nan
        raw.steps["observation/state"] = state
        return raw

    src.store.read = read_with_nan
    with pytest.raises(EpisodeError, match=rf"^toto:{re.escape(str(ds.dir))}\[train\]\[0\]: NaN/inf in unified "
                                           r"state slots \['"):
        src.get(3, np.random.default_rng(0))


def test_reader_never_imports_tensorflow(tiny_datasets):
    ds = tiny_datasets["droid"]
    code = textwrap.dedent(f"""
        import sys, numpy as np
        from rdt_jax.data.rlds.source import RldsSource
        s = RldsSource({str(ds.dir)!r}, "droid").get(3, np.random.default_rng(0))
        assert s.frames[0].shape == (2, 4, 5, 3), s.frames[0].shape
        bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
        assert not bad, bad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_compute_stats_rlds_format(tiny_datasets, tmp_path):
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[3] / "scripts" / "compute_stats.py"
    spec = importlib.util.spec_from_file_location("compute_stats", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ds = tiny_datasets["jaco_play"]
    out = tmp_path / "stat.json"
    assert mod.main(["--format", "rlds", "--data-dir", str(ds.dir), "--output", str(out)]) == 0
    got = json.loads(out.read_text())["jaco_play"]
    vec, _ = expected_states("jaco_play", ds.episodes[0])  # the only kept episode
    np.testing.assert_allclose(got["state_mean"], vec.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["state_max"], vec.max(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["state_min"], vec.min(axis=0), rtol=1e-5, atol=1e-6)
