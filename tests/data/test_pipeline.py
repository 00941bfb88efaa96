"""grain mixture pipeline: proportions, sharding, checkpoint/resume, determinism, HDF5 end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from hdf5_episodes import make_qpos, write_episode, write_instructions

from rdt_jax.data import language
from rdt_jax.data.hdf5_source import HDF5Source
from rdt_jax.data.pipeline import PipelineConfig, build_pipeline, load_weights, per_episode_weights
from rdt_jax.data.schema import BatchConfig, RawSample, batch_spec, check_against_spec
from rdt_jax.data.transform import SampleTransform, TransformConfig

S = 8
BCFG = BatchConfig(batch_size=4, image_size=S, max_lang_len=2)


class FakeSource:
    """Writes (dataset id, index, a random draw) into the state so batches reveal their origin."""

    def __init__(self, name: str, ds_id: int, lang_path: str):
        self.dataset_name, self.ds_id, self.lang_path = name, ds_id, lang_path

    def get(self, index: int, rng: np.random.Generator) -> RawSample:
        state = np.zeros((1, 128))
        state[0, :3] = [self.ds_id, index, rng.random()]
        frames = tuple(np.full((2, 4, 6, 3), 10 * self.ds_id, np.uint8) for _ in range(3))
        return RawSample(dataset_name=self.dataset_name, episode_id=f"{index}", step_id=0, state=state,
                         actions=np.zeros((64, 128)), state_elem_mask=np.ones(128), state_std=np.zeros(128),
                         state_mean=np.zeros(128), state_norm=np.zeros(128), frames=frames,
                         frame_masks=np.ones((3, 2), bool), ctrl_freq=float(self.ds_id),
                         instruction="x", lang_embed_path=self.lang_path)


NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lang")
    p = d / "e.safetensors"
    language.save_embedding(p, np.ones((1, 4096), np.float32), "x")
    ids = {n: i for i, n in enumerate(NAMES)}
    sources = {n: FakeSource(n, i, str(p)) for n, i in ids.items()}
    tf = SampleTransform(TransformConfig.eval(), BCFG,
                         dataset_ids=ids, dataset_state_mean={n: np.zeros(128) for n in NAMES})
    return sources, tf


def pipeline(setup, weights, seed=0, pi=0, pc=1, mixing="random", threads=1, prefetch=4):
    sources, tf = setup
    cfg = PipelineConfig(seed=seed, mixing=mixing, num_threads=threads, prefetch_buffer_size=prefetch)
    return build_pipeline(sources, weights, tf, BCFG, cfg, process_index=pi, process_count=pc)


def take(it, n):
    return [next(it) for _ in range(n)]


def ids_of(batches):
    # (dataset id, global index) per sample, read back from the state the fake source wrote
    return [(int(b["states"][k, 0, 0]), int(b["states"][k, 0, 1])) for b in batches for k in range(BCFG.batch_size)]


@pytest.mark.parametrize("mixing", ["random", "interleave"])
def test_mixture_proportions(setup, mixing):
    w = {"a": 6.0, "b": 3.0, "c": 1.0}
    batches = take(iter(pipeline(setup, w, mixing=mixing, threads=2)), 250)
    check_against_spec(batches[0], batch_spec(BCFG))
    ds = np.array([i for i, _ in ids_of(batches)])
    n = len(ds)
    for k, p in enumerate([0.6, 0.3, 0.1]):
        assert abs(np.mean(ds == k) - p) < 4 * np.sqrt(p * (1 - p) / n), (mixing, k, np.mean(ds == k))
    np.testing.assert_array_equal(np.concatenate([b["data_indices"] for b in batches]), ds)


def test_process_shards_are_disjoint_and_cover(setup):
    w = {"a": 1, "b": 1, "c": 1}
    full = ids_of(take(iter(pipeline(setup, w)), 6))
    p0 = ids_of(take(iter(pipeline(setup, w, pi=0, pc=2)), 3))
    p1 = ids_of(take(iter(pipeline(setup, w, pi=1, pc=2)), 3))
    assert not set(p0) & set(p1)
    # process p takes global samples p, p + 2, p + 4, ...; together they are the unsharded stream
    assert sorted(p0 + p1) == sorted(full)
    assert [g for _, g in p0] == list(range(0, 24, 2)) and [g for _, g in p1] == list(range(1, 24, 2))


def test_same_seed_same_batches_other_seed_differs(setup):
    w = {"a": 2, "b": 1, "c": 1}
    a = take(iter(pipeline(setup, w, seed=3, threads=2)), 5)
    b = take(iter(pipeline(setup, w, seed=3, threads=1)), 5)
    c = take(iter(pipeline(setup, w, seed=4)), 5)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not all(np.array_equal(x["states"], y["states"]) for x, y in zip(a, c, strict=True))


def test_checkpoint_resume_identical_next_batch(setup):
    w = {"a": 1, "b": 2, "c": 1}
    it = iter(pipeline(setup, w, threads=2))
    take(it, 3)
    state = it.get_state()
    json.dumps(state)  # plain JSON-able, fits an Orbax checkpoint
    expect = take(it, 2)
    fresh = iter(pipeline(setup, w, threads=2))
    fresh.set_state(state)
    got = take(fresh, 2)
    for x, y in zip(expect, got, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


class IndexedFakeSource(FakeSource):
    """FakeSource with a fixed set of entries (an IndexedStepSource, like RLDS's step index)."""

    def __init__(self, name: str, ds_id: int, lang_path: str, entries: int):
        super().__init__(name, ds_id, lang_path)
        self.entries = entries

    def __len__(self) -> int:
        return self.entries

    def get(self, index: int, rng: np.random.Generator) -> RawSample:
        assert 0 <= index < self.entries, index
        return super().get(index, rng)


def test_indexed_source_is_read_in_shuffled_epochs(setup):
    """A source with fixed entries gets each of them once per epoch of len(source) global indices, in an
    order that is not the stored one, differs between epochs and seeds, and is the same for the same seed
    (consecutive entries are consecutive steps of one episode: read in order, every batch is one clip)."""
    sources, tf = setup
    n = 24
    indexed = {"a": IndexedFakeSource("a", 0, sources["a"].lang_path, n)}

    def entries(seed, batches=2 * n // BCFG.batch_size):
        it = iter(build_pipeline(indexed, {"a": 1}, tf, BCFG, PipelineConfig(seed=seed, num_threads=1)))
        return [e for _, e in ids_of(take(it, batches))]

    first = entries(0)
    epoch0, epoch1 = first[:n], first[n:]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != sorted(epoch0) and epoch0 != epoch1
    # Neighbouring samples are rarely neighbouring entries (in order: all 23 pairs would be).
    assert sum(abs(a - b) == 1 for a, b in itertools.pairwise(epoch0)) < 8
    assert entries(0) == first and entries(1) != first


def test_unknown_and_bad_names(setup, tmp_path):
    with pytest.raises(KeyError, match=r"weights name datasets without a source: \['zzz'\]"):
        pipeline(setup, {"a": 1, "zzz": 1})
    sources, tf = setup
    with pytest.raises(KeyError, match="unknown dataset name 'd'"):
        build_pipeline({**sources, "d": FakeSource("d", 9, "")}, {"d": 1}, tf, BCFG)
    wpath = tmp_path / "w.json"
    wpath.write_text(json.dumps({"a": 3, "b": 1}))
    assert load_weights(wpath) == {"a": 3.0, "b": 1.0}
    with pytest.raises(KeyError, match=r"no weight for datasets \['c'\]"):
        load_weights(wpath, NAMES)


def test_official_weights_file(shared_dir):
    w = load_weights(shared_dir / "reference/data/pretrain_sample_weights.json",
                     json.loads((shared_dir / "reference/data/pretrain_datasets.json").read_text()))
    assert len(w) == 46 and sum(w.values()) == 3012


def test_hdf5_end_to_end(tmp_path, small_robot):
    rng = np.random.default_rng(0)
    for i in range(2):
        q = make_qpos(128 + 5 * i, 3, rng)
        write_episode(tmp_path / "t" / f"e{i}.hdf5", q, q, layout="rows")
    write_instructions(tmp_path / "t", instruction="lang/a.safetensors", simplified=["lang/a.safetensors"],
                       expanded=["lang/a.safetensors"])
    (tmp_path / "t/lang").mkdir()
    language.save_embedding(tmp_path / "t/lang/a.safetensors", np.full((3, 4096), 0.5, np.float32), "a")
    src = HDF5Source(tmp_path, small_robot)
    bcfg = BatchConfig(batch_size=2, image_size=32, max_lang_len=4)
    tf = SampleTransform(TransformConfig.eval(), bcfg, dataset_ids={"agilex": 0})
    cfg = PipelineConfig(seed=1, num_threads=2)
    batches = take(iter(build_pipeline({"agilex": src}, {"agilex": 1}, tf, bcfg, cfg)), 3)
    check_against_spec(batches[0], batch_spec(bcfg))
    b = batches[1]
    # sample 1 of the global stream = source.get(1, rng(seed, source tag, id, 1)): recompute it directly
    raw = src.get(3, np.random.default_rng([1, 2, 0, 3]))
    np.testing.assert_array_equal(b["states"][1], raw.state.astype(np.float32))
    np.testing.assert_array_equal(b["actions"][1], raw.actions.astype(np.float32))
    assert b["lang_attn_mask"][1].tolist() == [True, True, True, False]
    assert (b["ctrl_freqs"] == 25).all()
    assert dataclasses.asdict(cfg)["seed"] == 1


def test_per_episode_weights_follow_the_official_visit_loop():
    """Official loop (DATA.md §5.2): pick a dataset by weight, yield min(T, 2048) steps of its next episode
    (nothing if T < 32). Simulated over whole cycles of each dataset's episodes, the sample shares equal the
    per-episode weights normalised."""
    episodes = {"a": [40, 40, 5], "b": [400, 3000, 10, 20]}  # b: one long visit capped at 2048, two dropped
    per_visit = {n: np.mean([min(t, 2048) if t >= 32 else 0 for t in ts]) for n, ts in episodes.items()}

    class Visits:
        def __init__(self, name):
            self.dataset_name, self.steps_per_visit = name, per_visit[name]

    weights = {"a": 3.0, "b": 1.0}
    got = per_episode_weights({n: Visits(n) for n in episodes}, weights)
    # The official loop's expected steps per pick of each dataset, weight x mean yield per visit.
    steps = {n: weights[n] * sum(min(t, 2048) if t >= 32 else 0 for t in ts) / len(ts) for n, ts in episodes.items()}
    total = sum(steps.values())
    for n in episodes:
        assert got[n] / sum(got.values()) == pytest.approx(steps[n] / total)
    assert got["b"] / sum(got.values()) == pytest.approx(1 * 612 / (3 * 80 / 3 + 1 * 612))
    with pytest.raises(TypeError, match="steps_per_visit"):
        per_episode_weights({"a": FakeSource("a", 0, "x")}, {"a": 1.0})


def test_data_state_moves_between_process_counts(setup):
    """A checkpoint's data state (process 0's) continues the global sample stream on another process count:
    neither repeating nor skipping samples (rdt_jax.training.loop.data_state_for)."""
    from rdt_jax.training.loop import RunSetupError, data_state_for

    w = {"a": 1.0, "b": 1.0, "c": 1.0}
    its = [iter(pipeline(setup, w, pi=p, pc=2)) for p in range(2)]
    seen = {i for it in its for _, i in ids_of(take(it, 2))}
    consumed = 2 * 2 * BCFG.batch_size
    assert seen == set(range(consumed))
    state = its[0].get_state()
    one = iter(pipeline(setup, w, pc=1))
    one.set_state(data_state_for(state, 2, 1))
    assert [i for _, i in ids_of(take(one, 1))] == list(range(consumed, consumed + BCFG.batch_size))
    assert data_state_for(state, 2, 2) is state
    with pytest.raises(RunSetupError, match="cannot continue evenly"):
        data_state_for({"next_index": 3}, 1, 2)


def test_reader_threads_and_buffer_change_neither_stream_nor_state(setup):
    """What lets a run resume with other --data.num-threads/--data.prefetch: the same samples in the same
    order, and one setting's iterator state continues under the other."""
    w = {"a": 2.0, "b": 1.0, "c": 1.0}
    one = iter(pipeline(setup, w, threads=1, prefetch=1))
    first = take(one, 6)
    assert ids_of(first) == ids_of(take(iter(pipeline(setup, w, threads=3, prefetch=8)), 6))
    more = iter(pipeline(setup, w, threads=3, prefetch=8))
    more.set_state(one.get_state())
    assert ids_of(take(more, 4)) == ids_of(take(one, 4))


class VaryingLanguageSource(FakeSource):
    """Sample i's instruction has lengths[i % len(lengths)] tokens, each token's values = that length."""

    def __init__(self, lang_dir, lengths):
        super().__init__("a", 0, "")
        self.paths = []
        for n in lengths:
            p = lang_dir / f"len{n}.safetensors"
            language.save_embedding(p, np.full((n, 4096), float(n), np.float32), f"{n} tokens")
            self.paths.append(str(p))

    def get(self, index, rng):
        return dataclasses.replace(super().get(index, rng), lang_embed_path=self.paths[index % len(self.paths)])


@pytest.mark.parametrize(("lengths", "want"), [((3, 5), 16), ((3, 20), 32), ((40, 2), 48)])
def test_bucket_padding_pads_each_batch_to_its_longest_instructions_bucket(tmp_path, lengths, want):
    src = VaryingLanguageSource(tmp_path, lengths)
    bcfg = BatchConfig(batch_size=2, image_size=S, max_lang_len=48, lang_padding="bucket")
    tf = SampleTransform(TransformConfig.eval(), bcfg, dataset_ids={"a": 0})
    raw = src.get(0, np.random.default_rng(0))
    sample = tf(raw, np.random.default_rng(0))  # a sample keeps its own length
    assert sample["lang_embeds"].shape == (lengths[0], 4096) and sample["lang_attn_mask"].all()
    batch = next(iter(build_pipeline({"a": src}, {"a": 1}, tf, bcfg, PipelineConfig(seed=0, num_threads=1))))
    check_against_spec(batch, batch_spec(bcfg))
    assert batch["lang_embeds"].shape == (2, want, 4096) and batch["lang_attn_mask"].shape == (2, want)
    # Sample k of the stream has lengths[k % 2] tokens, whose values are the length.
    for k, n in enumerate(lengths):
        assert batch["lang_attn_mask"][k].tolist() == [True] * n + [False] * (want - n)
        assert (batch["lang_embeds"][k, :n] == n).all() and not batch["lang_embeds"][k, n:].any()


def test_max_padding_keeps_every_batch_at_max_lang_len(tmp_path):
    src = VaryingLanguageSource(tmp_path, (3, 5))
    bcfg = BatchConfig(batch_size=2, image_size=S, max_lang_len=48)
    tf = SampleTransform(TransformConfig.eval(), bcfg, dataset_ids={"a": 0})
    batch = next(iter(build_pipeline({"a": src}, {"a": 1}, tf, bcfg, PipelineConfig(seed=0, num_threads=1))))
    assert batch["lang_embeds"].shape == (2, 48, 4096)
    assert batch["lang_attn_mask"].sum(axis=1).tolist() == [3, 5]


def test_lang_padding_is_checked():
    with pytest.raises(ValueError, match="lang_padding must be one of"):
        BatchConfig(batch_size=1, lang_padding="longest")
