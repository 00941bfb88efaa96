"""RLDS episodes (ArrayRecord) → `RawSample`s with the official pretraining semantics.

Per episode (DATA.md §5.2–5.3): states from the registry mapping; episodes shorter than
`EPSD_LEN_THRESH_LOW` steps or rejected by the dataset's filter are dropped. Per step t:
state = state t; actions = states t+1 … t+64, padded by repeating the last state; the
mask of the mapped slots; population std / mean / sqrt(mean x²) of the episode's states;
camera frames (t−1, t) with the older one marked invalid at t = 0 (it repeats frame 0).

Uniform step sampling: the step index (`StepIndex`, written next to the converted dataset)
gives every kept episode `min(T, EPSD_LEN_THRESH_HIGH)` entries. For T ≤ 2048 entry j is
step j; for longer episodes each entry draws a uniform step, so every step of such an
episode is expected 2048/T times per pass — the marginal of the official "random 2048
steps per visit".
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import pathlib
import threading

import numpy as np

from rdt_jax.data.action_space import SLOT_NAMES
from rdt_jax.data.bad_samples import BadSampleLog, first_readable
from rdt_jax.data.rlds import registry
from rdt_jax.data.rlds.reader import EpisodeStore, RawEpisode
from rdt_jax.data.rlds.spec import DatasetSpec, episode_states_and_masks
from rdt_jax.data.schema import ACTION_HORIZON, IMG_HISTORY, NUM_CAMERAS, EpisodeError, RawSample

INDEX_FILE = "rdt_step_index.npz"
INDEX_META = "rdt_step_index.json"


@dataclasses.dataclass(frozen=True)
class StepIndex:
    """Per episode record: its length and whether it is used; the flat entry table."""

    dataset_name: str
    lengths: np.ndarray  # (E,) int64 steps per record
    kept: np.ndarray  # (E,) bool: passes the dataset filter and the low length threshold
    dropped_by_filter: int
    dropped_short: int
    thresh_low: int = registry.EPSD_LEN_THRESH_LOW
    thresh_high: int = registry.EPSD_LEN_THRESH_HIGH
    # The distinct instructions of the kept records, in first-seen order: what training checks against the
    # embedding store before it starts (None in indexes built before they were recorded).
    instructions: tuple[str, ...] | None = None

    @property
    def records(self) -> np.ndarray:
        return np.flatnonzero(self.kept)

    @property
    def entries_per_record(self) -> np.ndarray:
        return np.minimum(self.lengths[self.kept], self.thresh_high)

    @property
    def num_entries(self) -> int:
        return int(self.entries_per_record.sum())

    def save(self, builder_dir: pathlib.Path) -> None:
        np.savez(builder_dir / INDEX_FILE, lengths=self.lengths.astype(np.int64), kept=self.kept.astype(bool))
        meta = {
            "dataset_name": self.dataset_name,
            "dropped_by_filter": self.dropped_by_filter,
            "dropped_short": self.dropped_short,
            "thresh_low": self.thresh_low,
            "thresh_high": self.thresh_high,
            "num_entries": self.num_entries,
            "instructions": None if self.instructions is None else list(self.instructions),
        }
        (builder_dir / INDEX_META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, builder_dir: pathlib.Path) -> StepIndex:
        f, m = builder_dir / INDEX_FILE, builder_dir / INDEX_META
        if not f.is_file() or not m.is_file():
            raise FileNotFoundError(
                f"{builder_dir}: no step index ({INDEX_FILE}); run scripts/convert_rlds.py "
                f"(or --index-only) on this dataset"
            )
        meta = json.loads(m.read_text())
        with np.load(f, allow_pickle=False) as z:
            return cls(
                meta["dataset_name"],
                z["lengths"],
                z["kept"],
                meta["dropped_by_filter"],
                meta["dropped_short"],
                meta["thresh_low"],
                meta["thresh_high"],
                None if meta.get("instructions") is None else tuple(meta["instructions"]),
            )


def _filter_value(spec: DatasetSpec, ep: RawEpisode) -> object:
    f = spec.episode_filter
    assert f is not None
    table = ep.meta if f.level == "episode" else ep.steps
    if f.key not in table:
        raise KeyError(
            f"{ep.where}: dataset {spec.name} filters on {f.level} feature {f.key!r}, which is "
            f"missing; available: {sorted(table)}"
        )
    return table[f.key] if f.level == "episode" else table[f.key][0]


def build_step_index(store: EpisodeStore, spec: DatasetSpec) -> StepIndex:
    """Read every episode once (no image decoding) for its length and filter verdict."""
    lengths = np.zeros(len(store), np.int64)
    kept = np.zeros(len(store), bool)
    by_filter = short = 0
    instructions: dict[str, None] = {}
    for rec in range(len(store)):
        ep = store.read(rec)
        lengths[rec] = ep.num_steps
        if (
            spec.episode_filter is not None
            and ep.num_steps > 0
            and not spec.episode_filter.keep(_filter_value(spec, ep))
        ):
            by_filter += 1
            continue
        if ep.num_steps < registry.EPSD_LEN_THRESH_LOW:
            short += 1
            continue
        kept[rec] = True
        instructions.setdefault(instruction_of(spec, ep, spec.name), None)
    return StepIndex(spec.name, lengths, kept, by_filter, short, instructions=tuple(instructions))


def instruction_of(spec: DatasetSpec, raw: RawEpisode, dataset_name: str) -> str:
    """The episode's instruction text, cleaned as the official reader does (the dataset's constant or its
    first step's instruction feature)."""
    ins = spec.instruction
    first = None if ins.kind == "constant" else raw.steps.get(ins.key)
    if ins.kind != "constant" and first is None:
        raise KeyError(f"{dataset_name}:{raw.where}: instruction feature {ins.key!r} missing")
    return ins.resolve(None if first is None else first[0])


