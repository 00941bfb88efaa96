"""Compute per-dataset state statistics in the official dataset_stat.json format.

    python scripts/compute_stats.py --format hdf5 --data-dir DIR --output FILE [--robot aloha_agilex]

Formats register a function `(args) -> (dataset_name, Iterable[(T, 128) states per episode])`
in `FORMATS`; the RLDS format plugs in the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Iterable

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rdt_jax.data import stats
from rdt_jax.data.hdf5_source import HDF5Source
from rdt_jax.data.robot_config import load_robot_config

EpisodeStates = tuple[str, Iterable[np.ndarray]]
FORMATS: dict[str, Callable[[argparse.Namespace], EpisodeStates]] = {}


def register_format(name: str):
    def deco(fn: Callable[[argparse.Namespace], EpisodeStates]):
        FORMATS[name] = fn
        return fn
    return deco


@register_format("hdf5")
def hdf5_episodes(args: argparse.Namespace) -> EpisodeStates:
    robot = load_robot_config(args.robot)
    src = HDF5Source(args.data_dir, robot, skip_bad_episodes=args.skip_bad, index_cache=args.index_cache,
                     check_images=False, load_instructions=False)
    if src.report.skipped:
        logging.warning("skipped episodes: %s", {k: v for k, v in src.report.skipped.items()})
    return (args.dataset_name or robot.dataset_name), src.episode_states()


def _try_register_rlds() -> None:
    try:
        from rdt_jax.data.rlds import stats_source  # type: ignore[attr-defined]
    except ImportError:
        return
    register = getattr(stats_source, "register_compute_stats_format", None)
    if register is not None:
        register(register_format)


def main(argv: list[str] | None = None) -> int:
    _try_register_rlds()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=sorted(FORMATS), default="hdf5")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--output", required=True, help="dataset_stat.json to create or update")
    p.add_argument("--robot", default="aloha_agilex", help="robot config name or JSON path (hdf5)")
    p.add_argument("--dataset-name", default=None, help="override the dataset name")
    p.add_argument("--skip-exist", action="store_true", help="keep an existing entry for this dataset")
    p.add_argument("--skip-bad-episodes", "--skip-bad", dest="skip_bad", action="store_true",
                   help="skip (and report) bad episode files (hdf5), as train.py's --data.skip-bad-episodes")
    p.add_argument("--index-cache", default=None, help="episode index cache file (hdf5)")
    args = p.parse_args(argv)
    # force: importing rdt_jax (orbax, absl) has configured the root logger already, which would silence these.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    if not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no such directory")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        p.error(f"--output {args.output}: directory {out_dir} does not exist")
    if os.path.exists(args.output):  # merged into at the end: checked before the scan, not after it
        try:
            stats.load_stats(args.output, names=())
        except (OSError, ValueError) as e:
            p.error(f"--output {args.output}: cannot be updated, not a dataset_stat.json ({e})")
    try:
        name, episodes = FORMATS[args.format](args)
        result = stats.compute_dataset_stats(name, episodes)
    except (FileNotFoundError, KeyError, ValueError) as e:  # a bad robot name, a bad episode: named by the error
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats.write_stats(args.output, {name: result}, skip_exist=args.skip_exist)
    logging.info("wrote statistics of %s to %s", name, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
