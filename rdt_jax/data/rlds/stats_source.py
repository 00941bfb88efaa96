"""`--format rlds` of scripts/compute_stats.py: unified states of every used episode of a
converted RLDS dataset, fed to the shared statistics core (`rdt_jax.data.stats`).

Episodes are those the step index keeps (dataset filter passed, ≥ EPSD_LEN_THRESH_LOW
steps), all of their steps, capped at `MAX_EPISODES` like the official
`data/compute_dataset_stat.py` (100,000 episodes).
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from rdt_jax.data.rlds.source import RldsSource

MAX_EPISODES = 100_000


def rlds_episode_states(source: RldsSource, max_episodes: int = MAX_EPISODES) -> Iterator[np.ndarray]:
    """(T, 128) float32 states of each kept episode, in record order."""
    for record in itertools.islice(source.index.records, max_episodes):
        yield source.episode(int(record)).states


def rlds_dataset_states(
    data_dir: str | pathlib.Path, dataset_name: str | None = None
) -> tuple[str, Iterable[np.ndarray]]:
    source = RldsSource(data_dir, dataset_name, cache_episodes=1)
    return source.dataset_name, rlds_episode_states(source)


def register_compute_stats_format(register_format: Callable[[str], Callable]) -> None:
    @register_format("rlds")
    def rlds_episodes(args: argparse.Namespace) -> tuple[str, Iterable[np.ndarray]]:
        return rlds_dataset_states(args.data_dir, args.dataset_name)
