"""T5 tokenizer settings, language embedding files, and scripts/encode_lang.py end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from rdt_jax.encoders import (
    load_lang_embedding,
    load_t5,
    save_lang_embedding_pt,
    save_lang_embedding_safetensors,
)
from rdt_jax.encoders.tokenizer import MAX_LANG_TOKENS, load_t5_tokenizer, tokenize

spm = pytest.importorskip("sentencepiece")

REPO = pathlib.Path(__file__).resolve().parents[2]
CORPUS = [
    "pick up the red block and place it in the bowl",
    "open the drawer",
    "move the cup to the left of the plate",
    "close the lid of the box",
    "push the green button gently",
    "stack the blocks",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny SentencePiece unigram model with T5's special ids (pad 0, EOS 1, unk 2, no BOS)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=60,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    d = tmp_path_factory.mktemp("t5tok")
    (d / "spiece.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    return d


def test_tokenizer_official_settings(tok_dir):
    tok = load_t5_tokenizer(tok_dir)
    assert tok.model_max_length == MAX_LANG_TOKENS
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
    texts = ["open the drawer", "pick up the red block and place it in the bowl", ""]
    ids, mask = tokenize(tok, texts)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    expected = [[*sp.encode(t), 1] for t in texts]  # SentencePiece pieces + EOS, no BOS
    assert ids.shape == (3, max(map(len, expected)))
    for row, m, exp in zip(ids, mask, expected, strict=True):
        assert row[: len(exp)].tolist() == exp
        assert (row[len(exp) :] == 0).all()  # right padding with pad id 0
        assert m.tolist() == [True] * len(exp) + [False] * (len(row) - len(exp))
    assert ids[2, :1].tolist() == [1]  # the empty instruction is just EOS
    ids16, mask16 = tokenize(tok, texts, pad_to_multiple_of=16)
    assert ids16.shape[1] % 16 == 0 and (ids16[:, : ids.shape[1]] == ids).all() and mask16.sum() == mask.sum()
    # RDT right-pads whatever side the tokenizer's own config prefers.
    tok.padding_side = "left"
    left_ids, left_mask = tokenize(tok, texts)
    assert (left_ids == ids).all() and (left_mask == mask).all()


def test_tokenizer_from_spiece_model_alone(tok_dir, tmp_path):
    """A folder with only spiece.model (no tokenizer_config.json or config.json) gives the same tokenizer."""
    (tmp_path / "spiece.model").write_bytes((tok_dir / "spiece.model").read_bytes())
    texts = ["open the drawer", "pick up the red cup."]
    alone, full = tokenize(load_t5_tokenizer(tmp_path), texts), tokenize(load_t5_tokenizer(tok_dir), texts)
    for a, b in zip(alone, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tokenizer_directory_without_tokenizer_files(tmp_path):
    """A model directory saved without its tokenizer: transformers would build an empty vocabulary (every
    word <unk>, every instruction the same embedding); this is an error instead."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(FileNotFoundError, match="no T5 tokenizer"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        load_t5_tokenizer(tmp_path / "missing")


def test_tokenizer_rejects_too_long(tok_dir):
    tok = load_t5_tokenizer(tok_dir)
    with pytest.raises(ValueError, match="more than 1024"):
        tokenize(tok, ["open the drawer " * 400])


def test_lang_embedding_formats(tmp_path):
    emb = np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)
    bf = emb.astype(ml_dtypes.bfloat16)
    save_lang_embedding_safetensors(tmp_path / "a.safetensors", emb, "open the drawer")
    got = load_lang_embedding(tmp_path / "a.safetensors")
    assert got.dtype == np.float32 and (got == emb).all()
    save_lang_embedding_pt(tmp_path / "a.pt", emb)
    t = torch.load(tmp_path / "a.pt", weights_only=True)
    assert t.dtype == torch.bfloat16 and t.shape == (7, 32)
    assert (load_lang_embedding(tmp_path / "a.pt") == bf).all()
    # RDT's single-instruction layout: a dict with (1, L, D) embeddings.
    torch.save({"name": "x", "instruction": "y", "embeddings": torch.from_numpy(emb)[None]}, tmp_path / "b.pt")
    np.testing.assert_array_equal(load_lang_embedding(tmp_path / "b.pt"), emb)
    save_lang_embedding_pt(tmp_path / "c.pt", emb, instruction="open the drawer")
    d = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(d) == {"name", "instruction", "embeddings"} and d["name"] == "c"
    assert d["instruction"] == "open the drawer"
    assert d["embeddings"].dtype == torch.bfloat16 and d["embeddings"].shape == (1, 7, 32)
    assert (load_lang_embedding(tmp_path / "c.pt") == bf).all()


