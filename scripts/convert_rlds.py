"""Convert a published RLDS / Open X-Embodiment tfds dataset to ArrayRecord + step index.

    python scripts/convert_rlds.py --src DATA/fractal20220817_data/0.1.0 --dst OUT/fractal20220817_data/0.1.0
    python scripts/convert_rlds.py --dst OUT/fractal20220817_data/0.1.0 --index-only

The dataset name (registry key) defaults to the tfds name in dataset_info.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rdt_jax.data.rlds.convert import convert_to_array_record, write_step_index


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=pathlib.Path, help="tfds dataset version dir with TFRecord shards")
    ap.add_argument("--dst", type=pathlib.Path, required=True, help="output dataset version dir")
    ap.add_argument("--name", help="registry dataset name (default: the tfds name)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--index-only", action="store_true", help="only (re)build the step index of --dst")
    args = ap.parse_args(argv)
    if not args.index_only:
        if args.src is None:
            ap.error("--src is required unless --index-only")
        convert_to_array_record(args.src, args.dst, overwrite=args.overwrite)
    index = write_step_index(args.dst, args.name)
    print(
        f"{index.dataset_name}: {len(index.lengths)} episodes, {int(index.kept.sum())} kept "
        f"({index.dropped_by_filter} filtered, {index.dropped_short} shorter than {index.thresh_low}), "
        f"{index.num_entries} step entries"
    )


if __name__ == "__main__":
    main()
