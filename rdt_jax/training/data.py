"""Adapters from the training config to the data pipeline (rdt_jax.data), plus the built-in demo dataset.

The demo dataset is a few dozen tiny ALOHA-format HDF5 episodes written on the fly (no download).
Each of a few tasks (one random "language embedding" and one scene colour each) names a target pose;
an episode moves the 14 joints smoothly from a random start pose towards its task's target. The next
action chunk is therefore a deterministic function of the state and the instruction, so a small model
learns it in minutes, and validation on held-out episodes (unseen start poses) measures what was
learnt rather than what was memorised. The data goes through exactly the same HDF5 source, sample
transform and grain mixture as real fine-tuning data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import h5py
import numpy as np

from rdt_jax.data import language, stats
from rdt_jax.data.hdf5_source import HDF5Source
from rdt_jax.data.pipeline import PipelineConfig, build_pipeline, load_weights, per_episode_weights
from rdt_jax.data.robot_config import DEFAULT_ROBOT, RobotConfig, load_robot_config
from rdt_jax.data.schema import BatchConfig
from rdt_jax.data.transform import SampleTransform, TransformConfig
from rdt_jax.training.config import ConfigError, DataConfig

DEMO_LANG_LEN = 5

T = TypeVar("T")

if TYPE_CHECKING:  # the rlds extra is optional
    from rdt_jax.data.rlds.source import RldsSource


def _listed(problems: Sequence[str], what: str) -> str:
    """``"N <what>:"`` and the first ten problems, one per line (the rest counted)."""
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return f"{len(problems)} {what}:\n  " + "\n  ".join(problems[:10]) + more


def check_embedding_lengths(paths: Iterable[tuple[str, str | os.PathLike]], max_lang_len: int | None) -> None:
    """Each ``(where, embedding file)`` reads as (L, 4096) with L <= ``max_lang_len``: a ConfigError listing
    the ones that do not, before training (a batch would fail on them when it first draws them)."""
    if max_lang_len is None:
        return
    bad, seen = [], set()
    for where, path in paths:
        if path in seen:
            continue
        seen.add(path)
        try:
            n = language.embedding_length(path)
        except ValueError as e:
            bad.append(f"{where}: {e}")
            continue
        if n > max_lang_len:
            bad.append(f"{where}: {path} has {n} tokens, more than --data.max-lang-len {max_lang_len}")
    if bad:
        raise ConfigError(_listed(bad, "instruction embedding(s) unusable"))


def check_instruction_embeddings(src: HDF5Source, store: language.EmbeddingStore | None, *,
                                 data_dir: str | os.PathLike | None = None, robot: str | None = None,
                                 max_lang_len: int | None = None) -> None:
    """Every instruction of every episode has its embedding (of at most ``max_lang_len`` tokens), checked
    before training rather than when a batch first draws it (possibly hours in). `data_dir` and `robot`
    (the --data.robot value) only fill in the scripts/encode_lang.py command that the error message gives
    for text instructions."""
    missing, found = [], []
    any_text = False
    for jpath, text, path in src.instructions():
        if path is not None:
            if not os.path.isfile(path):
                missing.append(f"{jpath}: embedding file {path} not found")
            else:
                found.append((jpath, path))
        elif store is None:
            any_text = True
            missing.append(f"{jpath}: instruction {text!r} is text and no --data.lang-embed-dir is given")
        elif not store.path(text).is_file():
            any_text = True
            missing.append(f"{jpath}: instruction {text!r} has no embedding in {store.directory} "
                           f"(expected {store.path(text).name})")
        else:
            found.append((jpath, store.path(text)))
    if missing:
        # One exact command, once, rather than a hint per line: it encodes every text variant at once.
        hint = ""
        if any_text:
            store_dir = shlex.quote(str(store.directory)) if store is not None else "LANG_DIR"
            cmd = ["python scripts/encode_lang.py --t5-dir T5_DIR --hdf5-dirs",
                   shlex.quote(str(data_dir)) if data_dir is not None else "DIR"]
            if robot is not None and robot != DEFAULT_ROBOT:
                cmd += ["--robot", shlex.quote(robot)]
            if src.skip_bad_episodes:
                cmd.append("--skip-bad-episodes")
            cmd += ["--store-dir", store_dir]
            hint = f"\nencode the text instructions with: {' '.join(cmd)}"
            if store is None:
                hint += f" (then train with --data.lang-embed-dir {store_dir})"
        raise FileNotFoundError(_listed(missing, "instruction embedding(s) missing") + hint)
    check_embedding_lengths(found, max_lang_len)


def check_rlds_embeddings(sources: Sequence[RldsSource], store: language.EmbeddingStore,
                          max_lang_len: int | None = None) -> None:
    """Every instruction of the RLDS datasets has an embedding in ``store`` (of at most ``max_lang_len``
    tokens), from the instructions their step indexes record; an index built before they were recorded is
    named in a warning and not checked (reading every episode again would take long on large datasets)."""
    missing, found, unchecked = [], [], []
    for src in sources:
        if src.index.instructions is None:
            unchecked.append(str(src.builder_dir))
            continue
        for text in src.index.instructions:
            path = store.path(text)
            if path.is_file():
                found.append((src.dataset_name, path))
            else:
                missing.append(f"{src.dataset_name}: instruction {text!r} has no embedding in {store.directory} "
                               f"(expected {path.name})")
    if unchecked:
        print(f"[rdt-jax] warning: the step indexes of {', '.join(unchecked)} do not record instructions, so their "
              "embeddings are not checked before training; rebuild them with scripts/convert_rlds.py --dst DIR "
              "--index-only", flush=True)
    if missing:
        dirs = " ".join(shlex.quote(str(s.builder_dir)) for s in sources)
        raise FileNotFoundError(
            _listed(missing, "instruction embedding(s) missing")
            + f"\nencode them with: python scripts/encode_lang.py --t5-dir T5_DIR --rlds-dirs {dirs} --store-dir "
            f"{shlex.quote(str(store.directory))}")
    check_embedding_lengths(found, max_lang_len)


def demo_robot(cfg: DataConfig, horizon: int) -> RobotConfig:
    base = load_robot_config("aloha_agilex")
    return dataclasses.replace(base, name="demo_aloha", image_shape=(cfg.demo_image_size, cfg.demo_image_size, 3),
                               jpeg_color="rgb", horizon=horizon, min_episode_len=horizon // 2)


DEMO_GRIPPERS = (6, 13)  # aloha_agilex columns; raw gripper openings are ~5x/12x the divided state/action
DEMO_RATE = 0.05  # fraction of the remaining distance covered per step: a 16-step chunk covers 56 %


def demo_tasks(num_tasks: int, seed: int = 0) -> list[np.ndarray]:
    """Each task ("instruction") is a target pose (14 raw joint values)."""
    rng = np.random.default_rng([seed, 4243])
    goals = []
    for _ in range(num_tasks):
        goal = rng.uniform(-0.8, 0.8, 14)
        goal[list(DEMO_GRIPPERS)] = rng.uniform(0.5, 4.5, len(DEMO_GRIPPERS))  # openings are positive
        goals.append(goal)
    return goals


def demo_trajectory(goal: np.ndarray, start: np.ndarray, num_steps: int) -> np.ndarray:
    """(num_steps, 14) raw joint positions moving smoothly from ``start`` towards the task's ``goal``,
    covering a fixed fraction of the remaining distance per step.

    The next positions depend only on the current ones and the goal (q' = q + rate * (goal - q)), so an
    action chunk is a smooth, deterministic function of the state and the instruction: learnable in
    minutes, and it generalises to start poses never seen in training."""
    t = np.arange(num_steps)[:, None]
    return goal + (start - goal) * (1.0 - DEMO_RATE) ** t


def write_demo_dataset(root: str | pathlib.Path, cfg: DataConfig, robot: RobotConfig, seed: int = 0,
                       *, num_episodes: int | None = None, episode_seed: int = 0) -> pathlib.Path:
    """Writes ``num_episodes`` (default ``cfg.demo_episodes``) episodes under ``root`` (idempotent: an
    existing complete set made with the same settings is reused, one made with others is replaced). Episode
    ``e`` performs task ``e % cfg.demo_tasks`` (reach its target pose) from a random start pose;
    ``episode_seed`` draws a different set of starts (held-out validation episodes) for the same tasks."""
    root = pathlib.Path(root)
    done = root / "COMPLETE"
    made_with = {"episodes": cfg.demo_episodes if num_episodes is None else num_episodes,
                 "episode_len": cfg.demo_episode_len, "image_size": cfg.demo_image_size, "tasks": cfg.demo_tasks,
                 "seed": seed, "episode_seed": episode_seed, "cameras": list(robot.camera_keys)}
    if done.exists():
        try:
            if json.loads(done.read_text()) == made_with:
                return root
        except json.JSONDecodeError:  # an older run's plain marker: its settings are unknown
            pass
        done.unlink()
        for old in root.glob("episode_*"):  # only what this function writes
            shutil.rmtree(old)
    rng = np.random.default_rng([seed, 4242, episode_seed])
    t_len, s = cfg.demo_episode_len, cfg.demo_image_size
    goals = demo_tasks(cfg.demo_tasks, seed)
    task_rng = np.random.default_rng([seed, 4244])  # one instruction embedding and colour per task
    task_emb = [task_rng.normal(0, 1, (DEMO_LANG_LEN, language.LANG_DIM)).astype(np.float32) for _ in goals]
    task_colour = [task_rng.integers(40, 215, 3) for _ in goals]
    for e in range(cfg.demo_episodes if num_episodes is None else num_episodes):
        task = e % len(goals)
        d = root / f"episode_{e:03d}"
        d.mkdir(parents=True, exist_ok=True)
        start = rng.uniform(-0.8, 0.8, 14)
        start[list(DEMO_GRIPPERS)] = rng.uniform(0.5, 4.5, len(DEMO_GRIPPERS))
        curve = demo_trajectory(goals[task], start, t_len + 1)
        qpos, action = curve[:-1], curve[1:]  # the action is the next joint position
        with h5py.File(d / f"episode_{e:03d}.hdf5", "w") as f:
            f["/observations/qpos"] = qpos.astype(np.float64)
            f["/action"] = action.astype(np.float64)
            # The scene's colour names the task. Nothing in the pictures tells the time or the episode:
            # with them the small model memorises the training episodes instead of learning the motion.
            frames = np.broadcast_to(task_colour[task].astype(np.uint8), (t_len, s, s, 3))
            for key in robot.camera_keys:
                f[key] = frames
        language.save_embedding(d / "lang.safetensors", task_emb[task], f"demo task {task}")
        (d / robot.instruction_file).write_text(json.dumps(
            {key: "lang.safetensors" for key in robot.instruction_keys}))
    done.write_text(json.dumps(made_with) + "\n")
    return root


@dataclasses.dataclass
class DataBundle:
    """What the loop needs from the data side."""

    train: Any  # grain IterDataset of training batches (this process's share)
    sample: Any | None  # validation batches (no augmentation / dropout / noise)
    dataset_names: list[str]  # index = data_indices value
    stats: dict[str, Any]  # dataset_stat.json entries of the datasets used (saved with checkpoints)
    robot: dict[str, Any] | None  # robot config (hdf5/demo), saved with checkpoints


def _read_option_file(option: str, read: Callable[[], T]) -> T:
    """``read()`` of the file an option names; a malformed file is a ConfigError (one line, naming it: the
    readers' messages start with the path), not a traceback."""
    try:
        return read()
    except (ValueError, KeyError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{option}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from e


def _dataset_list(path: str | None, used: list[str]) -> list[str]:
    """Dataset names by id: the official list file (ids = positions, DATA.md §4.5) or the sources' order."""
    if path is None:
        return used
    names = json.loads(pathlib.Path(path).read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of dataset names")
    missing = [n for n in used if n not in names]
    if missing:
        raise KeyError(f"{path}: datasets {missing} are not listed (it lists {len(names)})")
    return names


def build_data(cfg: DataConfig, *, output_dir: str, local_batch: int, local_sample_batch: int, image_size: int,
               horizon: int, seed: int, process_index: int = 0, process_count: int = 1) -> DataBundle:
    robot = None
    val_dir = None
    val_sources = None  # None: validation samples the training sources (official)
    hdf5_sources: list[tuple[HDF5Source, str | pathlib.Path]] = []  # each with its directory, to check
    if cfg.kind in ("demo", "hdf5"):
        if cfg.kind == "demo":
            robot = demo_robot(cfg, horizon)
            data_dir = write_demo_dataset(pathlib.Path(output_dir) / "demo_data" / "train", cfg, robot, seed)
            if cfg.demo_val_episodes > 0:
                val_dir = write_demo_dataset(pathlib.Path(output_dir) / "demo_data" / "heldout", cfg, robot, seed,
                                             num_episodes=cfg.demo_val_episodes, episode_seed=1)
        else:
            if cfg.hdf5_dir is None:
                raise ConfigError("data.kind=hdf5 needs --data.hdf5-dir (a directory of ALOHA-format episodes)")
            robot = load_robot_config(cfg.robot)
            data_dir = cfg.hdf5_dir
        if robot.horizon != horizon:
            robot = dataclasses.replace(robot, horizon=horizon)
        src = HDF5Source(data_dir, robot, index_cache=pathlib.Path(output_dir) / "episode_index.json",
                         skip_bad_episodes=cfg.skip_bad_episodes)
        sources = {robot.dataset_name: src}
        hdf5_sources.append((src, data_dir))
        if val_dir is not None:
            val_sources = {robot.dataset_name: HDF5Source(
                val_dir, robot, index_cache=pathlib.Path(output_dir) / "episode_index_heldout.json")}
            hdf5_sources.append((val_sources[robot.dataset_name], val_dir))
        weights = {robot.dataset_name: 1.0}
        if cfg.stats_file:
            all_stats = _read_option_file("--data.stats-file",
                                          lambda: stats.load_stats(cfg.stats_file, names=[robot.dataset_name]))
        else:
            all_stats = {robot.dataset_name: stats.compute_dataset_stats(robot.dataset_name, src.episode_states())}
    elif cfg.kind == "rlds":
        from rdt_jax.data.rlds.source import RldsSource

        if not cfg.rlds_dirs:
            raise ConfigError("data.kind=rlds needs --data.rlds-dirs (converted RLDS dataset directories)")
        if cfg.lang_embed_dir is None:
            raise ConfigError("data.kind=rlds needs --data.lang-embed-dir: RLDS instructions are text, encoded "
                             "beforehand (scripts/encode_lang.py --rlds-dirs ... --store-dir DIR)")
        srcs = [RldsSource(d, horizon=horizon, skip_bad_episodes=cfg.skip_bad_episodes) for d in cfg.rlds_dirs]
        sources = {s.dataset_name: s for s in srcs}
        weights = (_read_option_file("--data.weights-file", lambda: load_weights(cfg.weights_file, list(sources)))
                   if cfg.weights_file else dict.fromkeys(sources, 1.0))
        if cfg.weights_per == "per_episode":
            weights = per_episode_weights(sources, weights)
        if cfg.stats_file is None:
            raise ConfigError("data.kind=rlds needs --data.stats-file (dataset_stat.json; scripts/compute_stats.py)")
        all_stats = _read_option_file("--data.stats-file", lambda: stats.load_stats(cfg.stats_file,
                                                                                     names=list(sources)))
    else:
        raise ValueError(f"unknown data kind {cfg.kind!r}")
    missing = [n for n in sources if n not in all_stats]
    if missing:
        raise ConfigError(f"--data.stats-file: {cfg.stats_file}: no statistics for datasets {missing}")
    used_stats = {n: all_stats[n] for n in sources}
    names = _read_option_file("--data.datasets-file", lambda: _dataset_list(cfg.datasets_file, list(sources)))
    ids = {n: names.index(n) for n in sources}
    means = stats.state_means(used_stats)
    store = language.EmbeddingStore(cfg.lang_embed_dir) if cfg.lang_embed_dir else None
    for src, src_dir in hdf5_sources:
        check_instruction_embeddings(src, store, data_dir=src_dir, robot=cfg.robot if cfg.kind == "hdf5" else None,
                                     max_lang_len=cfg.max_lang_len)
    if cfg.kind == "rlds":
        check_rlds_embeddings(list(sources.values()), store, cfg.max_lang_len)

    def pipeline(batch: int, tcfg: TransformConfig, pseed: int, sources=sources):
        bcfg = BatchConfig(batch_size=batch, image_size=image_size, max_lang_len=cfg.max_lang_len, horizon=horizon,
                           image_dtype="uint8", lang_padding=cfg.lang_padding)
        transform = SampleTransform(tcfg, bcfg, dataset_ids=ids, dataset_state_mean=means, embedding_store=store)
        pcfg = PipelineConfig(seed=pseed, num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
        return build_pipeline(sources, weights, transform, bcfg, pcfg, process_index=process_index,
                              process_count=process_count)

    train_t = TransformConfig(image_aug=cfg.image_aug, cond_mask_prob=cfg.cond_mask_prob,
                              state_noise_snr=cfg.state_noise_snr)
    train = pipeline(local_batch, train_t, seed)
    sample = (pipeline(local_sample_batch, TransformConfig.eval(), seed + 1_000_003, val_sources or sources)
              if local_sample_batch else None)
    return DataBundle(train, sample, names, used_stats, robot.to_json_dict() if robot else None)