def test_lang_files_readable_by_data_pipeline(tmp_path):
    """What we write is what rdt_jax.data.language reads (full 4096 width)."""
    language = pytest.importorskip("rdt_jax.data.language")
    emb = np.random.default_rng(1).standard_normal((5, 4096)).astype(np.float32)
    save_lang_embedding_safetensors(tmp_path / "e.safetensors", emb, "stack the blocks")
    np.testing.assert_array_equal(language.load_embedding(tmp_path / "e.safetensors"), emb)
    save_lang_embedding_pt(tmp_path / "e.pt", emb)
    expected = emb.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(language.load_embedding(tmp_path / "e.pt"), expected)


def test_encode_lang_script(tok_dir, hf_factory, tmp_path, errs):
    rel_err, _ = errs
    tok = load_t5_tokenizer(tok_dir)
    model, t5_dir = hf_factory(
        "t5_encoder", vocab_size=len(tok), d_model=4096, d_ff=24, d_kv=4, num_heads=4, num_layers=2
    )
    spec = importlib.util.spec_from_file_location("encode_lang", REPO / "scripts" / "encode_lang.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["encode_lang"] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)

    instr = tmp_path / "tasks.txt"
    instr.write_text("\n".join(CORPUS[:5]) + "\n\n")
    out_dir = tmp_path / "out"
    mod.main(
        [
            "--t5-dir",
            str(t5_dir),
            "--tokenizer-dir",
            str(tok_dir),
            "--instructions-file",
            str(instr),
            "--out-dir",
            str(out_dir),
            "--dtype",
            "float32",
            "--batch-size",
            "2",
        ]
    )
    ids, mask = tokenize(tok, CORPUS[:5])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    ref = ref.last_hidden_state.numpy()
    for i in range(5):
        n = int(mask[i].sum())
        st = load_lang_embedding(out_dir / f"lang_embed_{i}.safetensors")
        pt = load_lang_embedding(out_dir / f"lang_embed_{i}.pt")
        assert st.shape == pt.shape == (n, 4096)
        assert rel_err(st, ref[i, :n]) <= 1e-5 and rel_err(pt, ref[i, :n]) <= 1e-5
        # encode_lang_batch.py's layout: the bare (L, D) tensor
        assert isinstance(torch.load(out_dir / f"lang_embed_{i}.pt", weights_only=True), torch.Tensor)
    assert not (out_dir / "lang_embed_5.pt").exists()

    # Single instruction, bfloat16 (RDT's setting).
    mod.main(
        [
            "--t5-dir",
            str(t5_dir),
            "--tokenizer-dir",
            str(tok_dir),
            "--instruction",
            CORPUS[1],
            "--name",
            "drawer.v1",
            "--out-dir",
            str(out_dir),
        ]
    )
    n = int(mask[1].sum())
    # The official encode_lang.py layout, as the deployment script reads it: torch.load(p)["embeddings"].
    official = torch.load(out_dir / "drawer.v1.pt", weights_only=True)
    assert official["name"] == "drawer.v1" and official["instruction"] == CORPUS[1]
    assert official["embeddings"].dtype == torch.bfloat16 and official["embeddings"].shape == (1, n, 4096)
    assert (out_dir / "drawer.v1.safetensors").exists() and not (out_dir / "drawer.pt").exists()
    bf = load_lang_embedding(out_dir / "drawer.v1.pt").astype(np.float32)
    assert bf.shape == (n, 4096) and rel_err(bf, ref[1, :n]) <= 2e-2
    enc = load_t5(t5_dir)
    direct = np.asarray(jax.jit(lambda e, i: e(i))(enc, jnp.asarray(ids[1:2, :n])))[0]
    assert rel_err(direct, ref[1, :n]) <= 1e-5


def test_encode_lang_into_an_embedding_store(tok_dir, hf_factory, tmp_path, errs):
    """--store-dir: the embeddings training reads by instruction text (rdt_jax.data.language.EmbeddingStore),
    full 4096 width (a one-layer T5 with d_model 4096 and tiny heads / FFN)."""
    from rdt_jax.data.language import EmbeddingStore

    rel_err, _ = errs
    tok = load_t5_tokenizer(tok_dir)
    model, t5_dir = hf_factory("t5_encoder", vocab_size=len(tok), d_model=4096, d_ff=8, d_kv=4, num_heads=2,
                               num_layers=1)
    spec = importlib.util.spec_from_file_location("encode_lang", REPO / "scripts" / "encode_lang.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["encode_lang"] = mod
    spec.loader.exec_module(mod)
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps(CORPUS[:3]))
    mod.main(["--t5-dir", str(t5_dir), "--tokenizer-dir", str(tok_dir), "--instructions-file", str(tasks),
              "--store-dir", str(tmp_path / "store"), "--dtype", "float32"])
    ids, mask = tokenize(tok, CORPUS[:3])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    store = EmbeddingStore(tmp_path / "store")
    for i, text in enumerate(CORPUS[:3]):
        n = int(mask[i].sum())
        got = store.get(text)
        assert got.shape == (n, 4096) and rel_err(got, ref.last_hidden_state.numpy()[i, :n]) <= 1e-5
    assert not (tmp_path / "lang_embed_0.pt").exists()  # no --out-dir: only the store


def _load_encode_lang():
    spec = importlib.util.spec_from_file_location("encode_lang", REPO / "scripts" / "encode_lang.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["encode_lang"] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _write_hdf5_episodes(root: pathlib.Path, instructions: list[dict] | None = None):
    """Tiny ALOHA-format episodes (the training demo's writer), one per entry of `instructions` (that episode's
    instruction JSON; None keeps the demo's precomputed ``lang.safetensors`` entries). Returns (data dir, robot,
    robot JSON path): the robot is the demo's, whose short minimum episode length keeps these episodes used."""
    from rdt_jax.training.config import DataConfig
    from rdt_jax.training.data import demo_robot, write_demo_dataset

    n = len(instructions) if instructions is not None else 2
    demo = DataConfig(kind="demo", demo_episodes=n, demo_episode_len=24, demo_image_size=16)
    robot = demo_robot(demo, horizon=8)
    data_dir = write_demo_dataset(root / "episodes", demo, robot)
    for e, content in enumerate(instructions or []):
        (data_dir / f"episode_{e:03d}" / robot.instruction_file).write_text(json.dumps(content))
    robot_json = root / "robot.json"
    robot_json.write_text(json.dumps(robot.to_json_dict()))
    return data_dir, robot, robot_json


# Text, lists of variants, a text repeated within and across episodes, and precomputed files (one with the
# trailing "." the official pipeline tolerates), in the demo robot's instruction keys.
HDF5_INSTRUCTIONS = [
    {"instruction": CORPUS[1], "simplified_instruction": [CORPUS[5], CORPUS[1]], "expanded_instruction": [CORPUS[4]]},
    {"instruction": "lang.safetensors", "simplified_instruction": CORPUS[5],
     "expanded_instruction": [CORPUS[3], "lang.safetensors.", CORPUS[1]]},
]
HDF5_TEXTS = [CORPUS[1], CORPUS[5], CORPUS[4], CORPUS[3]]  # distinct, in first-seen order


def test_encode_lang_lists_the_hdf5_text_instructions(tmp_path):
    from rdt_jax.data.hdf5_source import EpisodeError

    mod = _load_encode_lang()
    data_dir, robot, _ = _write_hdf5_episodes(tmp_path, HDF5_INSTRUCTIONS)
    assert mod.hdf5_instructions((data_dir,), robot) == HDF5_TEXTS
    # Several directories: still each text once, in first-seen order across them. An unreadable episode is an
    # error, or with skip_bad_episodes left out with its instructions, which training never draws.
    other, _, _ = _write_hdf5_episodes(tmp_path / "b", [{k: [CORPUS[0], CORPUS[4]] for k in robot.instruction_keys}])
    bad = other / "episode_bad"
    bad.mkdir()
    (bad / "episode_bad.hdf5").write_bytes(b"not an HDF5 file")
    (bad / robot.instruction_file).write_text(json.dumps(dict.fromkeys(robot.instruction_keys, CORPUS[2])))
    with pytest.raises(EpisodeError, match=r"episode_bad\.hdf5: cannot open"):
        mod.hdf5_instructions((data_dir, other), robot)
    assert mod.hdf5_instructions((data_dir, other), robot, skip_bad_episodes=True) == [*HDF5_TEXTS, CORPUS[0]]


def test_encode_lang_hdf5_dirs_into_the_store_training_checks(tok_dir, hf_factory, tmp_path, errs):
    """--hdf5-dirs --store-dir gives training's embedding check every text it needs, each embedded as that
    instruction alone (full 4096 width, as the store requires: one layer with tiny heads / FFN)."""
    from rdt_jax.data.hdf5_source import HDF5Source
    from rdt_jax.data.language import EmbeddingStore
    from rdt_jax.training.data import check_instruction_embeddings

    rel_err, _ = errs
    tok = load_t5_tokenizer(tok_dir)
    _, t5_dir = hf_factory("t5_encoder", vocab_size=len(tok), d_model=4096, d_ff=8, d_kv=4, num_heads=2,
                           num_layers=1)
    mod = _load_encode_lang()
    data_dir, robot, robot_json = _write_hdf5_episodes(tmp_path, HDF5_INSTRUCTIONS)
    src = HDF5Source(data_dir, robot)
    store = EmbeddingStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError) as err:
        check_instruction_embeddings(src, store, data_dir=data_dir, robot=str(robot_json))
    # The message gives the command this test runs next.
    assert (f"encode the text instructions with: python scripts/encode_lang.py --t5-dir T5_DIR "
            f"--hdf5-dirs {data_dir} --robot {robot_json} --store-dir {store.directory}") in str(err.value)

    common = ["--t5-dir", str(t5_dir), "--tokenizer-dir", str(tok_dir), "--dtype", "float32"]
    written = mod.main([*common, "--hdf5-dirs", str(data_dir), "--robot", str(robot_json),
                        "--store-dir", str(store.directory), "--batch-size", "3"])
    assert written == [store.path(t) for t in HDF5_TEXTS]  # one file per distinct text, none for the paths
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(store.filename(t) for t in HDF5_TEXTS)
    check_instruction_embeddings(src, store)

    # Batched with other texts and padded, an embedding equals that of its text encoded on its own.
    out_dir = tmp_path / "single"
    for i, text in enumerate(HDF5_TEXTS[2:]):  # one from the full first batch, one from the padded last
        mod.main([*common, "--instruction", text, "--name", f"t{i}", "--out-dir", str(out_dir),
                  "--formats", "safetensors"])
        alone = load_lang_embedding(out_dir / f"t{i}.safetensors")
        stored = store.get(text)
        assert stored.shape == alone.shape == (int(tokenize(tok, [text])[1].sum()), 4096)
        assert rel_err(stored, alone) <= 1e-6
    assert rel_err(store.get(HDF5_TEXTS[0])[:1], store.get(HDF5_TEXTS[1])[:1]) > 1e-2  # texts do differ


def test_encode_lang_hdf5_dirs_without_text_instructions(tmp_path):
    """All instructions precomputed: an error naming the directory, before T5 would be loaded (the T5
    directory here does not exist, so loading it would fail differently)."""
    mod = _load_encode_lang()
    data_dir, _, robot_json = _write_hdf5_episodes(tmp_path)
    store_dir = tmp_path / "store"
    args = mod.Args(t5_dir=tmp_path / "no_t5", hdf5_dirs=(data_dir,), robot=str(robot_json), store_dir=store_dir)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data_dir))}: no text instructions .*nothing to encode"):
        mod.encode(args)
    assert not store_dir.exists()
    with pytest.raises(ValueError, match="exactly one of --instruction, --instructions-file, --rlds-dirs and "
                                         "--hdf5-dirs"):
        mod.encode(dataclasses.replace(args, instruction="open the drawer"))
    with pytest.raises(ValueError, match="only apply to --hdf5-dirs"):
        mod.encode(mod.Args(t5_dir=tmp_path / "no_t5", instruction="open the drawer", out_dir=tmp_path / "out",
                            skip_bad_episodes=True))


