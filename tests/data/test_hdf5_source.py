"""HDF5 source against values computed by hand from the files (DATA.md §2.1)."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
from hdf5_episodes import color_frame, make_qpos, write_episode, write_instructions

from rdt_jax.data.hdf5_source import EpisodeError, HDF5Source

# Official slot mapping of the 14 qpos columns (written out by hand from DATA.md §2.1 step 9).
SLOTS = [50, 51, 52, 53, 54, 55, 60, 0, 1, 2, 3, 4, 5, 10]
STATE_DIV = np.array([1] * 6 + [4.7908] + [1] * 6 + [4.7888])
ACTION_DIV = np.array([1] * 6 + [11.8997] + [1] * 6 + [13.9231])


def hand_first_idx(q: np.ndarray) -> int:
    for t in range(q.shape[0]):
        if max(abs(float(q[t, j]) - float(q[0, j])) for j in range(q.shape[1])) > 0.01:
            return t
    raise AssertionError("never moves")


@pytest.fixture
def episode_dir(tmp_path):
    rng = np.random.default_rng(0)
    eps = {}
    for i, (layout, t, fm) in enumerate([("vlen", 140, 6), ("rows", 128, 1), ("opaque", 150, 20), ("raw", 131, 3)]):
        q = make_qpos(t, fm, rng)
        a = (q * 1.7 + 0.1).astype(np.float32)
        path = write_episode(tmp_path / "task_a" / f"ep{i}.hdf5", q, a, layout=layout)
        eps[str(path)] = (q, a)
    write_instructions(tmp_path / "task_a")
    return tmp_path, eps


def test_scan_lengths_first_idx_stats(episode_dir, small_robot):
    d, eps = episode_dir
    src = HDF5Source(d, small_robot)
    assert [e.path for e in src.episodes] == sorted(eps)
    for e in src.episodes:
        q, _ = eps[e.path]
        assert e.num_steps == q.shape[0]
        assert e.first_idx == hand_first_idx(q)
        s = q.astype(np.float64) / STATE_DIV
        np.testing.assert_allclose(e.state_mean, s.sum(0) / len(s), rtol=1e-12)
        np.testing.assert_allclose(e.state_std, np.sqrt(((s - s.mean(0)) ** 2).mean(0)), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(e.state_norm, np.sqrt((s * s).mean(0)), rtol=1e-12)


@pytest.mark.parametrize("ep_no", [0, 1, 2, 3])
def test_samples_equal_hand_values(episode_dir, small_robot, ep_no):
    d, eps = episode_dir
    src = HDF5Source(d, small_robot)
    ep = src.episodes[ep_no]
    q, a = eps[ep.path]
    t_len, fi = q.shape[0], hand_first_idx(q)
    for step in sorted({fi - 1, fi, fi + 1, t_len - 64, t_len - 10, t_len - 1}):
        s = src.sample_at(ep_no, step)
        assert s.step_id == step and s.dataset_name == "agilex" and s.ctrl_freq == 25.0
        # state: the raw row / divisor, in its official slot, float64
        want_state = np.zeros((1, 128))
        for j, slot in enumerate(SLOTS):
            want_state[0, slot] = float(q[step, j]) / STATE_DIV[j]
        np.testing.assert_array_equal(s.state, want_state)
        assert s.state.dtype == np.float64
        # actions: rows step.. step+63, last row repeated
        for k in range(64):
            row = a[min(step + k, t_len - 1)]
            for j, slot in enumerate(SLOTS):
                assert s.actions[k, slot] == float(row[j]) / ACTION_DIV[j]
        other = np.setdiff1d(np.arange(128), SLOTS)
        assert not s.actions[:, other].any() and not s.state[:, other].any()
        assert np.flatnonzero(s.state_elem_mask).tolist() == sorted(SLOTS)
        # images: exterior, right, left; frames (step−1, step); colours = the RGB written
        valid_len = min(step - (fi - 1) + 1, 2)
        want_mask = [False] * (2 - valid_len) + [True] * valid_len
        cam_of_slot = [0, 2, 1]  # writer order: cam_high, cam_left_wrist, cam_right_wrist
        for c in range(3):
            assert s.frame_masks[c].tolist() == want_mask
            for h, t in enumerate([max(step - 1, 0), step]):
                want = color_frame(t, cam_of_slot[c]).astype(int)
                got = s.frames[c][h].astype(int)
                assert got.shape == want.shape
                # flat-colour interiors (away from the JPEG-blurred edge at column 32); a R/B
                # swap would be off by ≥ 100 in the right half.
                for cols in (slice(0, 24), slice(40, 64)):
                    assert np.abs(got[:, cols] - want[:, cols]).max() <= 4, (c, h, t)


def test_zero_step_repeats_frame_and_masks(tmp_path, small_robot):
    rng = np.random.default_rng(1)
    q = make_qpos(128, 1, rng)
    # frame content depends on t, so step 0 repeated must equal frame 0 twice
    write_episode(tmp_path / "e.hdf5", q, q, layout="raw")
    write_instructions(tmp_path)
    src = HDF5Source(tmp_path, small_robot)
    assert src.episodes[0].first_idx == hand_first_idx(q) == 1
    s = src.sample_at(0, 0)
    for c in range(3):
        np.testing.assert_array_equal(s.frames[c][0], s.frames[c][1])
        assert s.frame_masks[c].tolist() == [False, True]


def test_sampling_weights_and_instructions(episode_dir, small_robot):
    d, eps = episode_dir
    src = HDF5Source(d, small_robot)
    usable = np.array([e.num_steps - hand_first_idx(eps[e.path][0]) + 1 for e in src.episodes], float)
    n = 6000
    counts = np.zeros(len(usable))
    instr = {}
    for i in range(n):
        rng = np.random.default_rng([5, i])
        e, step = src.choose(rng)
        ep = src.episodes[e]
        assert ep.first_idx - 1 <= step <= ep.num_steps - 1
        counts[e] += 1
    p = usable / usable.sum()
    assert np.all(np.abs(counts / n - p) < 4 * np.sqrt(p * (1 - p) / n))
    for i in range(600):
        s = src.get(i, np.random.default_rng([6, i]))
        instr[s.instruction] = instr.get(s.instruction, 0) + 1
    # type uniform (1/3 each), then element uniform within the list
    assert set(instr) == {"pick the cup", "pick cup", "grab the cup", "take the cup"}
    assert abs(instr["pick the cup"] / 600 - 1 / 3) < 0.07 and abs(instr["grab the cup"] / 600 - 1 / 6) < 0.06


def test_embedding_paths_resolved(tmp_path, small_robot):
    q = make_qpos(128, 2, np.random.default_rng(2))
    write_episode(tmp_path / "t" / "e.hdf5", q, q, layout="raw")
    write_instructions(tmp_path / "t", instruction="lang/instr.pt.", simplified=["/abs/x.safetensors"],
                       expanded=["lang/e.safetensors"])
    src = HDF5Source(tmp_path, small_robot)
    seen = {src.get(i, np.random.default_rng(i)).lang_embed_path for i in range(60)}
    t = tmp_path / "t"
    assert seen == {str(t / "lang/instr.pt"), "/abs/x.safetensors", str(t / "lang/e.safetensors")}


def test_index_cache_reused(episode_dir, small_robot, tmp_path, monkeypatch):
    d, _ = episode_dir
    cache = tmp_path / "index.json"
    a = HDF5Source(d, small_robot, index_cache=cache)
    calls = []
    monkeypatch.setattr(HDF5Source, "scan_file", lambda self, p: calls.append(p))
    b = HDF5Source(d, small_robot, index_cache=cache)
    assert calls == []
    def key(src):
        return [(e.path, e.num_steps, e.first_idx) for e in src.episodes]

    assert key(a) == key(b)
    np.testing.assert_array_equal(a.episodes[2].state_std, b.episodes[2].state_std)


# ------------------------------------------------------------------ bad input
def _good(tmp_path, name="good.hdf5", t=130):
    q = make_qpos(t, 3, np.random.default_rng(3))
    write_episode(tmp_path / name, q, q, layout="vlen")
    write_instructions(tmp_path)
    return tmp_path / name, q


def test_truncated_file(tmp_path, small_robot):
    p, _ = _good(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(EpisodeError, match=r"good\.hdf5.*cannot open"):
        HDF5Source(tmp_path, small_robot)


def test_missing_key(tmp_path, small_robot):
    p, _ = _good(tmp_path)
    with h5py.File(p, "a") as f:
        del f["/observations/images/cam_left_wrist"]
    with pytest.raises(EpisodeError, match=r"good\.hdf5: missing key '/observations/images/cam_left_wrist'"):
        HDF5Source(tmp_path, small_robot)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_actions(tmp_path, small_robot, bad):
    p, _ = _good(tmp_path)
    with h5py.File(p, "a") as f:
        f["/action"][17, 4] = bad
    with pytest.raises(EpisodeError, match=r"good\.hdf5: '/action' contains NaN/inf \(first at step 17, column 4\)"):
        HDF5Source(tmp_path, small_robot)


def test_wrong_image_shape(tmp_path, small_robot):
    _good(tmp_path)
    robot = dataclasses.replace(small_robot, image_shape=(480, 640, 3))
    with pytest.raises(EpisodeError, match=r"cam_high' step 0: image shape \(48, 64, 3\), expected \(480, 640, 3\)"):
        HDF5Source(tmp_path, robot)


def test_corrupt_jpeg_at_sample_time(tmp_path, small_robot):
    p, _ = _good(tmp_path)
    with h5py.File(p, "a") as f:
        f["/observations/images/cam_high"][40] = np.full(100, 7, np.uint8)
    src = HDF5Source(tmp_path, small_robot)
    with pytest.raises(EpisodeError, match=r"good\.hdf5: '/observations/images/cam_high' step 40: not a decodable"):
        src.sample_at(0, 41)


def _corrupt_frames(path, steps):
    with h5py.File(path, "a") as f:
        for t in steps:
            f["/observations/images/cam_high"][t] = np.full(100, 7, np.uint8)


def test_bad_frames_at_sample_time_are_redrawn_when_skipping(tmp_path, small_robot, caplog):
    """Frames that fail to decode during training (the scan only decodes frame 0): a strict source stops with
    the file, key and step; a skipping one warns once per bad frame and redraws from the same rng, so the draws
    are a function of the rng alone (what exact resume needs)."""
    bad, _ = _good(tmp_path, "bad.hdf5")
    _good(tmp_path, "good.hdf5")
    _corrupt_frames(bad, range(10, 130))
    strict = HDF5Source(tmp_path, small_robot)
    with pytest.raises(EpisodeError, match=r"bad\.hdf5: '/observations/images/cam_high' step \d+: not a decodable"):
        for i in range(50):
            strict.get(i, np.random.default_rng(i))

    def draws(src):
        return [(s.episode_id, s.step_id) for s in (src.get(i, np.random.default_rng(i)) for i in range(50))]

    src = HDF5Source(tmp_path, small_robot, skip_bad_episodes=True)
    with caplog.at_level("WARNING"):
        first = draws(src)
    assert all(ep.endswith("good.hdf5") or step < 10 for ep, step in first)  # step 10 reads frames 9 and 10
    assert src.bad_samples.count > 0
    assert f"{bad}: '/observations/images/cam_high' step" in caplog.text
    warned, count = len(caplog.records), src.bad_samples.count
    assert draws(src) == first
    assert src.bad_samples.count == 2 * count and len(caplog.records) == warned  # each bad frame named once
    assert draws(HDF5Source(tmp_path, small_robot, skip_bad_episodes=True)) == first


def test_gives_up_when_every_draw_fails(tmp_path, small_robot):
    p, _ = _good(tmp_path)
    src = HDF5Source(tmp_path, small_robot, skip_bad_episodes=True)
    _corrupt_frames(p, range(130))  # after the scan: now no step of the only episode reads
    with pytest.raises(EpisodeError, match=r"64 draws in a row failed to read; the last: .*good\.hdf5"):
        src.get(0, np.random.default_rng(0))


def test_short_and_bad_skipped_and_counted(tmp_path, small_robot):
    _good(tmp_path, "good.hdf5")
    q = make_qpos(100, 3, np.random.default_rng(4))  # shorter than 128: weight 0 as officially
    write_episode(tmp_path / "short.hdf5", q, q, layout="raw")
    (tmp_path / "broken.hdf5").write_bytes(b"not an hdf5 file")
    still = np.zeros((130, 14), np.float32)
    write_episode(tmp_path / "still.hdf5", still, still, layout="raw")
    with pytest.raises(EpisodeError, match=r"broken\.hdf5"):
        HDF5Source(tmp_path, small_robot)
    src = HDF5Source(tmp_path, small_robot, skip_bad_episodes=True)
    assert [e.path for e in src.episodes] == [str(tmp_path / "good.hdf5")]
    assert src.report.counts() == {"too_short": 1, "error": 2}
    assert sorted(src.report.skipped["error"]) == [str(tmp_path / "broken.hdf5"), str(tmp_path / "still.hdf5")]
    for i in range(20):
        assert src.get(i, np.random.default_rng(i)).episode_id.endswith("good.hdf5")


def test_cached_errors_do_not_make_a_strict_source_skip(tmp_path, small_robot):
    """An index cache written by a skipping scan (compute_stats --skip-bad) holds error entries; a strict
    source reading the same cache still raises the file's error instead of skipping it."""
    _good(tmp_path, "good.hdf5")
    (tmp_path / "broken.hdf5").write_bytes(b"not an hdf5 file")
    cache = tmp_path / "index.json"
    HDF5Source(tmp_path, small_robot, skip_bad_episodes=True, index_cache=cache)
    with pytest.raises(EpisodeError, match=r"broken\.hdf5.*cannot open"):
        HDF5Source(tmp_path, small_robot, index_cache=cache)
    again = HDF5Source(tmp_path, small_robot, skip_bad_episodes=True, index_cache=cache)
    assert again.report.counts() == {"error": 1}