@dataclasses.dataclass(frozen=True)
class EpisodeData:
    raw: RawEpisode
    states: np.ndarray  # (T, 128) float32
    masks: np.ndarray  # (T, 128) float32 0/1: the mapped slots of each step
    std: np.ndarray
    mean: np.ndarray
    norm: np.ndarray
    instruction: str


def pad_future(states: np.ndarray, t: int, horizon: int) -> np.ndarray:
    """states t+1 … t+horizon, padded by repeating the last state."""
    fut = states[t + 1 : t + 1 + horizon]
    if len(fut) < horizon:
        fut = np.concatenate([fut, np.repeat(states[-1:], horizon - len(fut), axis=0)], axis=0)
    return fut


class RldsSource:
    """A `schema.StepSource` over one converted RLDS dataset directory (`<name>/<version>`)."""

    def __init__(
        self,
        builder_dir: str | pathlib.Path,
        dataset_name: str | None = None,
        *,
        horizon: int = ACTION_HORIZON,
        cache_episodes: int = 4,
        skip_bad_episodes: bool = False,
    ):
        """``skip_bad_episodes``: a sample whose episode cannot be used (its record does not parse, its
        states hold NaN/inf, its camera frames do not decode: an :class:`EpisodeError`) is named in a
        warning and replaced by another drawn from the same rng (rdt_jax.data.bad_samples), instead of
        stopping the run."""
        self.builder_dir = pathlib.Path(builder_dir)
        self.store = EpisodeStore(self.builder_dir)
        self.index = StepIndex.load(self.builder_dir)
        # The registry name the step index was built for (convert_rlds.py --name), which may differ from
        # the tfds name in dataset_info.json.
        self.dataset_name = dataset_name or self.index.dataset_name
        self.spec = registry.get_spec(self.dataset_name)
        if self.index.dataset_name != self.dataset_name:
            raise ValueError(
                f"{self.builder_dir}: step index was built for {self.index.dataset_name!r}, not {self.dataset_name!r}"
            )
        if len(self.index.lengths) != len(self.store):
            raise ValueError(
                f"{self.builder_dir}: step index covers {len(self.index.lengths)} episodes, the "
                f"dataset has {len(self.store)}; rebuild it (scripts/convert_rlds.py --index-only)"
            )
        if self.index.num_entries == 0:
            raise ValueError(
                f"{self.builder_dir}: no usable episode (all shorter than "
                f"{self.index.thresh_low} steps or filtered out)"
            )
        self.horizon = horizon
        self._records = self.index.records
        self._starts = np.concatenate([[0], np.cumsum(self.index.entries_per_record)])
        self._cache: collections.OrderedDict[int, EpisodeData] = collections.OrderedDict()
        self._cache_size = cache_episodes
        self._lock = threading.Lock()
        self.skip_bad_episodes = skip_bad_episodes
        self.bad_samples = BadSampleLog(self.dataset_name)

    def __len__(self) -> int:
        return self.index.num_entries

    def episode(self, record: int) -> EpisodeData:
        with self._lock:
            if record in self._cache:
                self._cache.move_to_end(record)
                return self._cache[record]
        raw = self.store.read(record)
        states, masks = episode_states_and_masks(self.spec, raw.steps, f"{self.dataset_name}:{raw.where}")
        if not np.all(np.isfinite(states)):
            bad = [SLOT_NAMES[i] for i in np.flatnonzero(~np.all(np.isfinite(states), axis=0))]
            raise EpisodeError(f"{self.dataset_name}:{raw.where}: NaN/inf in unified state slots {bad}")
        s64 = states.astype(np.float64)
        data = EpisodeData(
            raw,
            states,
            masks,
            s64.std(axis=0).astype(np.float32),
            s64.mean(axis=0).astype(np.float32),
            np.sqrt((s64**2).mean(axis=0)).astype(np.float32),
            self._instruction(raw),
        )
        with self._lock:
            self._cache[record] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def _instruction(self, raw) -> str:
        return instruction_of(self.spec, raw, self.dataset_name)

    def instructions(self) -> list[str]:
        """The distinct instructions of the used episodes, in first-seen order: what ``scripts/encode_lang.py
        --rlds-dirs`` pre-encodes. Recorded in the step index; for an index from before they were, one pass
        over the records (no image decoding)."""
        if self.index.instructions is not None:
            return list(self.index.instructions)
        seen: dict[str, None] = {}
        for record in self.index.records:
            seen.setdefault(self._instruction(self.store.read(int(record))), None)
        return list(seen)

    @property
    def steps_per_visit(self) -> float:
        """Mean steps one official episode visit yields (§5.2: min(T, 2048) of a kept episode, nothing for
        one dropped as too short), over the episodes the dataset filter passes."""
        visits = int(self.index.kept.sum()) + self.index.dropped_short
        return self.index.num_entries / visits

    def locate(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
        """(record, step) of flat entry `index` (taken modulo the number of entries)."""
        i = int(index) % len(self)
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        record = int(self._records[k])
        length = int(self.index.lengths[record])
        j = i - int(self._starts[k])
        step = j if length <= self.index.thresh_high else int(rng.integers(length))
        return record, step

    def get(self, index: int, rng: np.random.Generator) -> RawSample:
        # The sample at `index`, then (only if its episode cannot be used) random replacements.
        indices = itertools.chain([index], iter(lambda: int(rng.integers(len(self))), None))

        def draw() -> RawSample:
            return self.sample(*self.locate(next(indices), rng))

        return first_readable(draw, (EpisodeError,), self.bad_samples if self.skip_bad_episodes else None)

    def sample(self, record: int, step: int) -> RawSample:
        ep = self.episode(record)
        t_len = len(ep.states)
        if not 0 <= step < t_len:
            raise IndexError(f"{self.dataset_name}:{ep.raw.where}: step {step} outside [0, {t_len})")
        frames, masks = [], np.zeros((NUM_CAMERAS, IMG_HISTORY), bool)
        for c, key in enumerate(self.spec.cameras):
            if key is None:
                frames.append(np.zeros((IMG_HISTORY, 0, 0, 3), np.uint8))
                continue
            prev, cur = (self.store.decode_image(ep.raw, key, s) for s in (max(step - 1, 0), step))
            if prev.shape != cur.shape:
                raise ValueError(
                    f"{self.dataset_name}:{ep.raw.where}: camera {key!r} frame size changes {prev.shape} → {cur.shape}"
                )
            pair = np.stack([prev, cur])
            frames.append(pair[..., ::-1].copy() if self.spec.bgr else pair)
            masks[c] = (step > 0, True)
        return RawSample(
            dataset_name=self.dataset_name,
            episode_id=ep.raw.where,
            step_id=step,
            state=ep.states[step : step + 1],
            actions=pad_future(ep.states, step, self.horizon),
            state_elem_mask=ep.masks[step],  # the official state_vec_mask is that of step t
            state_std=ep.std,
            state_mean=ep.mean,
            state_norm=ep.norm,
            frames=tuple(frames),
            frame_masks=masks,
            ctrl_freq=float(self.spec.ctrl_freq),
            instruction=ep.instruction,
        )