def test_encode_lang_empty_instructions_file_is_an_error_before_t5_loads(tmp_path):
    mod = _load_encode_lang()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = mod.Args(t5_dir=tmp_path / "no_t5", instructions_file=empty, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(empty))}: no instructions; nothing to encode"):
        mod.encode(args)
    assert not (tmp_path / "out").exists()


def test_encode_lang_pt_format_without_torch_is_an_error_before_t5_loads(tmp_path, monkeypatch):
    mod = _load_encode_lang()
    monkeypatch.setitem(sys.modules, "torch", None)  # an install without the torch extra
    args = mod.Args(t5_dir=tmp_path / "no_t5", instruction="open the drawer", name="x", out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"--formats pt \(the default\) writes torch files and needs torch"):
        mod.encode(args)
    assert not (tmp_path / "out").exists()


def test_encode_lang_refuses_a_t5_of_another_width_before_loading_it(tok_dir, hf_factory, tmp_path):
    mod = _load_encode_lang()
    _, t5_dir = hf_factory("t5_encoder", vocab_size=60, d_model=16, d_ff=24, d_kv=4, num_heads=4, num_layers=1)
    args = mod.Args(t5_dir=t5_dir, tokenizer_dir=tok_dir, instruction="open the drawer", name="x",
                    out_dir=tmp_path / "out", formats=("safetensors",))
    with pytest.raises(ValueError, match=r"config\.json: d_model 16; RDT's language tokens are 4096 wide"):
        mod.encode(args)
    assert not (tmp_path / "out").exists()


