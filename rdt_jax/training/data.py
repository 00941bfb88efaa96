"""Adapters from the training config to the data pipeline (rdt_jax.data), plus the built-in demo dataset.

The demo dataset is a handful of tiny ALOHA-format HDF5 episodes written on the fly (no download):
14 joints following smooth per-episode curves, three small cameras whose pictures encode the
episode and the time, and one random "language embedding" per episode. It goes through exactly
the same HDF5 source, sample transform and grain mixture as real fine-tuning data.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import h5py
import numpy as np

from rdt_jax.data import language, stats
from rdt_jax.data.hdf5_source import HDF5Source
from rdt_jax.data.pipeline import PipelineConfig, build_pipeline, load_weights
from rdt_jax.data.robot_config import RobotConfig, load_robot_config
from rdt_jax.data.schema import BatchConfig
from rdt_jax.data.transform import SampleTransform, TransformConfig
from rdt_jax.training.config import DataConfig

DEMO_LANG_LEN = 5


def demo_robot(cfg: DataConfig, horizon: int) -> RobotConfig:
    base = load_robot_config("aloha_agilex")
    return dataclasses.replace(base, name="demo_aloha", image_shape=(cfg.demo_image_size, cfg.demo_image_size, 3),
                               jpeg_color="rgb", horizon=horizon, min_episode_len=horizon // 2)


def write_demo_dataset(root: str | pathlib.Path, cfg: DataConfig, robot: RobotConfig, seed: int = 0) -> pathlib.Path:
    """Writes ``cfg.demo_episodes`` episodes under ``root`` (idempotent: an existing complete set is reused)."""
    root = pathlib.Path(root)
    done = root / "COMPLETE"
    if done.exists():
        return root
    rng = np.random.default_rng([seed, 4242])
    t_len, s = cfg.demo_episode_len, cfg.demo_image_size
    k = len(robot.state_names)
    t = np.arange(t_len + 1)[:, None] / t_len
    for e in range(cfg.demo_episodes):
        d = root / f"episode_{e:03d}"
        d.mkdir(parents=True, exist_ok=True)
        amp, freq, phase = rng.uniform(0.2, 0.8, k), rng.uniform(0.5, 1.5, k), rng.uniform(0, 2 * np.pi, k)
        curve = amp * np.sin(2 * np.pi * freq * t + phase) - amp * np.sin(phase)  # starts at 0, moves at once
        curve[:, [6, 13]] = 2.0 + 2.0 * np.abs(curve[:, [6, 13]])  # grippers: positive openings
        qpos, action = curve[:-1], curve[1:]  # the action is the next joint position
        colour = rng.integers(40, 215, 3)
        with h5py.File(d / f"episode_{e:03d}.hdf5", "w") as f:
            f["/observations/qpos"] = qpos.astype(np.float64)
            f["/action"] = action.astype(np.float64)
            for cam_i, key in enumerate(robot.camera_keys):
                frames = np.zeros((t_len, s, s, 3), np.uint8)
                frames[:] = colour
                for step in range(t_len):  # a bar that moves with time: images carry the phase
                    x = int((step / t_len) * (s - 4)) + cam_i
                    frames[step, :, x:x + 3] = 255
                f[key] = frames
        emb = rng.normal(0, 1, (DEMO_LANG_LEN, language.LANG_DIM)).astype(np.float32)
        language.save_embedding(d / "lang.safetensors", emb, f"demo task {e}")
        (d / robot.instruction_file).write_text(json.dumps(
            {key: "lang.safetensors" for key in robot.instruction_keys}))
    done.write_text("ok\n")
    return root


@dataclasses.dataclass
class DataBundle:
    """What the loop needs from the data side."""

    train: Any  # grain IterDataset of training batches (this process's share)
    sample: Any | None  # validation batches (no augmentation / dropout / noise)
    dataset_names: list[str]  # index = data_indices value
    stats: dict[str, Any]  # dataset_stat.json entries of the datasets used (saved with checkpoints)
    robot: dict[str, Any] | None  # robot config (hdf5/demo), saved with checkpoints


def build_data(cfg: DataConfig, *, output_dir: str, local_batch: int, local_sample_batch: int, image_size: int,
               horizon: int, seed: int, process_index: int = 0, process_count: int = 1) -> DataBundle:
    robot = None
    if cfg.kind in ("demo", "hdf5"):
        if cfg.kind == "demo":
            robot = demo_robot(cfg, horizon)
            data_dir = write_demo_dataset(pathlib.Path(output_dir) / "demo_data", cfg, robot, seed)
        else:
            if cfg.hdf5_dir is None:
                raise ValueError("data.kind=hdf5 needs --data.hdf5-dir (a directory of ALOHA-format episodes)")
            robot = load_robot_config(cfg.robot)
            data_dir = cfg.hdf5_dir
        if robot.horizon != horizon:
            robot = dataclasses.replace(robot, horizon=horizon)
        src = HDF5Source(data_dir, robot, index_cache=pathlib.Path(output_dir) / "episode_index.json")
        sources = {robot.dataset_name: src}
        weights = {robot.dataset_name: 1.0}
        if cfg.stats_file:
            all_stats = stats.load_stats(cfg.stats_file)
        else:
            all_stats = {robot.dataset_name: stats.compute_dataset_stats(robot.dataset_name, src.episode_states())}
    elif cfg.kind == "rlds":
        from rdt_jax.data.rlds.source import RldsSource

        if not cfg.rlds_dirs:
            raise ValueError("data.kind=rlds needs --data.rlds-dirs (converted RLDS dataset directories)")
        srcs = [RldsSource(d, horizon=horizon) for d in cfg.rlds_dirs]
        sources = {s.dataset_name: s for s in srcs}
        weights = (load_weights(cfg.weights_file, list(sources)) if cfg.weights_file
                   else dict.fromkeys(sources, 1.0))
        if cfg.stats_file is None:
            raise ValueError("data.kind=rlds needs --data.stats-file (dataset_stat.json; scripts/compute_stats.py)")
        all_stats = stats.load_stats(cfg.stats_file)
    else:
        raise ValueError(f"unknown data kind {cfg.kind!r}")
    names = list(sources)
    missing = [n for n in names if n not in all_stats]
    if missing:
        raise KeyError(f"{cfg.stats_file}: no statistics for datasets {missing}")
    used_stats = {n: all_stats[n] for n in names}
    ids = {n: i for i, n in enumerate(names)}
    means = stats.state_means(used_stats)

    def pipeline(batch: int, tcfg: TransformConfig, pseed: int):
        bcfg = BatchConfig(batch_size=batch, image_size=image_size, max_lang_len=cfg.max_lang_len, horizon=horizon,
                           image_dtype="uint8")
        transform = SampleTransform(tcfg, bcfg, dataset_ids=ids, dataset_state_mean=means)
        pcfg = PipelineConfig(seed=pseed, num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
        return build_pipeline(sources, weights, transform, bcfg, pcfg, process_index=process_index,
                              process_count=process_count)

    train_t = TransformConfig(image_aug=cfg.image_aug, cond_mask_prob=cfg.cond_mask_prob,
                              state_noise_snr=cfg.state_noise_snr)
    train = pipeline(local_batch, train_t, seed)
    sample = pipeline(local_sample_batch, TransformConfig.eval(), seed + 1_000_003) if local_sample_batch else None
    return DataBundle(train, sample, names, used_stats, robot.to_json_dict() if robot else None)
