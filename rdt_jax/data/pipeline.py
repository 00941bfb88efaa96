"""Weighted mixture of named step sources → transformed, sharded, batched grain pipeline.

Global sample index i (0, 1, 2, …) → dataset k (weighted choice) → `source.get(i, rng)` →
`SampleTransform(raw, rng')`, with every generator derived from (seed, purpose, i). A source with a
fixed set of entries (`schema.IndexedStepSource`: RLDS, one entry per step of its step index) gets
`source.get(e, rng)` instead, e = the position of i in a permutation of its entries that changes
every len(source) indices (grain's `index_shuffle`), so batches mix episodes and every seed visits
them in its own order (the official reader shuffles files, steps and a sample buffer). Process
p of P then takes indices i ≡ p (mod P) (disjoint streams, no coordination) and batches them.
The iterator is a grain `DatasetIterator`: `get_state()`/`set_state()` give a small dict
(the next index) that can go into an Orbax checkpoint.

Mixing: `"random"` draws the dataset of each sample independently with probability ∝ weight
(`MapDataset.select_from_datasets` with a seeded selection map); `"interleave"` uses grain's
deterministic `MapDataset.mix` (exact proportions over every window of sum(weights) samples).
Either way the weights are shares of samples. The official pretraining weights are shares of
episode visits instead (each visit yields all of an episode's steps, up to 2048):
:func:`per_episode_weights` turns them into sample shares.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Literal

import grain
import numpy as np

from rdt_jax.data import language
from rdt_jax.data.schema import BatchConfig, IndexedStepSource, StepSource
from rdt_jax.data.transform import SampleTransform

# Distinct streams per purpose, so adding e.g. augmentation never shifts the dataset choice.
_SELECT, _SOURCE, _TRANSFORM, _SHUFFLE = 1, 2, 3, 4


def load_weights(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, float]:
    """Weights `{dataset: weight}` from a JSON file (e.g. pretrain_sample_weights.json)."""
    with open(path) as f:
        w = json.load(f)
    if not isinstance(w, dict) or not all(isinstance(v, int | float) for v in w.values()):
        raise ValueError(f"{path}: expected a JSON object {{dataset_name: weight}}")
    if names is not None:
        missing = sorted(set(names) - set(w))
        if missing:
            raise KeyError(f"{path}: no weight for datasets {missing}")
        w = {n: w[n] for n in names}
    return {k: float(v) for k, v in w.items()}


def per_episode_weights(sources: Mapping[str, StepSource], weights: Mapping[str, float]) -> dict[str, float]:
    """Sample-share weights equivalent to the official per-episode-visit weights (DATA.md §5.2).

    The official loop picks a dataset by weight and yields every step of its next episode (min(T, 2048)
    of them; none when the episode is too short), so a dataset's share of samples is ∝ weight × the
    steps one visit yields on average (``source.steps_per_visit``).
    """
    out = {}
    for name, w in weights.items():
        per_visit = getattr(sources[name], "steps_per_visit", None)
        if per_visit is None:
            raise TypeError(f"source {name!r} ({type(sources[name]).__name__}) has no steps_per_visit")
        out[name] = float(w) * float(per_visit)
    return out


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seed: int = 0
    mixing: Literal["random", "interleave"] = "random"
    num_threads: int = 2  # grain read threads (cv2/PIL release the GIL)
    prefetch_buffer_size: int = 16  # samples


@functools.lru_cache(maxsize=256)
def _epoch_seed(seed: int, dataset_id: int, epoch: int) -> int:
    # 32-bit, as index_shuffle takes; cached: every sample of an epoch asks for it.
    return int(np.random.SeedSequence([seed, _SHUFFLE, dataset_id, epoch]).generate_state(1)[0])


class _SourceMap(grain.MapDataset):
    """An infinite MapDataset view of a StepSource."""

    def __init__(self, source: StepSource, dataset_id: int, seed: int):
        super().__init__()
        self._source, self._id, self._seed = source, dataset_id, seed
        self._entries = len(source) if isinstance(source, IndexedStepSource) else 0
        if isinstance(source, IndexedStepSource) and self._entries <= 0:
            raise ValueError(f"source {source.dataset_name!r} has no entries")

    def __len__(self) -> int:
        return sys.maxsize

    def entry(self, index: int) -> int:
        """The source index global index ``index`` reads: itself, or for an indexed source its entry in
        the shuffled epoch ``index // len(source)`` (epochs of global indices: in a random mixture a
        dataset sees a weight-sized share of each, drawn without replacement)."""
        if not self._entries:
            return index
        epoch, position = divmod(index, self._entries)
        seed = _epoch_seed(self._seed, self._id, epoch)
        return grain.experimental.index_shuffle(position, max_index=self._entries - 1, seed=seed, rounds=4)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rng = np.random.default_rng([self._seed, _SOURCE, self._id, index])
        return self._source.get(self.entry(index), rng)

    def __str__(self) -> str:
        return f"_SourceMap({self._source.dataset_name})"


class RandomSelection(grain.transforms.DatasetSelectionMap):
    """Global index i → (dataset drawn ∝ weights from rng(seed, i), i)."""

    def __init__(self, weights: Sequence[float], seed: int):
        w = np.asarray(weights, np.float64)
        if w.ndim != 1 or not len(w) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        self._cum = np.cumsum(w / w.sum())
        self._seed = seed

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        u = np.random.default_rng([self._seed, _SELECT, index]).random()
        return min(int(np.searchsorted(self._cum, u, side="right")), len(self._cum) - 1), index


def build_mixture(
    sources: Mapping[str, StepSource],
    weights: Mapping[str, float],
    transform: SampleTransform,
    cfg: PipelineConfig,
) -> grain.MapDataset:
    """The infinite, unsharded MapDataset of transformed samples (index = global sample index)."""
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise KeyError(f"weights name datasets without a source: {unknown}")
    names = [n for n in sources if weights.get(n, 0) > 0]
    if not names:
        raise ValueError(f"no dataset with positive weight among {sorted(sources)}")
    for n in names:
        if n not in transform.dataset_ids:
            raise KeyError(f"unknown dataset name {n!r}: no dataset id ({sorted(transform.dataset_ids)})")
        if sources[n].dataset_name != n:
            raise ValueError(f"source registered as {n!r} yields dataset_name {sources[n].dataset_name!r}")
    children = [_SourceMap(sources[n], transform.dataset_ids[n], cfg.seed) for n in names]
    w = [float(weights[n]) for n in names]
    if cfg.mixing == "random":
        mixed = grain.MapDataset.select_from_datasets(children, RandomSelection(w, cfg.seed))
    elif cfg.mixing == "interleave":
        mixed = grain.MapDataset.mix(children, w)
    else:
        raise ValueError(f"unknown mixing {cfg.mixing!r}")
    seed = cfg.seed
    return mixed.map_with_index(
        lambda i, raw: transform(raw, np.random.default_rng([seed, _TRANSFORM, i])))


def build_pipeline(
    sources: Mapping[str, StepSource],
    weights: Mapping[str, float],
    transform: SampleTransform,
    batch_cfg: BatchConfig,
    cfg: PipelineConfig = PipelineConfig(),
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches of `batch_cfg.batch_size` samples for this process (pass jax.process_index()/count)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    ds = build_mixture(sources, weights, transform, cfg)[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                              prefetch_buffer_size=cfg.prefetch_buffer_size))
    return it.batch(batch_cfg.batch_size, drop_remainder=True, batch_fn=functools.partial(collate, batch_cfg))


def collate(batch_cfg: BatchConfig, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Samples -> one batch: each key stacked; under "bucket" padding the language right-padded to
    ``language.bucket_length`` of the batch's longest instruction (the official collator pads to the
    longest itself, DATA.md section 4.5; the masked tokens change nothing but the work)."""
    keys = [k for k in samples[0] if batch_cfg.lang_padding == "max" or k not in ("lang_embeds", "lang_attn_mask")]
    batch = {k: np.stack([s[k] for s in samples]) for k in keys}
    if batch_cfg.lang_padding == "bucket":
        embs = [s["lang_embeds"] for s in samples]
        length = language.bucket_length(max(e.shape[0] for e in embs), batch_cfg.max_lang_len)
        batch["lang_embeds"], batch["lang_attn_mask"] = language.pad_embeddings(embs, length, embs[0].dtype)
    return batch