def test_never_moving_is_an_error(tmp_path, small_robot):
    write_instructions(tmp_path)
    still = np.zeros((130, 14), np.float32)
    write_episode(tmp_path / "still.hdf5", still, still, layout="raw")
    with pytest.raises(EpisodeError, match=r"still\.hdf5: '/observations/qpos' never moves"):
        HDF5Source(tmp_path, small_robot)


def test_missing_instruction_file(tmp_path, small_robot):
    q = make_qpos(130, 3, np.random.default_rng(3))
    write_episode(tmp_path / "x.hdf5", q, q, layout="raw")
    with pytest.raises(EpisodeError, match=r"expanded_instruction_gpt-4-turbo\.json not found"):
        HDF5Source(tmp_path, small_robot)


@pytest.mark.parametrize("content", [None, '["pick the cup"]'])
def test_bad_instruction_folder_is_named_and_skippable(tmp_path, small_robot, caplog, content):
    """A task folder without its instruction JSON, or with one that is not an object, stops the scan naming
    the file; with skip_bad_episodes that folder's episodes are left out (one warning), the others kept."""
    _good(tmp_path / "task_a")
    q = make_qpos(130, 3, np.random.default_rng(5))
    for i in range(2):
        write_episode(tmp_path / "task_b" / f"e{i}.hdf5", q, q, layout="raw")
    jpath = tmp_path / "task_b" / "expanded_instruction_gpt-4-turbo.json"
    if content is not None:
        jpath.write_text(content)
    why = "not found" if content is None else "expected a JSON object with keys .* got a list"
    with pytest.raises(EpisodeError, match=rf"{jpath.name}.*{why}"):
        HDF5Source(tmp_path, small_robot)
    with caplog.at_level("WARNING"):
        src = HDF5Source(tmp_path, small_robot, skip_bad_episodes=True)
    assert [e.path for e in src.episodes] == [str(tmp_path / "task_a" / "good.hdf5")]
    assert sorted(src.report.skipped["error"]) == [str(tmp_path / "task_b" / f"e{i}.hdf5") for i in range(2)]
    assert caplog.text.count(f"skipping the episodes of {tmp_path / 'task_b'}") == 1


