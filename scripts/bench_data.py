"""Data pipeline throughput per CPU core: grain over ALOHA HDF5, grain over ArrayRecord (RLDS),
and a plain tf.data pipeline doing the same work on the same data.

Data: synthetic ALOHA episodes (3 cameras, 480×640 camera-like JPEG frames, zero-padded rows,
~50 KB each); the same JPEG bytes are also converted to ArrayRecord as `aloha_mobile` with
`convert_official(source="aloha-hdf5")` (the ArrayRecord path). Per sample, every pipeline
decodes six JPEGs (2 frames × 3 cameras), pads to square with (127,127,127), bicubic-resizes to
384 and reads states/actions; grain adds the full SampleTransform (masks, language, …).

Numbers (all per CPU core, so other processes on the machine matter little):
* `stage` rows: one thread, `time.thread_time()` per sample for `source.get` (read + decode)
  and `transform` (pad + resize + the rest), alternating as in the pipeline — the CPU cost of
  one sample.
* pipeline rows: samples / CPU-second of this whole process (all its threads), and samples/s
  wall divided by the cores in the affinity mask (`taskset -c 0` for a one-core run).

    python scripts/bench_data.py [--episodes 4 --steps 160 --batches 20 --batch-size 8]
    taskset -c 0 python scripts/bench_data.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import cv2
import h5py
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rdt_jax.data import language
from rdt_jax.data.hdf5_source import HDF5Source
from rdt_jax.data.pipeline import PipelineConfig, build_pipeline
from rdt_jax.data.robot_config import load_robot_config
from rdt_jax.data.schema import BatchConfig
from rdt_jax.data.transform import SampleTransform, TransformConfig

CAMS = ("cam_high", "cam_left_wrist", "cam_right_wrist")


def synth_frame(t: int, cam: int, rng: np.random.Generator) -> np.ndarray:
    """A camera-like 480×640 frame (smooth gradients, shapes, sensor noise) → ~60 KB JPEG."""
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx * 255 / 640, yy * 255 / 480, (xx + yy + 7 * t) % 255], -1).astype(np.uint8)
    cv2.circle(img, (200 + 3 * t % 200, 240), 60 + 10 * cam, (200, 40, 90), -1)
    cv2.rectangle(img, (400, 100 + cam * 30), (560, 300), (20, 180, 60), -1)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def write_data(d: pathlib.Path, episodes: int, steps: int) -> None:
    rng = np.random.default_rng(0)
    (d / "lang").mkdir(parents=True, exist_ok=True)
    language.save_embedding(d / "lang/e.safetensors", rng.normal(size=(16, 4096)).astype(np.float32), "x")
    (d / "expanded_instruction_gpt-4-turbo.json").write_text(json.dumps(
        {"instruction": "lang/e.safetensors", "simplified_instruction": ["lang/e.safetensors"],
         "expanded_instruction": ["lang/e.safetensors"]}))
    for e in range(episodes):
        q = np.cumsum(rng.normal(0, 0.02, (steps, 14)), 0).astype(np.float32)
        with h5py.File(d / f"episode_{e}.hdf5", "w") as f:
            f["/observations/qpos"] = q
            f["/observations/qvel"] = np.zeros_like(q)  # for the aloha_mobile ArrayRecord conversion
            f["/base_action"] = np.zeros((steps, 2), np.float32)
            f["/action"] = q
            for c, cam in enumerate(CAMS):
                enc = [cv2.imencode(".jpg", synth_frame(t, c, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
                       for t in range(steps)]
                rows = np.zeros((steps, max(len(b) for b in enc)), np.uint8)
                for t, b in enumerate(enc):
                    rows[t, : len(b)] = b.reshape(-1)
                f[f"/observations/images/{cam}"] = rows


def _timed(it, batches: int, batch_size: int) -> tuple[float, float, dict]:
    """(samples per wall second, samples per CPU second of this process, last batch)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        b = next(it)
    n = batches * batch_size
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0), b


def write_array_record(h5_dir: pathlib.Path, out_root: pathlib.Path) -> pathlib.Path:
    """The same episodes (same JPEG bytes) as an `aloha_mobile` ArrayRecord dataset."""
    from rdt_jax.data.rlds.official_convert import convert_official

    path, _, _ = convert_official("aloha_mobile", h5_dir, out_root, source="aloha-hdf5",
                                  instruction="fold the towel")
    return path


def _transform(image_dtype: str, store=None) -> tuple[SampleTransform, BatchConfig]:
    return SampleTransform(TransformConfig.eval(), _bcfg(image_dtype), embedding_store=store,
                           dataset_ids={"agilex": 0, "aloha_mobile": 1}), _bcfg(image_dtype)


_BATCH = 8


def _bcfg(image_dtype: str) -> BatchConfig:
    return BatchConfig(batch_size=_BATCH, max_lang_len=32, image_dtype=image_dtype)


def bench_stages(name: str, src, tf: SampleTransform, n: int) -> dict[str, float]:
    """CPU ms per sample (this thread only) of source.get and of the transform.

    Get and transform alternate per sample, as in the pipeline: holding all raw samples first
    would time fresh-memory page faults (~5 MB of frames each) instead of the work."""
    tf(src.get(0, np.random.default_rng([0, 0])), np.random.default_rng([0, 0]))  # warm caches
    get_s = transform_s = 0.0
    for i in range(1, n + 1):
        rng = np.random.default_rng([0, i])
        c0 = time.thread_time()
        raw = src.get(i, rng)
        c1 = time.thread_time()
        tf(raw, rng)
        get_s += c1 - c0
        transform_s += time.thread_time() - c1
        del raw
    return {"get_ms": get_s / n * 1e3, "transform_ms": transform_s / n * 1e3}


