"""TensorFlow-free random access to the episodes of a tfds dataset stored as ArrayRecord.

How records are read and decoded without TensorFlow: `tfds.builder_from_directory` reads
`dataset_info.json`/`features.json` (no TF), `as_data_source` opens the ArrayRecord shards
through `array_record`, and tfds' own NumPy example parser (`ExampleParserNp`, built on
tfds' vendored `tf.train.Example` protobuf, no TF) turns one serialized episode into
per-step NumPy arrays, with images still encoded. Images are decoded only for the steps a
sample needs, with the dataset's own `tfds.features.Image.decode_example_np` (OpenCV if
installed, else PIL). A test imports this module and reads a dataset in a fresh process,
then asserts that `tensorflow` was never imported.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from rdt_jax.data.schema import EpisodeError

STEPS = "steps"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class FrameError(EpisodeError):
    """A camera frame that does not decode to an (H, W, 3) uint8 image; the message names where."""


@dataclasses.dataclass(frozen=True)
class RawEpisode:
    """One parsed episode: `steps` maps a '/'-path inside a step (e.g. `observation/state`)
    to an array with a leading step axis (images: encoded bytes); `meta` holds the
    episode-level features (e.g. `episode_metadata/success`)."""

    record: int
    where: str
    steps: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def num_steps(self) -> int:
        return len(next(iter(self.steps.values()))) if self.steps else 0


class EpisodeStore:
    """Episodes of all splits of one tfds dataset directory (`<name>/<version>`), in split-name
    order, addressed by a global record number."""

    def __init__(self, builder_dir: str | pathlib.Path):
        import tensorflow_datasets as tfds  # tfds itself does not import TensorFlow
        from tensorflow_datasets.core import example_parser

        self.builder_dir = pathlib.Path(builder_dir)
        if not (self.builder_dir / "dataset_info.json").is_file():
            raise FileNotFoundError(f"{self.builder_dir}: no dataset_info.json (not a tfds dataset directory)")
        builder = tfds.builder_from_directory(str(self.builder_dir))
        self.info = builder.info
        fmt = str(getattr(self.info.file_format, "value", self.info.file_format))
        if "array_record" not in fmt:
            raise ValueError(
                f"{self.builder_dir}: stored as {fmt!r}, not ArrayRecord; convert it first with scripts/convert_rlds.py"
            )
        self.features = self.info.features
        if STEPS not in self.features:
            raise ValueError(f"{self.builder_dir}: not an RLDS dataset (no 'steps' feature)")
        self._parser = example_parser.ExampleParserNp(self.features.get_serialized_info())
        self.splits = sorted(self.info.splits.keys())
        self._sources = [builder.as_data_source(split=s).data_source for s in self.splits]
        self._offsets = np.cumsum([0] + [len(s) for s in self._sources])
        self._step_features = self.features[STEPS].feature

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, record: int) -> tuple[str, int]:
        if not 0 <= record < len(self):
            raise IndexError(f"{self.builder_dir}: record {record} outside [0, {len(self)})")
        k = int(np.searchsorted(self._offsets, record, side="right") - 1)
        return self.splits[k], record - int(self._offsets[k])

    def read(self, record: int) -> RawEpisode:
        split, i = self.locate(record)
        where = f"{self.builder_dir}[{split}][{i}]"
        try:
            parsed = self._parser.parse_example(self._sources[self.splits.index(split)][i])
        except Exception as e:  # a corrupt record (or a features.json that does not describe it)
            raise EpisodeError(f"{where}: cannot parse the episode record: {e}") from e
        flat = _flatten(parsed)
        steps = {
            k[len(STEPS) + 1 :]: np.asarray(v) if not isinstance(v, list) else np.asarray(v, dtype=object)
            for k, v in flat.items()
            if k.startswith(STEPS + "/")
        }
        meta = {k: v for k, v in flat.items() if not k.startswith(STEPS + "/")}
        return RawEpisode(record=record, where=where, steps=steps, meta=meta)

    def step_feature(self, key: str) -> Any:
        """The tfds feature connector of a step feature path such as `observation/image`."""
        feat: Any = self._step_features
        for part in key.split("/"):
            try:
                feat = feat[part]
            except KeyError:
                raise KeyError(f"{self.builder_dir}: no step feature {key!r}") from None
        return feat

    def decode_image(self, episode: RawEpisode, key: str, step: int) -> np.ndarray:
        """(H, W, 3) uint8 frame `step` of camera `key` (an observation key)."""
        path = f"observation/{key}"
        if path not in episode.steps:
            raise KeyError(f"{episode.where}: camera {key!r} missing; the step has {sorted(episode.steps)}")
        value = episode.steps[path][step]
        feat = self.step_feature(path)
        import tensorflow_datasets as tfds

        if isinstance(feat, tfds.features.Image):
            try:
                img = feat.decode_example_np(value)
            # A corrupt frame surfaces from the image library as anything (an AttributeError on None for
            # bytes that are not an image): name the episode, camera and step instead.
            except Exception as e:
                raise FrameError(f"{episode.where}: camera {key!r} step {step}: the frame does not decode as "
                                 f"{feat.encoding_format or 'an image'} ({type(e).__name__}: {e})") from e
        else:  # stored as a raw uint8 tensor
            img = np.asarray(value)
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[..., None]
        if img.ndim != 3 or img.dtype != np.uint8 or img.shape[-1] not in (1, 3):
            raise FrameError(
                f"{episode.where}: camera {key!r} step {step} frame has shape {img.shape} "
                f"{img.dtype}, expected (H, W, 3) uint8"
            )
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        return img
