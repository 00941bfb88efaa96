"""Dataset statistics in the official `dataset_stat.json` format (DATA.md §3).

Per slot over all steps of all episodes (states from first_idx − 1 on): mean, min, max and
the official "non-zero-aware" std `sqrt(max(Σz²/n_nz − (Σz/N)²·N/n_nz, 0))` with z = x where
|x| > 1e-8 else 0 and n_nz = max(#{|x| > 1e-8}, 1). Only `state_mean` is used by training
(the replacement when the state condition is dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rdt_jax.data.action_space import STATE_DIM

NONZERO_EPS = 1e-8


@dataclasses.dataclass
class StatsAccumulator:
    """Streaming float64 sums; `add` one episode's (T, 128) states at a time."""

    n: int = 0
    sum_x: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(STATE_DIM))
    sum_z: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(STATE_DIM))
    sum_z2: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(STATE_DIM))
    n_nz: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(STATE_DIM))
    min: np.ndarray = dataclasses.field(default_factory=lambda: np.full(STATE_DIM, np.inf))
    max: np.ndarray = dataclasses.field(default_factory=lambda: np.full(STATE_DIM, -np.inf))
    episodes: int = 0

    def add(self, states: np.ndarray, *, where: str = "episode") -> None:
        x = np.asarray(states, np.float64)
        if x.ndim != 2 or x.shape[1] != STATE_DIM:
            raise ValueError(f"{where}: states have shape {x.shape}, expected (T, {STATE_DIM})")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{where}: states contain NaN or inf")
        nz = np.abs(x) > NONZERO_EPS
        z = np.where(nz, x, 0.0)
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_z += z.sum(0)
        self.sum_z2 += (z * z).sum(0)
        self.n_nz += nz.sum(0)
        if x.shape[0]:
            self.min = np.minimum(self.min, x.min(0))
            self.max = np.maximum(self.max, x.max(0))
        self.episodes += 1

    def result(self, dataset_name: str) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError(f"{dataset_name}: no states to compute statistics from")
        n_nz = np.maximum(self.n_nz, 1)
        var = self.sum_z2 / n_nz - (self.sum_z / self.n) ** 2 * (self.n / n_nz)
        return {
            "dataset_name": dataset_name,
            "state_mean": (self.sum_x / self.n).tolist(),
            "state_std": np.sqrt(np.maximum(var, 0.0)).tolist(),
            "state_min": self.min.tolist(),
            "state_max": self.max.tolist(),
        }


def compute_dataset_stats(dataset_name: str, episode_states: Iterable[np.ndarray]) -> dict[str, Any]:
    """Official statistics of one dataset from per-episode unified states (T_i, 128)."""
    acc = StatsAccumulator()
    for i, s in enumerate(episode_states):
        acc.add(s, where=f"{dataset_name} episode {i}")
    return acc.result(dataset_name)


def load_stats(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every entry of a ``dataset_stat.json``; those of ``names`` (default: all) are checked to hold the
    four 128-lists and must exist. The official file has stale 89-long entries (``bridge``,
    ``nyu_franka_play_dataset_converted_externally_to_rlds``) of datasets it does not train on, so
    callers check the datasets they use."""
    with open(path) as f:
        try:
            stats = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected a JSON object {{dataset_name: statistics}}")
    names = list(stats) if names is None else list(names)
    missing = [n for n in names if n not in stats]
    if missing:
        raise KeyError(f"{path}: no statistics for datasets {missing}")
    for name in names:
        if not isinstance(stats[name], dict):
            raise ValueError(f"{path}: {name} must be an object of statistics, got {type(stats[name]).__name__}")
        for k in ("state_mean", "state_std", "state_min", "state_max"):
            if k not in stats[name]:
                raise ValueError(f"{path}: {name} has no {k} (it has {sorted(stats[name])})")
            v = stats[name][k]
            if not isinstance(v, list) or len(v) != STATE_DIM:
                n = len(v) if isinstance(v, list) else type(v).__name__
                raise ValueError(f"{path}: {name}.{k} must be a list of {STATE_DIM} numbers, got {n}")
            try:
                finite = np.all(np.isfinite(np.asarray(v, np.float64)))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {name}.{k} must be a list of {STATE_DIM} numbers") from None
            if not finite:
                raise ValueError(f"{path}: {name}.{k} holds NaN/inf")
    return stats


def state_means(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v["state_mean"], np.float64) for k, v in stats.items()}


def write_stats(path: str | os.PathLike, new: Mapping[str, Mapping[str, Any]], *, skip_exist: bool = False
                ) -> dict[str, Any]:
    """Merge `new` into the JSON at `path` (created if absent); `skip_exist` keeps old entries."""
    # Other datasets' entries are kept as they are (checked only when used).
    merged: dict[str, Any] = load_stats(path, names=()) if os.path.exists(path) else {}
    for k, v in new.items():
        if not (skip_exist and k in merged):
            merged[k] = dict(v)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=4)
    os.replace(tmp, path)
    return merged