def bench_grain(sources: dict, tf: SampleTransform, bcfg: BatchConfig, batches: int, threads: int
                ) -> tuple[float, float]:
    cfg = PipelineConfig(seed=0, num_threads=threads, prefetch_buffer_size=2 * bcfg.batch_size)
    it = iter(build_pipeline(sources, dict.fromkeys(sources, 1.0), tf, bcfg, cfg))
    next(it)  # warm-up: thread pool, caches
    wall, cpu, b = _timed(it, batches, bcfg.batch_size)
    assert b["images"].shape == (bcfg.batch_size, 6, 3, 384, 384)
    return wall, cpu


def bench_tf(src: HDF5Source, batch_size: int, batches: int, threads: int) -> tuple[float, float]:
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    rng = np.random.default_rng(0)
    picks = [src.choose(rng) for _ in range((batches + 1) * batch_size)]
    paths = [src.episodes[e].path for e, _ in picks]
    steps = [s for _, s in picks]
    keys = [src.robot.cameras[k] for k in ("exterior", "right_wrist", "left_wrist")]

    def read(path, step):  # the HDF5 part has no TF op: numpy_function, like any tf.data HDF5 reader
        path, step = path.decode(), int(step)
        with h5py.File(path, "r") as f:
            jpegs = [f[k][i].tobytes() for i in (max(step - 1, 0), step) for k in keys]
            state = f["/observations/qpos"][step].astype(np.float32)
            act = f["/action"][step:step + 64].astype(np.float32)
        act = np.concatenate([act, np.repeat(act[-1:], 64 - len(act), 0)])
        return (*jpegs, state, act)

    def load(path, step):
        out = tf.numpy_function(read, [path, step], [tf.string] * 6 + [tf.float32, tf.float32])
        imgs = []
        for j in out[:6]:
            img = tf.reverse(tf.io.decode_jpeg(j, channels=3), axis=[-1])  # OpenCV channel semantics
            img = tf.pad(img, [[80, 80], [0, 0], [0, 0]], constant_values=127)
            img = tf.image.resize(img, (384, 384), method="bicubic", antialias=True)
            imgs.append(tf.transpose(img / 255.0 * 2.0 - 1.0, (2, 0, 1)))
        return {"images": tf.stack(imgs), "states": tf.reshape(out[6], (1, 14)),
                "actions": tf.reshape(out[7], (64, 14))}

    ds = (tf.data.Dataset.from_tensor_slices((paths, steps)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch_size).prefetch(2))
    it = iter(ds.as_numpy_iterator())
    next(it)
    wall, cpu, b = _timed(it, batches, batch_size)
    assert b["images"].shape == (batch_size, 6, 3, 384, 384)
    return wall, cpu


def main() -> int:
    global _BATCH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="existing ALOHA episodes (default: synthesise)")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stage-samples", type=int, default=48)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--skip-tf", action="store_true")
    p.add_argument("--skip-rlds", action="store_true")
    args = p.parse_args()
    _BATCH = args.batch_size
    cores = len(os.sched_getaffinity(0))
    print(f"cores in affinity mask: {cores}; grain threads: {args.threads}; load average: {os.getloadavg()}")
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(args.data_dir or tmp + "/h5")
        if args.data_dir is None:
            write_data(d, args.episodes, args.steps)
        src = HDF5Source(d, load_robot_config("aloha_agilex"))
        sources = {"hdf5": src}
        store = None
        if not args.skip_rlds:
            from rdt_jax.data.rlds.source import RldsSource

            rsrc = RldsSource(write_array_record(d, pathlib.Path(tmp) / "ar"))
            store = language.EmbeddingStore(pathlib.Path(tmp) / "emb")
            store.put(rsrc.episode(int(rsrc.index.records[0])).instruction,
                      np.random.default_rng(1).normal(size=(16, 4096)).astype(np.float32))
            sources["array_record"] = rsrc
        for image_dtype in ("uint8", "float32"):
            tf, bcfg = _transform(image_dtype, store)
            for name, s in sources.items():
                st = bench_stages(name, s, tf, args.stage_samples)
                tot = st["get_ms"] + st["transform_ms"]
                print(f"stage {name:12s} {image_dtype:7s}: source.get {st['get_ms']:.2f} ms + transform "
                      f"{st['transform_ms']:.2f} ms = {tot:.2f} CPU-ms/sample → {1e3 / tot:.1f} samples/s per core")
                key = f"grain_{name}_{image_dtype}"
                results[key] = bench_grain({s.dataset_name: s}, tf, bcfg, args.batches, args.threads)
        if not args.skip_tf:
            try:
                results["tf_data_hdf5_float32"] = bench_tf(src, args.batch_size, args.batches, args.threads)
            except ImportError:
                print("tensorflow not installed: tf.data comparison skipped")
    for k, (wall, cpu) in results.items():
        print(f"{k}: {wall:.1f} samples/s wall ({wall / cores:.1f} per core, {cores} cores), "
              f"{cpu:.1f} samples per CPU-second")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
