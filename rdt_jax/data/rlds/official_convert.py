"""Official custom TFRecords (or Mobile ALOHA HDF5) → RLDS-shaped tfds dataset in ArrayRecord.

The six datasets of `official_formats.FORMATS` are stored by the official pipeline as one
TFRecord file per episode with one `tf.train.Example` per step. This converter turns each
episode file into one RLDS-style record (`steps` sequence + `episode_metadata/file_path`)
so that training reads it with the same TF-free `EpisodeStore` / `RldsSource` / step index
as the Open X-Embodiment datasets. Raw uint8 frames are re-encoded (PNG: lossless; JPEG:
smaller, lossy); JPEG frames that are already encoded (rh20t, ALOHA HDF5) are copied as is.

Reading TFRecords needs TensorFlow (converter only); the HDF5 path does not.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any, Literal

import cv2
import numpy as np

from rdt_jax.data.rlds.convert import write_step_index
from rdt_jax.data.rlds.official_formats import FORMATS, Field, OfficialFormat, roboset_instruction
from rdt_jax.data.rlds.registry import CUSTOM_VERSION
from rdt_jax.data.rlds.source import StepIndex

ImageFormat = Literal["png", "jpeg"]
SourceKind = Literal["tfrecord", "aloha-hdf5"]


class SkipEpisode(Exception):  # control flow, not an error
    """The official pipeline would not use this episode file; the reason is counted."""


@dataclasses.dataclass
class ConversionReport:
    dataset: str
    written: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def summary(self) -> str:
        skips = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items()) or "none"
        return f"{self.dataset}: {self.written} episodes written; skipped: {skips}"


def encode_frame(rgb: np.ndarray, image_format: ImageFormat, jpeg_quality: int, where: str) -> bytes:
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{where}: frame has shape {rgb.shape} {rgb.dtype}, expected (H, W, 3) uint8")
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # OpenCV encoders take BGR
    ext, params = (".png", []) if image_format == "png" else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise ValueError(f"{where}: cannot encode frame as {image_format}")
    return buf.tobytes()


def features_of(fmt: OfficialFormat, image_format: ImageFormat) -> Any:
    """The tfds FeaturesDict of the converted dataset."""
    import tensorflow_datasets as tfds

    f = tfds.features
    steps: dict[str, Any] = {}
    for fld in fmt.fields:
        if fld.kind == "tensor":
            steps[fld.dst] = f.Tensor(shape=fld.stored_shape, dtype=np.dtype(fld.dtype))
            if fld.dims:
                steps[f"{fld.dst}_dim"] = f.Scalar(dtype=np.int32)
            if fld.optional:
                steps[f"{fld.dst}_valid"] = f.Scalar(dtype=np.bool_)
        elif fld.kind in ("image", "jpeg_tensor"):
            enc = "jpeg" if fld.kind == "jpeg_tensor" else image_format
            steps[fld.dst] = f.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format=enc)
        else:
            steps[fld.dst] = f.Text()
    if fmt.instruction == "roboset_paths":
        steps["instruction"] = f.Text()
    return f.FeaturesDict(
        {"steps": f.Dataset(_nest(steps)), "episode_metadata": {"file_path": f.Text()}}
    )


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


# --- per-step values ------------------------------------------------------------------------


def _tensor_value(fld: Field, arr: np.ndarray, where: str, fmt: OfficialFormat) -> dict[str, Any]:
    """Checked, reshaped numeric field → converted step features."""
    if arr.dtype != np.dtype(fld.dtype):
        raise ValueError(f"{where}: feature {fld.src!r} is {arr.dtype}, the official reader expects {fld.dtype}")
    if fld.dims:
        flat = arr.reshape(-1)
        if flat.size not in fld.dims:
            if fmt.skip_bad_dims:
                raise SkipEpisode(f"{fld.src} length not in {fld.dims}")
            raise ValueError(f"{where}: feature {fld.src!r} has {flat.size} values, expected one of {fld.dims}")
        padded = np.zeros(max(fld.dims), arr.dtype)
        padded[: flat.size] = flat
        return {fld.dst: padded, f"{fld.dst}_dim": np.int32(flat.size)}
    n = int(np.prod(fld.shape))
    if arr.size != n:
        raise ValueError(
            f"{where}: feature {fld.src!r} has shape {arr.shape} ({arr.size} values), expected {fld.shape}"
        )
    out: dict[str, Any] = {fld.dst: arr.reshape(fld.shape)}
    if fld.optional:
        out[f"{fld.dst}_valid"] = np.bool_(True)
    return out


def _absent(fld: Field, where: str) -> dict[str, Any]:
    if not fld.optional:
        raise KeyError(f"{where}: step has no feature {fld.src!r}")
    return {fld.dst: np.zeros(fld.stored_shape, np.dtype(fld.dtype)), f"{fld.dst}_valid": np.bool_(False)}


def _frame(arr: np.ndarray, where: str, src: str) -> np.ndarray:
    # bridgev2 stores frames with a leading axis of 1.
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{where}: image {src!r} has shape {arr.shape} {arr.dtype}, expected (H, W, 3) uint8")
    return arr


def _step_from_example(
    ex: Any, fmt: OfficialFormat, where: str, image_format: ImageFormat, jpeg_quality: int
) -> dict[str, Any]:
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    feats = ex.features.feature
    out: dict[str, Any] = {}
    for fld in fmt.fields:
        if fld.src not in feats or not feats[fld.src].bytes_list.value or feats[fld.src].bytes_list.value[0] == b"":
            out.update(_absent(fld, where))
            continue
        raw = feats[fld.src].bytes_list.value[0]
        if fld.kind == "bytes":
            out[fld.dst] = raw
            continue
        try:
            arr = tf.make_ndarray(tensor_pb2.TensorProto.FromString(raw))
        except Exception as e:
            raise ValueError(f"{where}: feature {fld.src!r} is not a serialized tensor: {e}") from e
        if fld.kind == "tensor":
            out.update(_tensor_value(fld, arr, where, fmt))
        elif fld.kind == "image":
            out[fld.dst] = encode_frame(_frame(arr, where, fld.src), image_format, jpeg_quality, where)
        elif fld.kind == "jpeg_tensor":
            if arr.dtype == object and arr.size == 1:  # JPEG bytes (the official reader's format)
                out[fld.dst] = arr.reshape(-1)[0]
            else:  # rh20t before the official compression pass: raw BGR video frames
                bgr = _frame(arr, where, fld.src)
                out[fld.dst] = encode_frame(bgr[..., ::-1], image_format, jpeg_quality, where)
        else:  # string_tensor
            if arr.dtype != object or arr.size != 1:
                raise ValueError(f"{where}: feature {fld.src!r} is {arr.dtype} {arr.shape}, expected a string scalar")
            out[fld.dst] = arr.reshape(-1)[0]
    return out


def read_tfrecord_episode(
    path: pathlib.Path, fmt: OfficialFormat, image_format: ImageFormat = "jpeg", jpeg_quality: int = 95
) -> list[dict[str, Any]]:
    """The steps of one official episode file as flat {dst path: value} dicts."""
    import tensorflow as tf

    steps = []
    try:
        records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    except tf.errors.OpError as e:
        raise ValueError(f"{fmt.name}: {path}: unreadable TFRecord file: {e.message}") from e
    for i, rec in enumerate(records):
        where = f"{fmt.name}: {path} step {i}"
        try:
            ex = tf.train.Example.FromString(rec)
        except Exception as e:
            raise ValueError(f"{where}: not a tf.train.Example: {e}") from e
        steps.append(_step_from_example(ex, fmt, where, image_format, jpeg_quality))
    return steps


# --- Mobile ALOHA HDF5 (the files the official aloha converter reads) -------------------------


def _element_bytes(el: Any) -> bytes:
    """Raw bytes of one stored JPEG (fixed uint8 row, variable-length uint8, opaque or bytes),
    trailing zero padding removed (a JPEG ends with the FFD9 marker)."""
    if isinstance(el, bytes | np.bytes_):
        b = bytes(el)
    elif isinstance(el, np.void):
        b = el.tobytes()
    else:
        b = np.ascontiguousarray(np.asarray(el)).view(np.uint8).tobytes()
    return b.rstrip(b"\0")


def read_aloha_hdf5_episode(
    path: pathlib.Path,
    fmt: OfficialFormat,
    *,
    instruction: str | None = None,
    image_format: ImageFormat = "jpeg",
    jpeg_quality: int = 95,
) -> list[dict[str, Any]]:
    """One Mobile ALOHA episode file → steps, as the official aloha converter would write them.

    Numeric arrays are cast to float32 (the dtype the official reader parses). Encoded JPEG
    frames are copied as is: the official converter decodes them with OpenCV and converts
    BGR→RGB, which is what a standard decoder (tfds' reader) yields; raw (T, H, W, 3) frames
    are taken as RGB and encoded.
    """
    import h5py

    where = f"{fmt.name}: {path}"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{where}: not a readable HDF5 file: {e}") from e
    with f:

        def get(key: str) -> Any:
            if key not in f:
                raise KeyError(f"{where}: missing HDF5 key {key!r}")
            return f[key]

        if "instruction" in f:
            text = f["instruction"][()]
            text = text.decode("utf-8") if isinstance(text, bytes | np.bytes_) else str(text)
        elif instruction is not None:
            text = instruction
        else:  # the official converter skips files without an instruction
            raise SkipEpisode("no /instruction")
        arrays = {
            "qpos": get("observations/qpos")[()],
            "qvel": get("observations/qvel")[()],
        }
        if any(fl.dst == "base_action" for fl in fmt.fields):
            arrays["base_action"] = get("base_action")[()]
        t = len(arrays["qpos"])
        for k, a in arrays.items():
            if len(a) != t:
                raise ValueError(f"{where}: {k!r} has {len(a)} steps, /observations/qpos has {t}")
        cams = {}
        for fld in fmt.fields:
            if fld.kind != "image":
                continue
            ds = get(f"observations/images/{fld.src}")
            if len(ds) != t:
                raise ValueError(f"{where}: camera {fld.src!r} has {len(ds)} frames, expected {t}")
            cams[fld] = ds[()]
        steps = []
        for i in range(t):
            step: dict[str, Any] = {"instruction": text.encode("utf-8")}
            for fld in fmt.fields:
                if fld.kind == "tensor":
                    arr = np.asarray(arrays[fld.dst][i], dtype=np.float32)
                    step.update(_tensor_value(fld, arr, f"{where} step {i}", fmt))
            for fld, frames in cams.items():
                el = frames[i]
                if isinstance(el, np.ndarray) and el.ndim == 3:
                    step[fld.dst] = encode_frame(el, image_format, jpeg_quality, f"{where} step {i}")
                else:
                    step[fld.dst] = _element_bytes(el)
            steps.append(step)
    return steps


# --- driver ---------------------------------------------------------------------------------


def _episode_files(src: pathlib.Path, source: SourceKind) -> list[pathlib.Path]:
    pattern = "*.tfrecord" if source == "tfrecord" else "*.hdf5"
    files = sorted(src.rglob(pattern))  # sorted, unlike the official os.walk order: reproducible
    if not files:
        raise FileNotFoundError(f"{src}: no '{pattern}' episode files")
    return files


def _episodes(
    fmt: OfficialFormat,
    src: pathlib.Path,
    source: SourceKind,
    report: ConversionReport,
    image_format: ImageFormat,
    jpeg_quality: int,
    instruction: str | None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    for path in _episode_files(src, source):
        rel = path.relative_to(src).as_posix()
        try:
            if any(s in str(pathlib.PurePosixPath(rel).parent) for s in fmt.skip_dirs):
                raise SkipEpisode("in an official failure set")
            if source == "tfrecord":
                steps = read_tfrecord_episode(path, fmt, image_format, jpeg_quality)
            else:
                steps = read_aloha_hdf5_episode(
                    path, fmt, instruction=instruction, image_format=image_format, jpeg_quality=jpeg_quality
                )
            if len(steps) < fmt.min_steps:
                raise SkipEpisode(f"fewer than {fmt.min_steps} steps")
            if fmt.instruction == "roboset_paths":
                text = roboset_instruction(rel)
                if text is None:
                    raise SkipEpisode("no instruction for its path")
                for s in steps:
                    s["instruction"] = text
        except SkipEpisode as e:
            report.skipped[str(e)].append(str(path))
            continue
        report.written += 1
        yield report.written - 1, {"steps": [_nest(s) for s in steps], "episode_metadata": {"file_path": rel}}


def convert_official(
    name: str,
    src: str | pathlib.Path,
    dst_root: str | pathlib.Path,
    *,
    source: SourceKind = "tfrecord",
    image_format: ImageFormat = "jpeg",
    jpeg_quality: int = 95,
    instruction: str | None = None,
    overwrite: bool = False,
) -> tuple[pathlib.Path, ConversionReport, StepIndex]:
    """Convert every episode file under `src` to `<dst_root>/<name>/1.0.0` (ArrayRecord) and
    build its step index. `source="aloha-hdf5"` reads Mobile ALOHA HDF5 episodes instead
    (aloha_mobile / aloha_static); `instruction` is used for HDF5 files without one."""
    import tensorflow_datasets as tfds

    if name not in FORMATS:
        raise KeyError(f"{name!r} has no official TFRecord format; known: {sorted(FORMATS)}")
    if source == "aloha-hdf5" and not name.startswith("aloha_"):
        raise ValueError(f"{name}: the HDF5 source is only for aloha_mobile / aloha_static")
    fmt = FORMATS[name]
    src, dst_root = pathlib.Path(src), pathlib.Path(dst_root)
    out = dst_root / name / CUSTOM_VERSION
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"the output {out} is --src {src} or a folder above it; write the conversion elsewhere")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    report = ConversionReport(name)
    episodes = _episodes(fmt, src, source, report, image_format, jpeg_quality, instruction)
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version=CUSTOM_VERSION,
        features=features_of(fmt, image_format),
        split_datasets={"train": episodes},
        data_dir=str(dst_root),
        file_format="array_record",
        disable_shuffling=True,  # keep file order: record i = i-th written episode
    )
    if report.written == 0:
        raise ValueError(f"{name}: no episode under {src} was converted ({report.summary()})")
    index = write_step_index(builder.data_dir, name)
    return pathlib.Path(builder.data_dir), report, index
