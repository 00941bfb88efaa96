"""Convert a pretraining dataset to ArrayRecord + step index for the TF-free training reader.

Published RLDS / Open X-Embodiment tfds datasets (default, `--format rlds`):

    python scripts/convert_rlds.py --src DATA/fractal20220817_data/0.1.0 --dst OUT/fractal20220817_data/0.1.0
    python scripts/convert_rlds.py --dst OUT/fractal20220817_data/0.1.0 --index-only

The six datasets the official pipeline stores as its own per-step TFRecords (aloha_mobile,
aloha_static, roboset, rh20t, calvin, bridgev2), from a directory of `*.tfrecord` episode
files as the official conversion scripts write them; the output goes to OUT/<name>/1.0.0:

    python scripts/convert_rlds.py --format official-tfrecord --name calvin --src DATA/calvin/tfrecords --dst OUT

aloha_mobile / aloha_static straight from Mobile ALOHA HDF5 episodes:

    python scripts/convert_rlds.py --format aloha-hdf5 --name aloha_mobile --src DATA/aloha_mobile --dst OUT

The dataset name (registry key) defaults to the tfds name in dataset_info.json (rlds only).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rdt_jax.data.rlds.convert import convert_to_array_record, write_step_index
from rdt_jax.data.rlds.source import StepIndex


def _summary(index: StepIndex) -> str:
    return (
        f"{index.dataset_name}: {len(index.lengths)} episodes, {int(index.kept.sum())} kept "
        f"({index.dropped_by_filter} filtered, {index.dropped_short} shorter than {index.thresh_low}), "
        f"{index.num_entries} step entries"
    )


def main(argv: list[str] | None = None) -> None:
    try:
        convert(argv)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        # Inputs and outputs that do not fit (an existing --dst, a --src that is not a version directory, an
        # unknown dataset name): the messages name them; no traceback.
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(2)


def convert(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=("rlds", "official-tfrecord", "aloha-hdf5"), default="rlds")
    ap.add_argument("--src", type=pathlib.Path, help="input: tfds version dir (rlds) or episode-file directory")
    ap.add_argument("--dst", type=pathlib.Path, required=True,
                    help="rlds: output dataset version dir; otherwise: output root (writes DST/<name>/1.0.0)")
    ap.add_argument("--name", help="registry dataset name (rlds: default the tfds name; otherwise required)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--index-only", action="store_true", help="rlds: only (re)build the step index of --dst")
    ap.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                    help="encoding of raw uint8 frames (png: lossless, larger); already-JPEG frames are copied")
    ap.add_argument("--jpeg-quality", type=int, default=95)
    ap.add_argument("--instruction", help="aloha-hdf5: instruction for files without /instruction "
                    "(the official converter skips such files)")
    args = ap.parse_args(argv)
    if args.format != "rlds":
        if args.src is None or args.name is None:
            ap.error(f"--format {args.format} needs --src and --name")
        from rdt_jax.data.rlds.official_convert import convert_official

        source = "tfrecord" if args.format == "official-tfrecord" else "aloha-hdf5"
        out, report, index = convert_official(
            args.name, args.src, args.dst, source=source, image_format=args.image_format,
            jpeg_quality=args.jpeg_quality, instruction=args.instruction, overwrite=args.overwrite,
        )
        print(f"{out}\n{report.summary()}\n{_summary(index)}")
        return
    if not args.index_only:
        if args.src is None:
            ap.error("--src is required unless --index-only")
        convert_to_array_record(args.src, args.dst, overwrite=args.overwrite)
    print(_summary(write_step_index(args.dst, args.name)))


if __name__ == "__main__":
    main()
