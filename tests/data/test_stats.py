"""Dataset statistics (DATA.md §3) by hand, and the compute_stats.py CLI on ALOHA files."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hdf5_episodes import make_qpos, write_episode, write_instructions

from rdt_jax.data import stats
from rdt_jax.data.stats import compute_dataset_stats

SLOTS = [50, 51, 52, 53, 54, 55, 60, 0, 1, 2, 3, 4, 5, 10]
STATE_DIV = np.array([1] * 6 + [4.7908] + [1] * 6 + [4.7888])


def hand_stats(x: np.ndarray) -> dict:
    n = x.shape[0]
    out = {"mean": [], "std": []}
    for j in range(x.shape[1]):
        col = [float(v) for v in x[:, j]]
        nz = [v for v in col if abs(v) > 1e-8]
        n_nz = max(len(nz), 1)
        sz, sz2 = sum(nz), sum(v * v for v in nz)
        out["mean"].append(sum(col) / n)
        out["std"].append(np.sqrt(max(sz2 / n_nz - (sz / n) ** 2 * (n / n_nz), 0.0)))
    return out


def test_nonzero_aware_std():
    rng = np.random.default_rng(0)
    a = np.zeros((10, 128))
    a[:, 3] = rng.normal(size=10)
    a[:, 4] = [0, 0, 1, 2, 3, 0, 5, 0, 0, 1]  # exact zeros enlarge the std
    b = np.zeros((5, 128))
    b[:, 3] = rng.normal(size=5)
    b[:, 4] = [4, 0, 0, 0, 2]
    got = compute_dataset_stats("d", [a, b])
    want = hand_stats(np.concatenate([a, b]))
    np.testing.assert_allclose(got["state_mean"], want["mean"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["state_std"], want["std"], rtol=1e-10, atol=1e-15)
    x3 = np.concatenate([a, b])[:, 3]
    assert abs(got["state_std"][3] - x3.std()) < 1e-12  # no zeros: the plain population std
    assert got["state_std"][4] > np.concatenate([a, b])[:, 4].std()
    assert got["state_min"][4] == 0 and got["state_max"][4] == 5 and got["state_std"][100] == 0
    assert got["dataset_name"] == "d" and all(len(got[k]) == 128 for k in got if k != "dataset_name")


def test_compute_stats_cli(tmp_path):
    rng = np.random.default_rng(1)
    qs = []
    for i, (t, fm) in enumerate([(130, 4), (128, 1), (60, 2)]):  # the 60-step one is skipped (too short)
        q = make_qpos(t, fm, rng, dtype=np.float64)
        q[:, 2] = 0.0  # an exactly-zero joint
        write_episode(tmp_path / "d" / f"e{i}.hdf5", q, q, layout="raw")
        qs.append(q)
    write_instructions(tmp_path / "d")
    out = tmp_path / "stat.json"
    out.write_text(json.dumps({"other": {"dataset_name": "other", **{k: [0.0] * 128 for k in
                                ("state_mean", "state_std", "state_min", "state_max")}}}))
    r = subprocess.run([sys.executable, "scripts/compute_stats.py", "--format", "hdf5", "--data-dir",
                        str(tmp_path / "d"), "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"wrote statistics of agilex to {out}" in r.stderr  # importing rdt_jax must not silence it
    stats = json.loads(out.read_text())
    assert set(stats) == {"other", "agilex"}
    # by hand: states from first_idx − 1 on, gripper-divided, into the official slots
    rows = []
    for q in qs[:2]:
        fi = next(t for t in range(len(q)) if np.max(np.abs(q[t] - q[0])) > 0.01)
        s = np.zeros((len(q) - fi + 1, 128))
        s[:, SLOTS] = q[fi - 1:] / STATE_DIV
        rows.append(s)
    want = hand_stats(np.concatenate(rows))
    np.testing.assert_allclose(stats["agilex"]["state_mean"], want["mean"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(stats["agilex"]["state_std"], want["std"], rtol=1e-8, atol=1e-14)
    assert stats["agilex"]["state_std"][52] == 0.0  # column 2 → slot 52, all zeros


def test_compute_stats_cli_refuses_unknown_options_and_a_bad_output_file(tmp_path):
    """A misspelt option is an error, not silently dropped; an --output that is not a dataset_stat.json is
    refused before the scan (the result would be lost at the merge), and left as it was."""
    data = tmp_path / "d"
    write_episode(data / "e0.hdf5", *(2 * [make_qpos(130, 4, np.random.default_rng(0), dtype=np.float64)]),
                  layout="raw")
    write_instructions(data)
    out = tmp_path / "stat.json"

    def run(*extra):
        return subprocess.run([sys.executable, "scripts/compute_stats.py", "--data-dir", str(data), "--output",
                               str(out), *extra], capture_output=True, text=True)

    r = run("--dataset_name", "my_robot")
    assert r.returncode == 2 and "unrecognized arguments: --dataset_name my_robot" in r.stderr
    out.write_text("not json")
    r = run("--skip-bad-episodes")
    assert r.returncode == 2 and f"--output {out}: cannot be updated" in r.stderr and "not JSON" in r.stderr
    assert out.read_text() == "not json"
    out.unlink()
    assert run("--skip-bad-episodes").returncode == 0 and "agilex" in json.loads(out.read_text())


def test_official_stats_file_with_stale_entries(shared_dir, tmp_path):
    """The shipped dataset_stat.json has 89-long entries for two datasets it never trains on: loading it for
    the datasets in use works, asking for a stale one names it, and merging new entries keeps the rest."""
    official = shared_dir / "reference" / "data" / "dataset_stat.json"
    got = stats.load_stats(official, names=["agilex", "fractal20220817_data"])
    assert len(got["agilex"]["state_mean"]) == 128
    with pytest.raises(ValueError, match=r"bridge\.state_mean must be a list of 128 numbers, got 89"):
        stats.load_stats(official, names=["bridge"])
    with pytest.raises(KeyError, match="no statistics for datasets"):
        stats.load_stats(official, names=["not_a_dataset"])
    copy = tmp_path / "dataset_stat.json"
    copy.write_bytes(official.read_bytes())
    new = {"my_robot": {"dataset_name": "my_robot", **{k: [0.0] * 128 for k in
                                                        ("state_mean", "state_std", "state_min", "state_max")}}}
    merged = stats.write_stats(copy, new)
    assert "my_robot" in merged and len(merged["bridge"]["state_mean"]) == 89
    assert stats.load_stats(copy, names=["my_robot"])["my_robot"]["state_max"] == [0.0] * 128