def test_encode_lang_reports_bad_inputs_in_one_line(tmp_path):
    """The command line prints the error naming the file or option, not a traceback."""
    mod = _load_encode_lang()
    data_dir, _, _ = _write_hdf5_episodes(tmp_path, HDF5_INSTRUCTIONS)
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()  # never loaded: the inputs are refused first
    missing_robot = tmp_path / "no_such_robot.json"
    with pytest.raises(SystemExit, match=rf"^error: .*{re.escape(str(missing_robot))}"):
        mod.main(["--t5-dir", str(t5_dir), "--hdf5-dirs", str(data_dir), "--robot", str(missing_robot),
                  "--store-dir", str(tmp_path / "store")])
    bad = data_dir / "episode_bad"
    bad.mkdir()
    (bad / "episode_bad.hdf5").write_bytes(b"not an HDF5 file")
    with pytest.raises(SystemExit, match=r"^error: .*episode_bad\.hdf5: cannot open HDF5 file"):
        mod.main(["--t5-dir", str(t5_dir), "--hdf5-dirs", str(data_dir), "--store-dir", str(tmp_path / "store")])


def test_encode_lang_reports_a_damaged_t5_checkpoint_in_one_line(tok_dir, hf_factory, tmp_path):
    """A T5 whose weights cannot be imported (here: a shard index without a weight_map) is an error line
    naming the file, not a traceback."""
    mod = _load_encode_lang()
    _, t5_dir = hf_factory("t5_encoder", vocab_size=60, d_model=4096, d_ff=8, d_kv=4, num_heads=2, num_layers=1)
    for f in t5_dir.glob("*.safetensors"):
        f.unlink()
    (t5_dir / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"^error: .*model\.safetensors\.index\.json: not a shard index"):
        mod.main(["--t5-dir", str(t5_dir), "--tokenizer-dir", str(tok_dir), "--instruction", "open the drawer",
                  "--name", "x", "--out-dir", str(tmp_path / "out"), "--formats", "safetensors"])
