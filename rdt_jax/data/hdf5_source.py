"""ALOHA-format HDF5 episodes (one episode per file) as a `StepSource` (DATA.md §2, §2.1).

At construction every file is scanned once (optionally cached on disk): length, first
movement, per-episode state statistics, layout checks. `get(index, rng)` then draws a
sample with the official semantics: episode ∝ usable length, step uniform in
[first_idx − 1, T − 1], `horizon` recorded actions padded by repeating the last, 2-frame
camera histories with validity masks, one instruction variant chosen uniformly.

Sampling cost: per sample only the 2 JPEG rows of each camera are read from the file. The
raw qpos/action arrays of recently used episodes are kept in memory (an LRU of
`episode_cache_size` episodes, read and checked once per episode), and every reader thread
keeps its recently used files open (`max_open_files` per thread, with their dataset objects
and layouts): opening a file and looking up datasets cost more than the reads themselves.

Deviations from the official loader, on purpose: files are sorted (not `os.walk` order);
bad files are reported by name (or skipped and counted with `skip_bad_episodes=True`) instead
of aborting start-up or being retried silently; with `skip_bad_episodes=True` a sample whose frames
fail to read during training is named in a warning and redrawn.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np

from rdt_jax.data import action_space
from rdt_jax.data.bad_samples import BadSampleLog, first_readable
from rdt_jax.data.jpeg import decode_jpeg
from rdt_jax.data.robot_config import RobotConfig
from rdt_jax.data.schema import IMG_HISTORY, EpisodeError, RawSample

log = logging.getLogger(__name__)
_INDEX_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EpisodeInfo:
    path: str
    num_steps: int  # T
    first_idx: int  # first step whose raw state moved > threshold from step 0 (≥ 1)
    # Per-episode statistics over all T steps of the divided state, k columns, float64.
    state_std: np.ndarray
    state_mean: np.ndarray
    state_norm: np.ndarray

    @property
    def usable_len(self) -> int:
        return self.num_steps - self.first_idx + 1

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("state_std", "state_mean", "state_norm"):
            d[k] = d[k].tolist()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EpisodeInfo:
        arrays = {k: np.asarray(d[k], np.float64) for k in ("state_std", "state_mean", "state_norm")}
        return cls(path=d["path"], num_steps=int(d["num_steps"]), first_idx=int(d["first_idx"]), **arrays)


@dataclasses.dataclass
class ScanReport:
    """What the scan kept and what it left out, by reason → files."""

    used: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(path)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.skipped.items()}


def find_episode_files(data_dir: str | os.PathLike, pattern: str = "*.hdf5") -> list[str]:
    files = sorted(str(p) for p in pathlib.Path(data_dir).rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no {pattern} files under {data_dir}")
    return files


def first_movement(qpos: np.ndarray, threshold: float) -> int | None:
    """First t with max_j |qpos[t, j] − qpos[0, j]| > threshold (raw values, file dtype)."""
    moved = np.flatnonzero(np.any(np.abs(qpos - qpos[0:1]) > threshold, axis=1))
    return int(moved[0]) if moved.size else None


def _read(f: h5py.File, key: str, path: str, sel: Any = ()) -> np.ndarray:
    if key not in f:
        raise EpisodeError(f"{path}: missing key {key!r}")
    try:
        return f[key][sel]
    except (OSError, ValueError, TypeError) as e:
        raise EpisodeError(f"{path}: cannot read {key!r} ({e})") from e


def _check_finite(a: np.ndarray, path: str, key: str) -> None:
    if not np.issubdtype(a.dtype, np.number):
        raise EpisodeError(f"{path}: {key!r} has non-numeric dtype {a.dtype}")
    bad = ~np.isfinite(a)
    if bad.any():
        t, j = np.argwhere(bad)[0][:2] if a.ndim > 1 else (np.argwhere(bad)[0][0], 0)
        raise EpisodeError(f"{path}: {key!r} contains NaN/inf (first at step {t}, column {j})")


def frame_bytes_layout(ds: h5py.Dataset) -> str:
    """'raw' (T, H, W, 3) arrays, 'rows' (T, maxlen) zero-padded uint8, or 'elements' (T,)."""
    if ds.ndim == 4:
        return "raw"
    if ds.ndim == 2 and ds.dtype == np.uint8:
        return "rows"
    if ds.ndim == 1:
        return "elements"
    raise ValueError(f"unsupported image dataset layout {ds.shape} {ds.dtype}")


@dataclasses.dataclass(frozen=True)
class _EpisodeArrays:
    """The raw (file dtype) state and action arrays of one episode, checked once when read."""

    qpos: np.ndarray  # (T, len(state_names))
    action: np.ndarray  # (T, len(action_names))


class _OpenFiles:
    """One reader thread's recently used open files: path → (file, {key: (dataset, layout)}).

    Per thread, so evicting (closing) a file can never pull it from under another thread;
    tied to the process id, so a forked worker opens its own handles."""

    def __init__(self, max_open: int):
        self.pid = os.getpid()
        self.max_open = max_open
        self.files: collections.OrderedDict[str, tuple[h5py.File, dict[str, tuple[h5py.Dataset, str]]]] = (
            collections.OrderedDict())

    def get(self, path: str) -> tuple[h5py.File, dict[str, tuple[h5py.Dataset, str]]]:
        hit = self.files.get(path)
        if hit is not None:
            self.files.move_to_end(path)
            return hit
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise EpisodeError(f"{path}: cannot open HDF5 file: {err}") from err
        self.files[path] = hit = (f, {})
        while len(self.files) > self.max_open:
            self.files.popitem(last=False)[1][0].close()
        return hit

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1][0].close()


def _element_buffer(el: Any) -> np.ndarray:
    # vlen uint8 → ndarray; opaque → np.void; fixed bytes → np.bytes_ (trailing NULs dropped,
    # harmless after the JPEG end marker). All reinterpreted as raw bytes.
    if isinstance(el, np.ndarray):
        return el.view(np.uint8).reshape(-1)
    if isinstance(el, np.void | bytes | np.bytes_):
        return np.frombuffer(bytes(el), np.uint8)
    raise TypeError(f"cannot read JPEG bytes from element of type {type(el).__name__}")


class HDF5Source:
    """Random-access sampler over a directory of ALOHA-format episode files."""

    def __init__(
        self,
        data_dir: str | os.PathLike | None,
        robot: RobotConfig,
        *,
        files: Sequence[str] | None = None,
        skip_bad_episodes: bool = False,
        index_cache: str | os.PathLike | None = None,
        check_images: bool = True,
        load_instructions: bool = True,
        episode_cache_size: int = 512,
        max_open_files: int = 32,
    ):
        """`check_images`/`load_instructions` = False for state-only use (statistics).
        `episode_cache_size`: episodes whose qpos/action stay in memory (~T · 112 bytes each
        for 14-dim float32); `max_open_files`: open files kept per reader thread."""
        if episode_cache_size < 1 or max_open_files < 1:
            raise ValueError("episode_cache_size and max_open_files must be ≥ 1")
        self.robot = robot
        self.episode_cache_size = episode_cache_size
        self.max_open_files = max_open_files
        self.dataset_name = robot.dataset_name
        self.skip_bad_episodes = skip_bad_episodes
        self.check_images = check_images
        self.load_instructions = load_instructions
        self.files = list(files) if files is not None else find_episode_files(data_dir)
        self._state_idx = action_space.indices_of(robot.state_names)
        self._action_idx = action_space.indices_of(robot.action_names)
        self._state_div = robot.state_divisor_array
        self._action_div = robot.action_divisor_array
        self.state_elem_mask = action_space.mask_of(robot.state_names)
        self._instructions: dict[str, dict[str, Any]] = {}
        self._init_caches()
        self.report = ScanReport()
        self.episodes = self._scan(index_cache)
        if not self.episodes:
            raise EpisodeError(f"{data_dir or self.files}: no usable episodes for {self.dataset_name}; "
                               f"skipped {self.report.counts()}")
        w = np.asarray([e.usable_len for e in self.episodes], np.float64)
        self._cum_weights = np.cumsum(w)
        if self.report.skipped:
            unreadable = self.report.skipped.get("error", [])
            listed = "".join(f"\n  {p}" for p in unreadable[:20]) + ("\n  ..." if len(unreadable) > 20 else "")
            log.warning("%s: skipped episodes %s%s", self.dataset_name, self.report.counts(),
                        f"; unreadable files:{listed}" if unreadable else "")

    # ---------------------------------------------------------------- caches
    def _init_caches(self) -> None:
        self._arrays: collections.OrderedDict[int, _EpisodeArrays] = collections.OrderedDict()
        self._arrays_lock = threading.Lock()
        self._local = threading.local()
        self.bad_samples = BadSampleLog(self.dataset_name)

    def __getstate__(self) -> dict[str, Any]:
        # Open files, locks and thread-locals do not pickle (e.g. to multiprocessing workers):
        # a copy starts with empty caches.
        state = self.__dict__.copy()
        for k in ("_arrays", "_arrays_lock", "_local", "bad_samples"):
            del state[k]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def close(self) -> None:
        """Close the files the calling thread keeps open (others close theirs when they end)."""
        files = getattr(self._local, "files", None)
        if files is not None:
            files.close()
            del self._local.files

    def _open(self, path: str) -> tuple[h5py.File, dict[str, tuple[h5py.Dataset, str]]]:
        files = getattr(self._local, "files", None)
        if files is None or files.pid != os.getpid():
            files = self._local.files = _OpenFiles(self.max_open_files)
        return files.get(path)

    def _dataset(self, path: str, key: str) -> tuple[h5py.Dataset, str]:
        """The dataset `key` of the open file `path` and its frame layout (looked up once)."""
        f, datasets = self._open(path)
        hit = datasets.get(key)
        if hit is None:
            if key not in f:
                raise EpisodeError(f"{path}: missing key {key!r}")
            ds = f[key]
            try:
                hit = datasets[key] = (ds, frame_bytes_layout(ds))
            except ValueError as e:
                raise EpisodeError(f"{path}: {key!r}: {e}") from e
        return hit

    def _episode_arrays(self, episode: int) -> _EpisodeArrays:
        """qpos/action of an episode, from the LRU or read (and checked) now."""
        with self._arrays_lock:
            hit = self._arrays.get(episode)
            if hit is not None:
                self._arrays.move_to_end(episode)
                return hit
        hit = self._read_arrays(self.episodes[episode])  # outside the lock: I/O
        with self._arrays_lock:
            self._arrays[episode] = hit
            while len(self._arrays) > self.episode_cache_size:
                self._arrays.popitem(last=False)
        return hit

    def _read_arrays(self, ep: EpisodeInfo) -> _EpisodeArrays:
        # The same checks as the scan: the file may have changed since (or the scan came from
        # the index cache), and a bad value must name the file, key and step.
        r, path = self.robot, ep.path
        f, _ = self._open(path)
        out = []
        for key, names in ((r.state_key, r.state_names), (r.action_key, r.action_names)):
            a = _read(f, key, path)
            if a.ndim != 2 or a.shape != (ep.num_steps, len(names)):
                raise EpisodeError(f"{path}: {key!r} has shape {a.shape}, expected ({ep.num_steps}, {len(names)}) "
                                   "(file changed since it was scanned?)")
            _check_finite(a, path, key)
            a.setflags(write=False)
            out.append(a)
        return _EpisodeArrays(qpos=out[0], action=out[1])

    # ------------------------------------------------------------------ scan
    def _fingerprint(self) -> str:
        # Entries scanned without image checks must not satisfy a source that wants them.
        blob = {"robot": self.robot.to_json_dict(), "check_images": self.check_images}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def _scan(self, index_cache: str | os.PathLike | None) -> list[EpisodeInfo]:
        cached: dict[str, Any] = {}
        if index_cache is not None and os.path.exists(index_cache):
            with open(index_cache) as f:
                blob = json.load(f)
            if blob.get("version") == _INDEX_VERSION and blob.get("robot") == self._fingerprint():
                cached = blob["files"]
        entries: dict[str, Any] = {}
        episodes = []
        bad_instruction_dirs: set[str] = set()
        for path in self.files:
            st = os.stat(path)
            key = [st.st_size, st.st_mtime_ns]
            hit = cached.get(path)
            # A cached error is only reused by a source that skips bad episodes; a strict one re-scans
            # the file and raises its error.
            reusable = hit is not None and (self.skip_bad_episodes or not str(hit["skip"]).startswith("error:"))
            if reusable and hit["stat"] == key:
                entry = hit
            else:
                try:
                    info = self.scan_file(path)
                    entry = {"stat": key, "info": info.to_json() if isinstance(info, EpisodeInfo) else None,
                             "skip": None if isinstance(info, EpisodeInfo) else info}
                except EpisodeError as e:
                    if not self.skip_bad_episodes:
                        raise
                    entry = {"stat": key, "info": None, "skip": f"error: {e}"}
            entries[path] = entry
            if entry["info"] is not None and self.load_instructions:
                folder = os.path.dirname(path)
                if folder in bad_instruction_dirs:  # warned about at its first episode
                    self.report.add("error", path)
                    continue
                try:
                    self._load_instructions(path)
                except EpisodeError as e:
                    if not self.skip_bad_episodes:
                        raise
                    bad_instruction_dirs.add(folder)
                    log.warning("%s: skipping the episodes of %s: %s", self.dataset_name, folder, e)
                    self.report.add("error", path)
                    continue
            if entry["info"] is not None:
                episodes.append(EpisodeInfo.from_json(entry["info"]))
            else:
                self.report.add(entry["skip"].split(":")[0], path)
        self.report.used = len(episodes)
        if index_cache is not None:
            tmp = f"{index_cache}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"version": _INDEX_VERSION, "robot": self._fingerprint(), "files": entries}, f)
            os.replace(tmp, index_cache)
        return episodes

    def scan_file(self, path: str) -> EpisodeInfo | str:
        """Check one file and compute its EpisodeInfo, or return a skip reason ('too_short')."""
        r = self.robot
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise EpisodeError(f"{path}: cannot open HDF5 file (truncated or corrupt?): {e}") from e
        with f:
            qpos = _read(f, r.state_key, path)
            action = _read(f, r.action_key, path)
            for key, a, names in ((r.state_key, qpos, r.state_names), (r.action_key, action, r.action_names)):
                if a.ndim != 2 or a.shape[1] != len(names):
                    raise EpisodeError(f"{path}: {key!r} has shape {a.shape}, expected (T, {len(names)})")
                _check_finite(a, path, key)
            num_steps = qpos.shape[0]
            if action.shape[0] != num_steps:
                raise EpisodeError(f"{path}: {r.action_key!r} has {action.shape[0]} steps, "
                                   f"{r.state_key!r} has {num_steps}")
            for key in r.camera_keys:
                if key is None:
                    continue
                if key not in f:
                    raise EpisodeError(f"{path}: missing key {key!r}")
                ds = f[key]
                if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
                    what = "a group" if isinstance(ds, h5py.Group) else f"shape {getattr(ds, 'shape', None)}"
                    raise EpisodeError(f"{path}: {key!r} is {what}, expected a dataset of {num_steps} frames")
                if ds.shape[0] != num_steps:
                    raise EpisodeError(f"{path}: {key!r} has {ds.shape[0]} frames, expected {num_steps}")
                try:
                    layout = frame_bytes_layout(ds)
                except ValueError as e:
                    raise EpisodeError(f"{path}: {key!r}: {e}") from e
                if self.check_images and num_steps:
                    self._read_frames(ds, layout, key, path, 0, 1)
            if num_steps < r.min_episode_len:
                return "too_short"
            first_idx = first_movement(qpos, r.first_move_threshold)
            if first_idx is None:
                raise EpisodeError(f"{path}: {r.state_key!r} never moves more than "
                                   f"{r.first_move_threshold} from step 0")
        state = qpos / self._state_div
        return EpisodeInfo(
            path=path, num_steps=num_steps, first_idx=first_idx,
            state_std=np.std(state, axis=0), state_mean=np.mean(state, axis=0),
            state_norm=np.sqrt(np.mean(state**2, axis=0)),
        )

    def _load_instructions(self, path: str) -> None:
        d = os.path.dirname(path)
        if d in self._instructions:
            return
        jpath = os.path.join(d, self.robot.instruction_file)
        try:
            with open(jpath) as f:
                content = json.load(f)
        except FileNotFoundError as e:
            raise EpisodeError(f"{path}: instruction file {jpath} not found") from e
        except json.JSONDecodeError as e:
            raise EpisodeError(f"{jpath}: invalid JSON ({e})") from e
        if not isinstance(content, dict):
            raise EpisodeError(f"{jpath}: expected a JSON object with keys {list(self.robot.instruction_keys)}, "
                               f"got a {type(content).__name__}")
        for k in self.robot.instruction_keys:
            v = content.get(k)
            ok = isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(s, str) for s in v))
            if not ok:
                raise EpisodeError(f"{jpath}: key {k!r} must be a string or a non-empty list of strings")
        self._instructions[d] = content

    # ---------------------------------------------------------------- sample
    def _read_frames(self, ds: h5py.Dataset, layout: str, key: str, path: str, start: int, stop: int
                     ) -> list[np.ndarray]:
        try:
            raw = ds[start:stop]  # one read for all the frames
        except (OSError, ValueError, TypeError) as e:
            raise EpisodeError(f"{path}: cannot read {key!r} steps [{start}, {stop}) ({e})") from e
        out = []
        for t, el in zip(range(start, stop), raw, strict=True):
            where = f"{path}: {key!r} step {t}"
            if layout == "raw":
                img = np.asarray(el)
                if img.dtype != np.uint8:
                    raise EpisodeError(f"{where}: raw frames must be uint8, got {img.dtype}")
            else:
                try:
                    img = decode_jpeg(_element_buffer(el), color=self.robot.jpeg_color, where=where)
                except (ValueError, TypeError) as e:
                    raise EpisodeError(str(e)) from e
            want = self.robot.image_shape
            if (want is not None and img.shape != want) or img.ndim != 3 or img.shape[-1] != 3:
                raise EpisodeError(f"{where}: image shape {img.shape}, expected {want or '(H, W, 3)'}")
            out.append(img)
        return out

    def choose(self, rng: np.random.Generator) -> tuple[int, int]:
        """(episode number, step_id) with the official weights."""
        e = int(np.searchsorted(self._cum_weights, rng.random() * self._cum_weights[-1], side="right"))
        e = min(e, len(self.episodes) - 1)
        ep = self.episodes[e]
        return e, int(rng.integers(ep.first_idx - 1, ep.num_steps))

    def instructions(self) -> list[tuple[str, str, str | None]]:
        """Every instruction the episodes can draw: (instruction file, text, embedding file or None)."""
        out = []
        for d, content in self._instructions.items():
            jpath = os.path.join(d, self.robot.instruction_file)
            for k in self.robot.instruction_keys:
                v = content[k]
                for text in (v if isinstance(v, list) else [v]):
                    out.append((jpath, text, self._embedding_path(d, text)))
        return out

    @staticmethod
    def _embedding_path(episode_dir: str, text: str) -> str | None:
        # Precomputed embeddings: the entry is a file path (a trailing "." from the TF
        # pipeline's capitalisation helper is dropped, as officially).
        cand = text[:-1] if text.endswith(".") else text
        if cand.endswith((".pt", ".safetensors")):
            return cand if os.path.isabs(cand) else os.path.join(episode_dir, cand)
        return None

    def _instruction(self, path: str, rng: np.random.Generator) -> tuple[str, str | None]:
        if not self.load_instructions:
            raise RuntimeError(f"{self.dataset_name}: source built with load_instructions=False cannot sample")
        content = self._instructions[os.path.dirname(path)]
        v = content[self.robot.instruction_keys[int(rng.integers(len(self.robot.instruction_keys)))]]
        text = v[int(rng.integers(len(v)))] if isinstance(v, list) else v
        return text, self._embedding_path(os.path.dirname(path), text)

    def get(self, index: int, rng: np.random.Generator) -> RawSample:
        """A random sample. With `skip_bad_episodes`, a draw whose data fail to read (a frame that does
        not decode, a file changed since the scan) is named in a warning and replaced by a fresh draw from
        the same `rng` (rdt_jax.data.bad_samples)."""
        del index  # HDF5 sampling is random like the official loader; rng carries (seed, index)

        def draw() -> RawSample:
            return self.sample_at(*self.choose(rng), rng)

        return first_readable(draw, (EpisodeError,), self.bad_samples if self.skip_bad_episodes else None)

    def sample_at(self, episode: int, step_id: int, rng: np.random.Generator | None = None) -> RawSample:
        """The sample of step `step_id` of episode `episode` (rng only picks the instruction)."""
        r, ep = self.robot, self.episodes[episode]
        path = ep.path
        if not ep.first_idx - 1 <= step_id < ep.num_steps:
            raise IndexError(f"{path}: step {step_id} outside [{ep.first_idx - 1}, {ep.num_steps})")
        arrays = self._episode_arrays(episode)
        state = arrays.qpos[step_id:step_id + 1] / self._state_div
        actions = arrays.action[step_id:step_id + r.horizon] / self._action_div
        frames, masks = [], []
        valid_len = min(step_id - (ep.first_idx - 1) + 1, IMG_HISTORY)
        time_mask = np.array([False] * (IMG_HISTORY - valid_len) + [True] * valid_len)
        for key in r.camera_keys:
            if key is None:
                frames.append(np.zeros((IMG_HISTORY, 0, 0, 3), np.uint8))
                masks.append(np.zeros(IMG_HISTORY, bool))
                continue
            ds, layout = self._dataset(path, key)
            imgs = self._read_frames(ds, layout, key, path, max(step_id - IMG_HISTORY + 1, 0), step_id + 1)
            imgs = [imgs[0]] * (IMG_HISTORY - len(imgs)) + imgs  # repeat the first frame in front
            frames.append(np.stack(imgs))
            masks.append(time_mask)
        if actions.shape[0] < r.horizon:
            actions = np.concatenate([actions, np.repeat(actions[-1:], r.horizon - actions.shape[0], 0)])
        instruction, embed_path = self._instruction(path, rng or np.random.default_rng(0))

        def unified(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
            out = np.zeros((*x.shape[:-1], action_space.STATE_DIM), np.float64)
            out[..., idx] = x
            return out

        return RawSample(
            dataset_name=self.dataset_name, episode_id=path, step_id=step_id,
            state=unified(state, self._state_idx), actions=unified(actions, self._action_idx),
            state_elem_mask=self.state_elem_mask.copy(),
            state_std=unified(ep.state_std, self._state_idx),
            state_mean=unified(ep.state_mean, self._state_idx),
            state_norm=unified(ep.state_norm, self._state_idx),
            frames=tuple(frames), frame_masks=np.stack(masks), ctrl_freq=float(r.ctrl_freq),
            instruction=instruction, lang_embed_path=embed_path,
        )

    def episode_states(self) -> Iterator[np.ndarray]:
        """Per episode, the unified states from first_idx − 1 to the end (for statistics)."""
        for ep in self.episodes:
            with h5py.File(ep.path, "r") as f:
                q = _read(f, self.robot.state_key, ep.path, slice(ep.first_idx - 1, None)) / self._state_div
            out = np.zeros((q.shape[0], action_space.STATE_DIM), np.float64)
            out[:, self._state_idx] = q
            yield out
