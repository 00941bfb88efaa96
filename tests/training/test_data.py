"""The training data bundle: instruction embeddings are checked before training starts."""

import dataclasses
import json
import re

import h5py
import numpy as np
import pytest

from rdt_jax.data import language
from rdt_jax.data.hdf5_source import EpisodeError
from rdt_jax.training.config import DataConfig
from rdt_jax.training.data import build_data, demo_robot, write_demo_dataset


def _demo_as_hdf5(tmp_path, episodes: int):
    """Demo episodes written as a user's HDF5 directory, with their robot config as a JSON file."""
    demo = DataConfig(kind="demo", demo_episodes=episodes, demo_episode_len=24, demo_image_size=16)
    robot = demo_robot(demo, horizon=8)
    root = write_demo_dataset(tmp_path / "episodes", demo, robot)
    robot_json = tmp_path / "robot.json"
    robot_json.write_text(json.dumps(robot.to_json_dict()))
    return robot, root, robot_json


def test_missing_instruction_embeddings_are_found_before_training(tmp_path):
    robot, root, robot_json = _demo_as_hdf5(tmp_path, 3)
    keys = robot.instruction_keys
    # Episode 1's instructions are text (looked up in the store), episode 2 names a file that does not exist.
    (root / "episode_001" / robot.instruction_file).write_text(json.dumps({k: ["pick the cup"] for k in keys}))
    (root / "episode_002" / robot.instruction_file).write_text(json.dumps({k: "gone.pt" for k in keys}))
    store = language.EmbeddingStore(tmp_path / "store")
    for run in ("run", "run2"):
        (tmp_path / run).mkdir()
    cfg = DataConfig(kind="hdf5", hdf5_dir=str(root), robot=str(robot_json), lang_embed_dir=str(store.directory),
                     num_threads=1, prefetch=2)
    build = lambda: build_data(cfg, output_dir=str(tmp_path / "run"), local_batch=2, local_sample_batch=0,
                               image_size=16, horizon=8, seed=0)
    with pytest.raises(FileNotFoundError) as err:
        build()
    msg = str(err.value)
    assert msg.startswith(f"{2 * len(keys)} instruction embedding(s) missing")
    assert f"episode_001/{robot.instruction_file}: instruction 'pick the cup' has no embedding in" in msg
    assert f"episode_002/{robot.instruction_file}: embedding file {root / 'episode_002' / 'gone.pt'} not found" in msg
    # The message ends with the command that encodes the text instructions for exactly this data.
    assert msg.endswith(f"\nencode the text instructions with: python scripts/encode_lang.py --t5-dir T5_DIR "
                        f"--hdf5-dirs {root} --robot {robot_json} --store-dir {store.directory}")
    with pytest.raises(FileNotFoundError, match=r"(?s)is text and no --data\.lang-embed-dir is given.*"
                                                r"--store-dir LANG_DIR \(then train with --data\.lang-embed-dir "
                                                r"LANG_DIR\)$"):
        build_data(dataclasses.replace(cfg, lang_embed_dir=None), output_dir=str(tmp_path / "run2"), local_batch=2,
                   local_sample_batch=0, image_size=16, horizon=8, seed=0)

    store.put("pick the cup", np.zeros((5, language.LANG_DIM), np.float32))
    (root / "episode_002" / robot.instruction_file).write_text(json.dumps({k: "lang.safetensors" for k in keys}))
    language.save_embedding(root / "episode_002" / "lang.safetensors", np.ones((3, language.LANG_DIM), np.float32),
                            "task")
    batch = next(iter(build().train))
    assert batch["lang_embeds"].shape[0] == 2


def test_skip_bad_episodes_leaves_out_and_names_unreadable_files(tmp_path, caplog):
    demo = DataConfig(kind="demo", demo_episodes=2, demo_episode_len=24, demo_image_size=16)
    robot = demo_robot(demo, horizon=8)
    root = write_demo_dataset(tmp_path / "episodes", demo, robot)
    robot_json = tmp_path / "robot.json"
    robot_json.write_text(json.dumps(robot.to_json_dict()))
    junk = root / "episode_009" / "episode_009.hdf5"
    junk.parent.mkdir()
    junk.write_bytes(b"not an hdf5 file")
    cfg = DataConfig(kind="hdf5", hdf5_dir=str(root), robot=str(robot_json), num_threads=1, prefetch=2)

    def build(cfg, run):
        (tmp_path / run).mkdir()
        return build_data(cfg, output_dir=str(tmp_path / run), local_batch=2, local_sample_batch=0, image_size=16,
                          horizon=8, seed=0)

    with pytest.raises(EpisodeError, match=re.escape(f"{junk}: cannot open HDF5 file")):
        build(cfg, "strict")
    with caplog.at_level("WARNING"):
        data = build(dataclasses.replace(cfg, skip_bad_episodes=True), "skipping")
    assert str(junk) in caplog.text and "unreadable files" in caplog.text
    assert next(iter(data.train))["actions"].shape[0] == 2


