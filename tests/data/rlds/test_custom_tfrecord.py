"""The six datasets stored as official custom per-step TFRecords (and Mobile ALOHA HDF5).

Each test dataset is written here in the official on-disk layout: one `.tfrecord` file per
episode, one `tf.train.Example` per step, arrays as `tf.io.serialize_tensor` bytes with the
official feature names and dtypes, instructions as raw bytes (or a serialized string tensor
for rh20t), rh20t frames as serialized JPEG strings, bridgev2 observations with a leading
axis of 1. Then converted with scripts/convert_rlds.py's functions (PNG frames: lossless)
and read back through the registry. Expected unified vectors are built here, slot by slot,
from the raw values (rotations via scipy), independently of the registry.

Episodes: a 34-step one (used) and a 5-step one (< 32 steps: dropped by the step index).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from rdt_jax.data.rlds.official_convert import convert_official
from rdt_jax.data.rlds.registry import NON_RLDS_DATASETS, get_spec
from rdt_jax.data.rlds.source import RldsSource

tf = pytest.importorskip("tensorflow", reason="writing official TFRecords needs the rlds extra")

LONG, SHORT = 34, 5
HW = (4, 6)
TEXT, TEXT_CLEAN = "pick_up the red-cup", "Pick up the red cup."
ROBOSET_DIR = "home/jaydv/Documents/RoboSet/drag_mug_forward_data"  # official table: "Drag mug forwards."


def _tensor(a: np.ndarray) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(a).numpy()]))


def _bytes(b: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))


def _int(v: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))


def _write(path: pathlib.Path, steps: list[dict[str, tf.train.Feature]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as w:
        for s in steps:
            w.write(tf.train.Example(features=tf.train.Features(feature=s)).SerializeToString())


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def six_d(m: np.ndarray) -> np.ndarray:
    """First two columns of R, column by column."""
    return np.concatenate([m[:, :, 0], m[:, :, 1]], axis=1)


@dataclasses.dataclass
class Tiny:
    raw: dict[str, np.ndarray]  # the used episode's raw per-step values
    frames: dict[str, np.ndarray]  # camera key → (T, H, W, 3) expected RGB frames
    state: np.ndarray  # (T, 128) expected
    mask: np.ndarray  # (T, 128) expected per-step mask
    instruction: str


def _img(rng, t: int, hw=HW) -> np.ndarray:
    return rng.integers(0, 256, (t, *hw, 3), dtype=np.uint8)


def make_aloha(root: pathlib.Path, rng, mobile: bool) -> Tiny:
    tiny = None
    for e, t in enumerate((LONG, SHORT)):
        qpos, qvel = rng.uniform(-1, 1, (t, 14)).astype(np.float32), rng.uniform(-1, 1, (t, 14)).astype(np.float32)
        action, base = rng.uniform(-1, 1, (t, 14)).astype(np.float32), rng.uniform(-1, 1, (t, 2)).astype(np.float32)
        cams = {k: _img(rng, t) for k in ("cam_high", "cam_left_wrist", "cam_right_wrist", "cam_low")}
        steps = []
        for i in range(t):
            s = {
                "action": _tensor(action[i]),
                "qpos": _tensor(qpos[i]),
                "qvel": _tensor(qvel[i]),
                "instruction": _bytes(TEXT.encode()),
                "terminate_episode": _int(i == t - 1),
            }
            s.update({k: _tensor(v[i]) for k, v in cams.items() if mobile is False or k != "cam_low"})
            if mobile:
                s["base_action"] = _tensor(base[i])
            steps.append(s)
        _write(root / f"ep{e}.tfrecord", steps)
        if e == 0:
            vec = np.zeros((t, 128))
            vec[:, 50:56], vec[:, 65:71], vec[:, 60] = qpos[:, 0:6], qvel[:, 0:6], qpos[:, 6]
            vec[:, 0:6], vec[:, 15:21], vec[:, 10] = qpos[:, 7:13], qvel[:, 7:13], qpos[:, 13]
            used = [*range(0, 6), *range(15, 21), 10, *range(50, 56), *range(65, 71), 60]
            if mobile:  # previous step's base action, zeros at step 0
                vec[1:, 101], vec[1:, 102] = base[:-1, 0], base[:-1, 1]
                used += [101, 102]
            mask = np.zeros((t, 128))
            mask[:, used] = 1
            tiny = Tiny({"base_action": base}, cams, vec, mask, TEXT_CLEAN)
    return tiny


def make_roboset(root: pathlib.Path, rng) -> Tiny:
    tiny = None
    # Used episode, a short one, one in an official failure set, one with no table entry.
    dirs = (ROBOSET_DIR, ROBOSET_DIR, "mnt/raid5/x/set_12_bin_pick_eval", "unknown_task")
    for e, (d, t) in enumerate(zip(dirs, (LONG, SHORT, LONG, LONG), strict=True)):
        qpos = rng.uniform(-1, 1, (t, 7)).astype(np.float16)
        grip = rng.uniform(0, 1, (t,)).astype(np.float16)
        cams = {k: _img(rng, t, (5, 7)) for k in ("rgb_left", "rgb_right", "rgb_top")}
        steps = []
        for i in range(t):
            s = {k: _tensor(v[i]) for k, v in cams.items()}
            s.update(
                action=_tensor(rng.uniform(-1, 1, 7).astype(np.float16)),
                action_gripper=_tensor(np.float16(0.5)),
                qpos=_tensor(qpos[i]),
                qvel=_tensor(qpos[i] * 0),
                qpos_gripper=_tensor(grip[i]),  # a scalar, as the script's expand_dims implies
                qvel_gripper=_tensor(np.float16(0)),
                terminate_episode=_int(i == t - 1),
            )
            steps.append(s)
        _write(root / d / f"data_Trial{e}.tfrecord", steps)
        if e == 0:
            vec = np.zeros((t, 128))
            vec[:, 0:7], vec[:, 10] = qpos, grip
            mask = np.zeros((t, 128))
            mask[:, [*range(7), 10]] = 1
            tiny = Tiny({}, cams, vec, mask, "Drag mug forwards.")
    return tiny


def make_rh20t(root: pathlib.Path, rng) -> Tiny:
    tiny = None
    for e, (t, ndof) in enumerate(((LONG, 7), (SHORT, 6), (LONG, 5))):  # 5 joints: discarded
        joint = rng.uniform(-1, 1, (t, ndof))
        tcp = rng.uniform(-1, 1, (t, 7))
        grip = rng.uniform(0, 110, (t, 3))
        has_tcp = np.arange(t) % 5 != 3
        has_grip = np.arange(t) % 4 != 1
        imgs = _img(rng, t, (6, 8))
        jpegs = [_jpeg(im) for im in imgs]
        steps = []
        for i in range(t):
            s = {
                "joint": _tensor(joint[i]),
                "image": _tensor(np.array(jpegs[i], dtype=object)),
                "instruction": _tensor(np.array(TEXT.encode(), dtype=object)),
                "terminate_episode": _int(i == t - 1),
            }
            if has_tcp[i]:
                s["tcp_base"] = _tensor(tcp[i])
                s["tcp"] = _tensor(tcp[i])
            if has_grip[i]:
                s["gripper"] = _tensor(grip[i])
            steps.append(s)
        _write(root / f"RH20T_cfg{e}/task_{e:04d}/cam_0.tfrecord", steps)
        if e == 0:
            vec, mask = np.zeros((t, 128)), np.zeros((t, 128))
            vec[:, 0:7], mask[:, 0:7] = joint, 1
            rot = six_d(Rotation.from_quat(tcp[:, 3:7]).as_matrix())  # scipy: (x, y, z, w)
            vec[has_tcp, 30:33], vec[has_tcp, 33:39], mask[has_tcp, 30:39] = tcp[has_tcp, :3], rot[has_tcp], 1
            vec[has_grip, 10], mask[has_grip, 10] = grip[has_grip, 0] / 110, 1
            tiny = Tiny({}, {"image": np.stack([_decode(j) for j in jpegs])}, vec, mask, TEXT_CLEAN)
    return tiny


def make_calvin(root: pathlib.Path, rng) -> Tiny:
    tiny = None
    for e, t in enumerate((LONG, SHORT)):
        obs = rng.uniform(-1, 1, (t, 15))
        obs[:, 14] = rng.choice([-1.0, 1.0], t)
        cams = {"rgb_static": _img(rng, t, (6, 6)), "rgb_gripper": _img(rng, t, (3, 3))}
        steps = [
            {
                "action": _tensor(rng.uniform(-1, 1, 7)),
                "robot_obs": _tensor(obs[i]),
                "rgb_static": _tensor(cams["rgb_static"][i]),
                "rgb_gripper": _tensor(cams["rgb_gripper"][i]),
                "terminate_episode": _int(i == t - 1),
                "instruction": _bytes(TEXT.encode()),
            }
            for i in range(t)
        ]
        _write(root / "training" / f"{e:07d}.tfrecord", steps)
        if e == 0:
            vec = np.zeros((t, 128))
            vec[:, 0:7], vec[:, 10], vec[:, 30:33] = obs[:, 7:14], (obs[:, 14] + 1) / 2, obs[:, 0:3]
            vec[:, 33:39] = six_d(Rotation.from_euler("xyz", obs[:, 3:6]).as_matrix())
            mask = np.zeros((t, 128))
            mask[:, [*range(7), 10, *range(30, 39)]] = 1
            tiny = Tiny({}, cams, vec, mask, TEXT_CLEAN)
    return tiny


def make_bridgev2(root: pathlib.Path, rng) -> Tiny:
    tiny = None
    for e, t in enumerate((LONG, SHORT)):
        state = rng.uniform(-1, 1, (t, 7)).astype(np.float32)
        qpos = rng.uniform(-1, 1, (t, 6)).astype(np.float32)
        imgs = _img(rng, t)
        steps = [
            {
                "observations/images0": _tensor(imgs[i][None]),
                "observations/state": _tensor(state[i][None]),
                "observations/qpos": _tensor(qpos[i][None]),
                "observations/eef_transform": _tensor(np.eye(4, dtype=np.float32)[None]),
                "language": _bytes(TEXT.encode()),
                "actions": _tensor(rng.uniform(-1, 1, 7).astype(np.float32)),
                "truncates": _int(i == t - 1),
            }
            for i in range(t)
        ]
        _write(root / "rss/toykitchen2/set_table/00/train" / f"out_{e}.tfrecord", steps)
        if e == 0:
            vec = np.zeros((t, 128))
            vec[:, 0:6], vec[:, 10], vec[:, 30:33] = qpos, state[:, 6], state[:, 0:3]
            vec[:, 33:39] = six_d(Rotation.from_euler("xyz", state[:, 3:6].astype(np.float64)).as_matrix())
            mask = np.zeros((t, 128))
            mask[:, [*range(6), 10, *range(30, 39)]] = 1
            tiny = Tiny({}, {"images0": imgs}, vec, mask, TEXT_CLEAN)
    return tiny


MAKERS = {
    "aloha_mobile": lambda root, rng: make_aloha(root, rng, mobile=True),
    "aloha_static": lambda root, rng: make_aloha(root, rng, mobile=False),
    "roboset": make_roboset,
    "rh20t": make_rh20t,
    "calvin": make_calvin,
    "bridgev2": make_bridgev2,
}


@pytest.fixture(scope="module")
def official(shared_dir):
    d = shared_dir / "reference" / "data"
    return {k: json.loads((d / f"{k}.json").read_text()) for k in ("dataset_img_keys", "dataset_control_freq")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    out = {}
    for seed, (name, make) in enumerate(MAKERS.items()):
        src = root / "src" / name
        tiny = make(src, np.random.default_rng(seed))
        ds_dir, report, index = convert_official(name, src, root / "out", image_format="png")
        out[name] = (tiny, ds_dir, report, index)
    return out


def test_every_custom_dataset_has_a_maker():
    assert set(MAKERS) == set(NON_RLDS_DATASETS)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_read_back(name, converted, official):
    tiny, ds_dir, _report, index = converted[name]
    assert index.lengths[index.kept].tolist() == [LONG]  # the 5-step episode is dropped
    src = RldsSource(ds_dir, name)
    assert len(src) == LONG
    keys = official["dataset_img_keys"][name]
    vec = tiny.state
    for t in (0, 1, 20, LONG - 1):
        s = src.get(t, np.random.default_rng(0))
        assert (s.dataset_name, s.step_id) == (name, t)
        np.testing.assert_allclose(s.state, vec[t : t + 1], rtol=1e-5, atol=2e-6)
        fut = np.concatenate([vec[t + 1 :], np.repeat(vec[-1:], 64, axis=0)])[:64]
        np.testing.assert_allclose(s.actions, fut, rtol=1e-5, atol=2e-6)
        np.testing.assert_array_equal(s.state_elem_mask, tiny.mask[t])
        np.testing.assert_allclose(s.state_std, vec.std(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.state_mean, vec.mean(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.state_norm, np.sqrt((vec**2).mean(axis=0)), rtol=1e-4, atol=1e-5)
        assert s.ctrl_freq == official["dataset_control_freq"][name]
        assert s.instruction == tiny.instruction
        for c in range(3):
            if not keys["image_mask"][c]:
                assert s.frames[c].size == 0
                continue
            imgs = tiny.frames[keys["image_keys"][c]]
            np.testing.assert_array_equal(s.frames[c], np.stack([imgs[max(t - 1, 0)], imgs[t]]))
            assert s.frame_masks[c].tolist() == [t > 0, True]
        s.validate()


def test_registry_matches_official_tables(official):
    for name in NON_RLDS_DATASETS:
        spec = get_spec(name)
        keys = official["dataset_img_keys"][name]
        cams = tuple(k if m else None for k, m in zip(keys["image_keys"][:3], keys["image_mask"][:3], strict=True))
        assert spec.cameras == cams, name
        assert spec.ctrl_freq == official["dataset_control_freq"][name], name


def test_skipped_episode_files_are_counted(converted):
    report = converted["roboset"][2]
    assert report.written == 2
    assert [len(v) for v in report.skipped.values()] == [1, 1]
    assert any("set_12" in p for v in report.skipped.values() for p in v)
    rh = converted["rh20t"][2]
    assert rh.written == 2 and sum(map(len, rh.skipped.values())) == 1  # the 5-joint file


def test_aloha_hdf5_source_matches_official_tfrecord_semantics(tmp_path):
    """Mobile ALOHA HDF5 (JPEG rows zero-padded, as the recorders write them) → same samples."""
    rng = np.random.default_rng(7)
    t = LONG
    qpos, qvel = rng.uniform(-1, 1, (t, 14)), rng.uniform(-1, 1, (t, 14))
    base = rng.uniform(-1, 1, (t, 2))
    src = tmp_path / "src"
    src.mkdir()
    jpegs = {k: [_jpeg(im) for im in _img(rng, t, (8, 8))] for k in ("cam_high", "cam_left_wrist", "cam_right_wrist")}
    with h5py.File(src / "episode_0.hdf5", "w") as f:
        f["observations/qpos"], f["observations/qvel"] = qpos, qvel
        f["action"], f["base_action"] = qpos, base
        f["instruction"] = TEXT
        for k, js in jpegs.items():
            rows = np.zeros((t, max(map(len, js)) + 7), np.uint8)
            for i, j in enumerate(js):
                rows[i, : len(j)] = np.frombuffer(j, np.uint8)
            f[f"observations/images/{k}"] = rows
    with h5py.File(src / "episode_1.hdf5", "w") as f:  # no instruction: skipped like the official converter
        f["observations/qpos"] = qpos
    ds_dir, report, _ = convert_official("aloha_mobile", src, tmp_path / "out", source="aloha-hdf5")
    assert report.written == 1 and list(report.skipped) == ["no /instruction"]
    s = RldsSource(ds_dir, "aloha_mobile").get(5, np.random.default_rng(0))
    q = qpos.astype(np.float32)
    np.testing.assert_allclose(s.state[0, [50, 60, 0, 10, 65, 15]], [q[5, 0], q[5, 6], q[5, 7], q[5, 13],
                                                                       qvel[5, 0], qvel[5, 7]], rtol=1e-6)
    np.testing.assert_allclose(s.state[0, [101, 102]], base[4], rtol=1e-6)
    for c, k in enumerate(("cam_high", "cam_right_wrist", "cam_left_wrist")):
        np.testing.assert_array_equal(s.frames[c][1], _decode(jpegs[k][5]))
    assert s.instruction == TEXT_CLEAN


def test_wrong_dtype_and_missing_key_name_dataset_file_and_key(tmp_path):
    steps = [{"qpos": _tensor(np.zeros(14)), "qvel": _tensor(np.zeros(14, np.float32))}]  # float64 qpos
    _write(tmp_path / "src" / "bad.tfrecord", steps)
    with pytest.raises(ValueError, match=r"aloha_static: .*bad.tfrecord step 0: feature 'qpos' is float64.*float32"):
        convert_official("aloha_static", tmp_path / "src", tmp_path / "out")
    steps = [{"qpos": _tensor(np.zeros(14, np.float32)), "qvel": _tensor(np.zeros(14, np.float32))}]
    _write(tmp_path / "src" / "bad.tfrecord", steps)
    with pytest.raises(KeyError, match=r"bad.tfrecord step 0: step has no feature 'cam_high'"):
        convert_official("aloha_static", tmp_path / "src", tmp_path / "out", overwrite=True)


def test_reader_never_imports_tensorflow(converted):
    ds_dir = converted["rh20t"][1]
    code = textwrap.dedent(f"""
        import sys, numpy as np
        from rdt_jax.data.rlds.source import RldsSource
        s = RldsSource({str(ds_dir)!r}, "rh20t").get(3, np.random.default_rng(0))
        assert s.frames[0].shape == (2, 6, 8, 3), s.frames[0].shape
        assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_convert_script_official_tfrecord_format(tmp_path, capsys):
    import importlib.util

    script = pathlib.Path(__file__).resolve().parents[3] / "scripts" / "convert_rlds.py"
    spec = importlib.util.spec_from_file_location("convert_rlds", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    make_calvin(tmp_path / "src", np.random.default_rng(3))
    mod.main(["--format", "official-tfrecord", "--name", "calvin", "--src", str(tmp_path / "src"),
              "--dst", str(tmp_path / "out"), "--image-format", "jpeg"])
    out = capsys.readouterr().out
    assert "calvin: 2 episodes written" in out and f"{LONG} step entries" in out
    s = RldsSource(tmp_path / "out" / "calvin" / "1.0.0", "calvin").get(0, np.random.default_rng(0))
    assert s.frames[0].shape == (2, 6, 6, 3) and s.frames[1].shape == (2, 3, 3, 3)  # JPEG: lossy, shape only