@pytest.mark.parametrize("camera", ["group", "scalar"])
def test_camera_key_that_is_not_a_frame_dataset(tmp_path, small_robot, camera):
    p, _ = _good(tmp_path)
    key = small_robot.camera_keys[0]
    with h5py.File(p, "a") as f:
        del f[key]
        if camera == "group":
            f.create_group(key)
        else:
            f[key] = 1
    what = "a group" if camera == "group" else r"shape \(\)"
    with pytest.raises(EpisodeError, match=rf"good\.hdf5: '{key}' is {what}, expected a dataset of 130 frames"):
        HDF5Source(tmp_path, small_robot)
    _good(tmp_path, "other.hdf5")
    assert [e.path for e in HDF5Source(tmp_path, small_robot, skip_bad_episodes=True).episodes] == [
        str(tmp_path / "other.hdf5")]


# ------------------------------------------------------------------ caches
def _same_sample(a, b) -> None:
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, tuple):
            assert all(np.array_equal(p, q) and p.dtype == q.dtype for p, q in zip(x, y, strict=True))
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        else:
            assert x == y, name


def test_cached_episode_gives_identical_samples(episode_dir, small_robot):
    """Episode arrays and open files are cached: repeated, evicted and fresh reads agree."""
    d, _ = episode_dir
    cached = HDF5Source(d, small_robot)
    tiny = HDF5Source(d, small_robot, episode_cache_size=1, max_open_files=1)  # evicts every time
    for i in range(40):
        a = cached.get(i, np.random.default_rng([7, i]))
        b = tiny.get(i, np.random.default_rng([7, i]))
        c = HDF5Source(d, small_robot).get(i, np.random.default_rng([7, i]))  # cold caches
        _same_sample(a, b)
        _same_sample(a, c)
    assert len(cached._arrays) == 4 and len(tiny._arrays) == 1
    assert len(tiny._local.files.files) == 1
    s = cached.sample_at(0, cached.episodes[0].first_idx)
    s.state[...] = 0  # samples own their arrays: the cache stays intact
    _same_sample(cached.sample_at(0, cached.episodes[0].first_idx), tiny.sample_at(0, tiny.episodes[0].first_idx))


