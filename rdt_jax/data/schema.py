"""The two data contracts of the pipeline, in one place.

1. `RawSample`: what a *source* (HDF5 episodes, RLDS/ArrayRecord, …) produces for one
   training step before any randomised transform — unified 128-d vectors, per-episode
   statistics, decoded camera histories, the instruction. Every source yields exactly this.
2. `batch_spec`: the fixed-shape numpy batch that training and validation consume, produced by
   `transform.SampleTransform` + batching.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rdt_jax.data.action_space import STATE_DIM

# Camera slots of the model, in the official order (DATA.md §4.2).
CAMERA_SLOTS: tuple[str, ...] = ("exterior", "right_wrist", "left_wrist")
NUM_CAMERAS = len(CAMERA_SLOTS)
IMG_HISTORY = 2  # frames per camera: (t−1, t)
NUM_IMAGES = NUM_CAMERAS * IMG_HISTORY  # 6, history-major: [ext, right, left] at t−1, then at t
ACTION_HORIZON = 64
LANG_DIM = 4096


class EpisodeError(ValueError):
    """Stored episode data that cannot be used (an HDF5 file or key, an RLDS record that does not parse,
    NaN/inf states, a frame that does not decode); the message names where. What
    ``--data.skip-bad-episodes`` skips, for every source."""


@dataclasses.dataclass(frozen=True)
class RawSample:
    """One step of one episode, source-independent, before the sample transform.

    Arrays are numpy; float arrays are float64 or float32 (the transform casts). A camera
    that the robot does not have is a zero-size array of shape (2, 0, 0, 3); its mask bits are
    ignored. `frames[c][0]` is frame t−1 (or a repeat of frame t at the episode start),
    `frames[c][1]` frame t, RGB uint8 (H, W, 3); cameras may differ in size.
    """

    dataset_name: str
    episode_id: str  # file path or "<dataset>/<split>/<episode index>", for error messages
    step_id: int
    state: np.ndarray  # (S, 128), S ≥ 1; the transform keeps the last row (the current state)
    actions: np.ndarray  # (horizon, 128), already padded by repeating the last row
    state_elem_mask: np.ndarray  # (128,) 0/1: which slots the robot fills
    state_std: np.ndarray  # (128,) per-episode population std (noise scale at a given SNR)
    state_mean: np.ndarray  # (128,) per-episode mean (kept for parity/debugging)
    state_norm: np.ndarray  # (128,) per-episode sqrt(mean(x²))
    frames: tuple[np.ndarray, ...]  # NUM_CAMERAS arrays (2, H, W, 3) uint8, in CAMERA_SLOTS order
    frame_masks: np.ndarray  # (NUM_CAMERAS, 2) bool: frame is real (not a start-of-episode repeat)
    ctrl_freq: float  # control frequency in Hz (dataset_control_freq.json)
    # Language: either a path to a precomputed embedding (.pt or .safetensors) or the text,
    # which the transform looks up in an embedding store (language.EmbeddingStore).
    instruction: str
    lang_embed_path: str | None = None

    def validate(self, horizon: int = ACTION_HORIZON) -> None:
        """Raise ValueError naming the episode and field if a shape/value contract is broken."""
        where = f"{self.dataset_name}:{self.episode_id}@{self.step_id}"

        def fail(msg: str) -> None:
            raise ValueError(f"{where}: {msg}")

        if self.state.ndim != 2 or self.state.shape[1] != STATE_DIM:
            fail(f"state has shape {self.state.shape}, expected (S, {STATE_DIM})")
        if self.actions.shape != (horizon, STATE_DIM):
            fail(f"actions have shape {self.actions.shape}, expected ({horizon}, {STATE_DIM})")
        for name in ("state_elem_mask", "state_std", "state_mean", "state_norm"):
            if getattr(self, name).shape != (STATE_DIM,):
                fail(f"{name} has shape {getattr(self, name).shape}, expected ({STATE_DIM},)")
        for name in ("state", "actions", "state_std", "state_mean", "state_norm"):
            if not np.all(np.isfinite(getattr(self, name))):
                fail(f"{name} contains NaN or inf")
        if len(self.frames) != NUM_CAMERAS or self.frame_masks.shape != (NUM_CAMERAS, IMG_HISTORY):
            fail(f"expected {NUM_CAMERAS} cameras with ({NUM_CAMERAS}, {IMG_HISTORY}) masks, "
                 f"got {len(self.frames)} and {self.frame_masks.shape}")
        for slot, f in zip(CAMERA_SLOTS, self.frames, strict=True):
            bad = f.ndim != 4 or f.shape[0] != IMG_HISTORY or f.shape[-1] != 3 or f.dtype != np.uint8
            if f.size and bad:
                fail(f"camera {slot} frames {f.shape} {f.dtype}, expected ({IMG_HISTORY}, H, W, 3) uint8")


@runtime_checkable
class StepSource(Protocol):
    """A dataset that draws `RawSample`s by index; what the mixture (pipeline.py) consumes.

    `get(index, rng)` must be a pure function of (index, the generator's state): the pipeline
    passes `np.random.default_rng([seed, dataset_id, index])`, so the same seed gives the same
    sample and any index can be produced on any host. Sources that sample randomly (HDF5:
    episode ∝ length, uniform step) use `rng` and may ignore `index`; sources with a fixed set
    of entries are :class:`IndexedStepSource`.
    """

    dataset_name: str

    def get(self, index: int, rng: np.random.Generator) -> RawSample: ...


@runtime_checkable
class IndexedStepSource(StepSource, Protocol):
    """A StepSource whose indices ``0 … len - 1`` address fixed entries (RLDS: the steps of its step
    index). The mixture passes it entries in a shuffled order, a new permutation per epoch
    (pipeline.py), so the source maps an index to its entry directly."""

    def __len__(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int | None, ...]  # None: any length (the language axis under "bucket" padding)
    dtype: np.dtype

    def zeros(self) -> np.ndarray:
        if None in self.shape:
            raise ValueError(f"spec {self.shape} has a free length: no fixed-shape zeros")
        return np.zeros(self.shape, self.dtype)


LANG_PADDINGS = ("max", "bucket")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Fixed shapes of a batch. `image_dtype=uint8` keeps the resized (…, 3, S, S) pixels and
    leaves the normalisation (the same 256-entry table, `image_transform.normalisation_table`) to the
    device (exact: the PIL resize of a uint8 image is uint8)."""

    batch_size: int
    image_size: int = 384
    max_lang_len: int = 1024  # RDT's lang_cond_pos_embed rows; shorter saves host memory
    horizon: int = ACTION_HORIZON
    state_len: int = 1
    image_dtype: str = "float32"  # or "uint8"
    lang_dtype: str = "float32"  # or "bfloat16" (ml_dtypes), as the official embeddings are stored
    # "max": every sample right-padded to max_lang_len tokens (one shape). "bucket": samples keep their
    # own length and a batch is padded to language.bucket_length of its longest instruction, as little
    # as the official collator's batch-longest padding but in few distinct shapes; a sample's
    # lang_embeds is then (L, 4096) and its lang_attn_mask all True.
    lang_padding: str = "max"

    def __post_init__(self) -> None:
        if self.lang_padding not in LANG_PADDINGS:
            raise ValueError(f"lang_padding must be one of {LANG_PADDINGS}, got {self.lang_padding!r}")


def sample_spec(cfg: BatchConfig) -> dict[str, ArraySpec]:
    """Spec of one transformed sample (the batch spec without the leading B axis)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    f32 = np.dtype(np.float32)
    s = cfg.image_size
    lang_len = cfg.max_lang_len if cfg.lang_padding == "max" else None
    return {
        "states": ArraySpec((cfg.state_len, STATE_DIM), f32),
        "actions": ArraySpec((cfg.horizon, STATE_DIM), f32),
        "state_elem_mask": ArraySpec((STATE_DIM,), f32),
        "state_norm": ArraySpec((STATE_DIM,), f32),
        "images": ArraySpec((NUM_IMAGES, 3, s, s), np.dtype(cfg.image_dtype)),
        "image_valid": ArraySpec((NUM_IMAGES,), np.dtype(bool)),
        "lang_embeds": ArraySpec((lang_len, LANG_DIM), np.dtype(cfg.lang_dtype)),
        "lang_attn_mask": ArraySpec((lang_len,), np.dtype(bool)),
        "ctrl_freqs": ArraySpec((), f32),
        "data_indices": ArraySpec((), np.dtype(np.int32)),
    }


def batch_spec(cfg: BatchConfig) -> dict[str, ArraySpec]:
    """Spec of the batch dict training consumes: each sample spec with a leading batch axis."""
    return {k: ArraySpec((cfg.batch_size, *v.shape), v.dtype) for k, v in sample_spec(cfg).items()}


def check_against_spec(arrays: dict[str, Any], spec: dict[str, ArraySpec], what: str = "batch") -> None:
    """Raise ValueError if `arrays` does not have exactly the keys, shapes and dtypes of `spec`."""
    if set(arrays) != set(spec):
        raise ValueError(f"{what}: keys {sorted(arrays)} != expected {sorted(spec)}")
    for k, sp in spec.items():
        a = arrays[k]
        shape = tuple(np.shape(a))
        fits = len(shape) == len(sp.shape) and all(w is None or w == n for n, w in zip(shape, sp.shape, strict=True))
        if not fits or np.asarray(a).dtype != sp.dtype:
            got = f"{np.shape(a)} {np.asarray(a).dtype}"
            raise ValueError(f"{what}[{k}]: {got}, expected {sp.shape} {sp.dtype}")
