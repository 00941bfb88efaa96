"""Converted RLDS datasets as training consumes them (rdt_jax.training.data.build_data, kind=rlds): language from
an embedding store, dataset ids = positions in pretrain_datasets.json, per-episode-visit mixture weights."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rdt_jax.data.language import EmbeddingStore
from rdt_jax.data.rlds.source import RldsSource
from rdt_jax.training.config import DataConfig
from rdt_jax.training.data import build_data

from .conftest import LONG

USED = ("taco_play", "fractal20220817_data")  # not in pretrain_datasets.json order (fractal is 0, taco 2)


def test_instructions_and_steps_per_visit(tiny_datasets):
    for name in USED:
        src = RldsSource(tiny_datasets[name].dir)
        assert src.instructions() == [tiny_datasets[name].expected_instruction]
        # Recorded in the step index at conversion; an older index (without them) reads every episode.
        assert src.index.instructions == (tiny_datasets[name].expected_instruction,)
        src.index = dataclasses.replace(src.index, instructions=None)
        assert src.instructions() == [tiny_datasets[name].expected_instruction]
        # One kept episode of LONG steps and one too short (a visit that yields nothing): LONG / 2 per visit.
        # A filtered episode is never visited.
        assert src.steps_per_visit == pytest.approx(LONG / 2)


@pytest.fixture
def rlds_config(tiny_datasets, shared_dir, tmp_path):
    store = EmbeddingStore(tmp_path / "lang")
    rng = np.random.default_rng(0)
    stored = {}
    for name in USED:
        text = tiny_datasets[name].expected_instruction
        stored[text] = rng.standard_normal((3 + len(stored), 4096)).astype(np.float32)
        store.put(text, stored[text])
    ref = shared_dir / "reference" / "data"
    cfg = DataConfig(kind="rlds", rlds_dirs=tuple(str(tiny_datasets[n].dir) for n in USED),
                     stats_file=str(ref / "dataset_stat.json"), datasets_file=str(ref / "pretrain_datasets.json"),
                     lang_embed_dir=str(store.directory), cond_mask_prob=0.0, image_aug=False, state_noise_snr=None,
                     num_threads=1, prefetch=4)
    return cfg, stored, json.loads((ref / "pretrain_datasets.json").read_text())


def _build(cfg, tmp_path):
    return build_data(cfg, output_dir=str(tmp_path / "run"), local_batch=4, local_sample_batch=0, image_size=16,
                      horizon=64, seed=0)


def test_rlds_batches_carry_stored_language_and_official_ids(rlds_config, tiny_datasets, tmp_path):
    cfg, stored, official = rlds_config
    bundle = _build(cfg, tmp_path)
    assert bundle.dataset_names == official
    batch = next(iter(bundle.train))
    ids = {official.index(n): n for n in USED}
    assert set(batch["data_indices"].tolist()) <= set(ids)
    for i, d in enumerate(batch["data_indices"].tolist()):
        want = stored[tiny_datasets[ids[d]].expected_instruction]
        n = len(want)
        assert batch["lang_attn_mask"][i].sum() == n
        np.testing.assert_array_equal(batch["lang_embeds"][i, :n], want)


def test_rlds_without_an_embedding_store_is_a_clear_error(rlds_config, tmp_path):
    cfg, _, _ = rlds_config
    with pytest.raises(ValueError, match=r"needs --data\.lang-embed-dir"):
        _build(dataclasses.replace(cfg, lang_embed_dir=None), tmp_path)


def test_missing_or_too_long_embeddings_are_found_before_training(rlds_config, tiny_datasets, tmp_path):
    """As for HDF5 data: an instruction without an embedding in the store, or one longer than
    --data.max-lang-len, stops the run before its first step (not when a batch first draws it, maybe hours
    in), and the error gives the command that encodes the missing ones."""
    from rdt_jax.training.config import ConfigError

    cfg, stored, _ = rlds_config
    empty = EmbeddingStore(tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as err:
        _build(dataclasses.replace(cfg, lang_embed_dir=str(empty.directory)), tmp_path)
    msg = str(err.value)
    for name in USED:
        text = tiny_datasets[name].expected_instruction
        assert f"\n  {name}: instruction {text!r} has no embedding in {empty.directory}" in msg
    assert msg.startswith(f"{len(USED)} instruction embedding(s) missing:")
    assert msg.endswith(f"--store-dir {empty.directory}")
    assert "scripts/encode_lang.py --t5-dir T5_DIR --rlds-dirs" in msg
    longest = max(len(v) for v in stored.values())
    with pytest.raises(ConfigError, match=rf"has {longest} tokens, more than --data\.max-lang-len {longest - 1}"):
        _build(dataclasses.replace(cfg, max_lang_len=longest - 1), tmp_path)


def test_datasets_file_must_list_every_dataset(rlds_config, tmp_path):
    cfg, _, _ = rlds_config
    listing = tmp_path / "datasets.json"
    listing.write_text(json.dumps(["taco_play"]))
    from rdt_jax.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--data\.datasets-file: .*datasets\.json: datasets "
                                          r"\['fractal20220817_data'\] are not listed"):
        _build(dataclasses.replace(cfg, datasets_file=str(listing)), tmp_path)


def test_encode_lang_lists_the_rlds_instructions(tiny_datasets):
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[3] / "scripts" / "encode_lang.py"
    spec = importlib.util.spec_from_file_location("encode_lang", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["encode_lang"] = mod
    spec.loader.exec_module(mod)
    dirs = tuple(tiny_datasets[n].dir for n in USED)
    assert mod.rlds_instructions(dirs) == list(dict.fromkeys(tiny_datasets[n].expected_instruction for n in USED))


def test_debug_training_on_rlds(rlds_config, tmp_path, capsys):
    """The train loop end to end on the converted datasets: two steps, a validation with per-dataset metrics
    named as the official list names them, its trajectory plot, and (without a progress bar, as in a job log)
    a line per step and per validation."""
    from rdt_jax.training.config import PRESETS, ValidationConfig
    from rdt_jax.training.loop import train

    data, _, _ = rlds_config
    cfg = PRESETS["debug"]()
    cfg = cfg.replace(output_dir=str(tmp_path / "run"), num_steps=2, batch_size=8,
                      data=dataclasses.replace(data, max_lang_len=8),
                      validation=ValidationConfig(every=2, batch_size=8, num_batches=1, plot=True),
                      log=cfg.log.__class__(progress_bar=False, tensorboard=False))
    train(cfg)
    out = capsys.readouterr().out
    assert "[step 1/2] loss=" in out and "[step 2/2] loss=" in out and "[validation @ 2] overall_avg_sample_mse=" in out
    assert (tmp_path / "run" / "validation" / "step_0000002.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in rows if "overall_avg_sample_mse" in r)
    assert np.isfinite(val["overall_avg_sample_mse"])
    per_dataset = {k.removesuffix("_sample_mse") for k in val if k.endswith("_sample_mse")} - {"overall_avg"}
    assert per_dataset and per_dataset <= set(USED)
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_corrupt_rlds_record_stops_train_py_with_one_line(rlds_config, tiny_datasets, tmp_path, capsys):
    """An episode record that does not parse, met while training: train.py's error line names the record (the
    one EpisodeError type of every source), no traceback."""
    import importlib.util
    import pathlib
    import shutil
    import sys

    from array_record.python import array_record_module

    data, _, _ = rlds_config
    name = USED[0]
    bad = tmp_path / "corrupt" / name
    shutil.copytree(tiny_datasets[name].dir, bad)
    for shard in bad.glob("*.array_record*"):  # every record replaced by bytes that do not parse
        reader = array_record_module.ArrayRecordReader(str(shard))
        n = reader.num_records()
        reader.close()
        writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
        for _ in range(n):
            writer.write(b"\xff\xff\xff\xff not an episode")
        writer.close()
    repo = pathlib.Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("train_script", repo / "scripts" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_script"] = mod
    spec.loader.exec_module(mod)
    rc = mod.main(["debug", "--output-dir", str(tmp_path / "run"), "--num-steps", "1", "--log.no-progress-bar",
                   "--data.kind", "rlds", "--data.rlds-dirs", str(bad), "--data.lang-embed-dir", data.lang_embed_dir,
                   "--data.stats-file", data.stats_file, "--data.datasets-file", data.datasets_file,
                   "--data.max-lang-len", "8", "--data.num-threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"[rdt-jax] ERROR: {bad}[train][" in err and "cannot parse the episode record" in err
    assert "Traceback" not in err