def test_skip_bad_episodes_is_refused_for_demo_data():
    with pytest.raises(ValueError, match=r"--data\.skip-bad-episodes"):
        DataConfig(kind="demo", skip_bad_episodes=True)
    assert DataConfig(kind="rlds", rlds_dirs=("d",), skip_bad_episodes=True).skip_bad_episodes


def test_demo_dataset_is_rewritten_when_its_settings_change(tmp_path):
    """A run directory's demo episodes are reused only if they were made with the same settings (an audit
    trained on 4 old 40-step episodes while train_config.json said 8 of 60)."""
    demo = DataConfig(kind="demo", demo_episodes=3, demo_episode_len=24, demo_image_size=16)
    robot = demo_robot(demo, horizon=8)
    root = write_demo_dataset(tmp_path / "episodes", demo, robot)
    first = (root / "episode_000" / "episode_000.hdf5").stat().st_mtime_ns
    assert write_demo_dataset(root, demo, robot) == root
    assert (root / "episode_000" / "episode_000.hdf5").stat().st_mtime_ns == first  # same settings: reused
    more = dataclasses.replace(demo, demo_episodes=2, demo_episode_len=30)
    write_demo_dataset(root, more, robot)
    assert sorted(p.name for p in root.glob("episode_*")) == ["episode_000", "episode_001"]
    with h5py.File(root / "episode_000" / "episode_000.hdf5") as f:
        assert f["/action"].shape == (30, 14)


@pytest.mark.parametrize("content, message", [
    ("{bad", r"stats\.json: not JSON"),
    (json.dumps({"agilex": {"state_mean": [0.0] * 128}}), r"stats\.json: agilex has no state_std"),
    (json.dumps({"agilex": {k: [0.0] * 127 + [float("nan")] for k in ("state_mean", "state_std", "state_min",
                                                                        "state_max")}}),
     r"stats\.json: agilex\.state_mean holds NaN/inf"),
    (json.dumps({"other": {}}), r"stats\.json: no statistics for datasets \['agilex'\]"),
])
def test_malformed_stats_file_is_a_config_error_naming_it(tmp_path, content, message):
    """train.py prints ConfigErrors as one line; each of these was a traceback (one named no file, one said
    'got tuple' for a missing key, NaN statistics were only found as a NaN loss)."""
    from rdt_jax.training.config import ConfigError

    demo = DataConfig(kind="demo", demo_episodes=2, demo_episode_len=24, demo_image_size=16,
                      stats_file=str(tmp_path / "stats.json"))
    (tmp_path / "stats.json").write_text(content)
    with pytest.raises(ConfigError, match=rf"^--data\.stats-file: .*{message}"):
        build_data(demo, output_dir=str(tmp_path / "run"), local_batch=2, local_sample_batch=0, image_size=16,
                   horizon=8, seed=0)


def test_embeddings_longer_than_max_lang_len_are_found_before_training(tmp_path):
    from rdt_jax.training.config import ConfigError
    from rdt_jax.training.data import DEMO_LANG_LEN

    _, root, robot_json = _demo_as_hdf5(tmp_path, 2)
    cfg = DataConfig(kind="hdf5", hdf5_dir=str(root), robot=str(robot_json), max_lang_len=DEMO_LANG_LEN - 1,
                     num_threads=1, prefetch=2)
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=rf"lang\.safetensors has {DEMO_LANG_LEN} tokens, more than "
                                          rf"--data\.max-lang-len {DEMO_LANG_LEN - 1}"):
        build_data(cfg, output_dir=str(tmp_path / "run"), local_batch=2, local_sample_batch=0, image_size=16,
                   horizon=8, seed=0)