def test_cached_source_pickles_and_closes(episode_dir, small_robot):
    import pickle

    d, _ = episode_dir
    src = HDF5Source(d, small_robot)
    a = src.get(3, np.random.default_rng(3))
    copy = pickle.loads(pickle.dumps(src))  # open files are not pickled; the copy reopens
    _same_sample(a, copy.get(3, np.random.default_rng(3)))
    src.close()
    _same_sample(a, src.get(3, np.random.default_rng(3)))  # reopens after close()


def test_cached_source_threads_agree(episode_dir, small_robot):
    from concurrent.futures import ThreadPoolExecutor

    d, _ = episode_dir
    src = HDF5Source(d, small_robot, episode_cache_size=2, max_open_files=2)
    ref = [HDF5Source(d, small_robot).get(i, np.random.default_rng(i)) for i in range(24)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: src.get(i, np.random.default_rng(i)), range(24)))
    for a, b in zip(ref, got, strict=True):
        _same_sample(a, b)


def test_episode_changed_after_scan_names_file_and_key(tmp_path, small_robot):
    """The arrays are read at first use; a file broken since the scan raises a clear error."""
    p, _ = _good(tmp_path)
    src = HDF5Source(tmp_path, small_robot)
    with h5py.File(p, "a") as f:
        f["/action"][20, 3] = np.nan
    with pytest.raises(EpisodeError, match=r"good\.hdf5: '/action' contains NaN/inf \(first at step 20, column 3\)"):
        src.sample_at(0, 30)
    src.close()  # this thread's open handle: HDF5 refuses to open a file for writing twice
    with h5py.File(p, "a") as f:
        del f["/observations/qpos"]
    fresh = HDF5Source.__new__(HDF5Source)
    fresh.__setstate__(src.__getstate__())
    with pytest.raises(EpisodeError, match=r"good\.hdf5: missing key '/observations/qpos'"):
        fresh.sample_at(0, 30)


def test_corrupt_jpeg_in_cached_file(tmp_path, small_robot):
    """A bad frame in a file that is already open (cached) still names the file, key and step."""
    p, _ = _good(tmp_path)
    with h5py.File(p, "a") as f:
        f["/observations/images/cam_right_wrist"][60] = np.full(100, 7, np.uint8)
    src = HDF5Source(tmp_path, small_robot)
    src.sample_at(0, 50)  # opens the file and caches its datasets
    want = r"good\.hdf5: '/observations/images/cam_right_wrist' step 60: not a decodable"
    with pytest.raises(EpisodeError, match=want):
        src.sample_at(0, 61)
