"""T5 tokenizer settings, language embedding files, and scripts/encode_lang.py end to end."""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from rdt_jax.encoders import load_t5
from rdt_jax.encoders.lang_embeddings import (
    load_lang_embedding,
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
        "t5_encoder", vocab_size=len(tok), d_model=16, d_ff=24, d_kv=4, num_heads=4, num_layers=2
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
        assert st.shape == pt.shape == (n, 16)
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
    assert official["embeddings"].dtype == torch.bfloat16 and official["embeddings"].shape == (1, n, 16)
    assert (out_dir / "drawer.v1.safetensors").exists() and not (out_dir / "drawer.pt").exists()
    bf = load_lang_embedding(out_dir / "drawer.v1.pt").astype(np.float32)
    assert bf.shape == (n, 16) and rel_err(bf, ref[1, :n]) <= 2e-2
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
