"""Published RLDS (tfds TFRecord) dataset directory → ArrayRecord copy + step index.

The episodes are copied record by record, shard by shard (same shard names with the
`array_record` suffix, so the split metadata stays valid); the JSON metadata is copied and
`dataset_info.json` gets `file_format = array_record`, the layout `tfds.data_sources`
reads. This step needs TensorFlow (to read TFRecord shards; install the `rlds` extra);
building the step index afterwards does not.
"""

from __future__ import annotations

import pathlib
import shutil

from rdt_jax.data.rlds.reader import EpisodeStore
from rdt_jax.data.rlds.registry import get_spec
from rdt_jax.data.rlds.source import StepIndex, build_step_index

_TF_SUFFIX = ".tfrecord-"
_AR_SUFFIX = ".array_record-"


def convert_to_array_record(
    src: str | pathlib.Path, dst: str | pathlib.Path, *, overwrite: bool = False
) -> pathlib.Path:
    """Copy the tfds dataset at `src` (`<name>/<version>`, TFRecord shards) to `dst` as ArrayRecord."""
    import tensorflow as tf  # only the converter needs TensorFlow
    from array_record.python import array_record_module
    from tensorflow_datasets.core import dataset_info as dataset_info_lib

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not (src / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{src}: no dataset_info.json; expected a tfds dataset version directory (<name>/<version>)"
        )
    info = dataset_info_lib.read_proto_from_builder_dir(src)
    if info.file_format not in ("", "tfrecord"):
        raise ValueError(f"{src}: stored as {info.file_format!r}; only TFRecord input is supported")
    shards = sorted(p for p in src.iterdir() if _TF_SUFFIX in p.name)
    if not shards:
        raise FileNotFoundError(f"{src}: no '*{_TF_SUFFIX}*' shard files")
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        # --overwrite would delete the input before reading it.
        raise ValueError(f"--dst {dst} is --src {src} or a folder above it; write the conversion elsewhere")
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for shard in shards:
        out = dst / shard.name.replace(_TF_SUFFIX, _AR_SUFFIX)
        # group_size:1 = every record is its own chunk: cheapest random access.
        writer = array_record_module.ArrayRecordWriter(str(out), "group_size:1")
        try:
            for record in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
                writer.write(record)
        finally:
            writer.close()
    for meta in src.glob("*.json"):
        if meta.name != "dataset_info.json":
            shutil.copy(meta, dst / meta.name)
    info.file_format = "array_record"
    dataset_info_lib.write_dataset_info_proto(info, dataset_info_dir=dst)
    return dst


def write_step_index(builder_dir: str | pathlib.Path, dataset_name: str | None = None) -> StepIndex:
    """Build and save the step index of a converted dataset (TF-free)."""
    store = EpisodeStore(builder_dir)
    spec = get_spec(dataset_name or store.info.name)
    index = build_step_index(store, spec)
    index.save(pathlib.Path(builder_dir))
    return index
