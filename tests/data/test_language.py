"""Language embeddings: official .pt, our safetensors, the empty embedding, padding."""

import ml_dtypes
import numpy as np
import pytest
import torch

from rdt_jax.data import language


def test_empty_embedding_equals_official_pt(shared_dir):
    official = torch.load(shared_dir / "reference/data/empty_lang_embed.pt", weights_only=True)
    e = language.empty_embedding()
    assert e.shape == (1, 4096) and e.dtype == np.float32
    np.testing.assert_array_equal(e, official.float().numpy())


def test_pt_formats(tmp_path):
    x = torch.randn(5, 4096).to(torch.bfloat16)
    torch.save(x, tmp_path / "a.pt")
    torch.save({"name": "n", "instruction": "do it", "embeddings": x[None]}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        e = language.load_embedding(tmp_path / name)
        np.testing.assert_array_equal(e, x.float().numpy())
    torch.save(torch.zeros(3, 17), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: language embedding has shape \(3, 17\)"):
        language.load_embedding(tmp_path / "bad.pt")
    # A truncated file and one that is not a torch file at all: named, as ValueError (training's readers
    # report it with the sample), not torch's OSError/KeyError.
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    for name in ("cut.pt", "junk.pt"):
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: cannot read the \.pt embedding"):
            language.load_embedding(tmp_path / name)


def test_safetensors_store_and_padding(tmp_path):
    store = language.EmbeddingStore(tmp_path / "emb")
    x = np.random.default_rng(0).normal(size=(7, 4096)).astype(np.float32)
    p = store.put("Pick up the cup.", x)
    from safetensors import safe_open

    with safe_open(str(p), "np") as f:
        assert f.metadata()["instruction"] == "Pick up the cup."
    np.testing.assert_array_equal(store.get("Pick up the cup."), x)
    with pytest.raises(KeyError, match="no precomputed embedding for instruction 'other'"):
        store.get("other")
    padded, mask = language.pad_embedding(x, 10)
    assert padded.shape == (10, 4096) and mask.tolist() == [True] * 7 + [False] * 3
    np.testing.assert_array_equal(padded[:7], x)
    assert not padded[7:].any()
    with pytest.raises(ValueError, match="7 tokens, more than max_lang_len=6"):
        language.pad_embedding(x, 6)


def test_one_reader_for_bfloat16_safetensors_and_any_width(tmp_path):
    """A bfloat16 safetensors file (numpy itself has no bfloat16) reads as its values; read_embedding
    takes any width, load_embedding (what training reads) only 4096, and says which file is wrong."""
    x = np.random.default_rng(1).normal(size=(4, 4096)).astype(np.float32)
    language.save_embedding(tmp_path / "bf.safetensors", x, "t", dtype=ml_dtypes.bfloat16)
    stored = language.read_embedding(tmp_path / "bf.safetensors")
    assert stored.dtype == ml_dtypes.bfloat16 and stored.shape == (4, 4096)
    got = language.load_embedding(tmp_path / "bf.safetensors")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert language.embedding_length(tmp_path / "bf.safetensors") == 4
    language.save_embedding(tmp_path / "small.safetensors", np.ones((3, 32), np.float32), "t")
    assert language.read_embedding(tmp_path / "small.safetensors").shape == (3, 32)
    with pytest.raises(ValueError, match=r"small\.safetensors: language embedding has shape \(3, 32\), "
                                         r"expected \(L, 4096\)"):
        language.load_embedding(tmp_path / "small.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "bf.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.safetensors: cannot read safetensors"):
        language.read_embedding(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match=r"e\.npy: unknown embedding format"):
        language.read_embedding(tmp_path / "e.npy")
    # The writers refuse what training would refuse to read, before anything is written.
    bad = x.copy()
    bad[2, 7] = np.nan
    for save, name in ((language.save_embedding, "nan.safetensors"), (language.save_embedding_pt, "nan.pt")):
        args = (tmp_path / name, bad, "t") if name.endswith("safetensors") else (tmp_path / name, bad)
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: language embedding contains NaN"):
            save(*args)
        assert not (tmp_path / name).exists()


def test_pt_embedding_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    torch.save(torch.zeros(2, 4096), tmp_path / "a.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # an install without the torch extra
    with pytest.raises(ValueError, match=r"a\.pt: reading \.pt embeddings needs torch: pip install 'rdt-jax\[torch\]'"):
        language.load_embedding(tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"b\.pt: writing \.pt embeddings needs torch: pip install 'rdt-jax\[torch\]'"):
        language.save_embedding_pt(tmp_path / "b.pt", np.zeros((2, 4096), np.float32))
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize(("longest", "max_len", "want"), [
    (1, 1024, 16), (16, 1024, 16), (17, 1024, 32), (33, 1024, 64), (600, 1024, 1024), (1024, 1024, 1024),
    (5, 8, 8), (65, 100, 100), (40, 100, 64),
])
def test_bucket_length_is_the_smallest_power_of_two_from_16_capped_at_max(longest, max_len, want):
    assert language.bucket_length(longest, max_len) == want


def test_bucket_length_refuses_an_instruction_longer_than_max():
    with pytest.raises(ValueError, match="9 tokens, more than max_lang_len=8"):
        language.bucket_length(9, 8)


def test_pad_embeddings_right_pads_each_row_and_extend_padding_adds_masked_tokens():
    a, b = np.full((3, 4096), 1.0, np.float32), np.full((5, 4096), 2.0, np.float32)
    lang, mask = language.pad_embeddings([a, b], 6)
    assert lang.shape == (2, 6, 4096) and lang.dtype == np.float32
    assert mask.tolist() == [[True] * 3 + [False] * 3, [True] * 5 + [False]]
    np.testing.assert_array_equal(lang[0, :3], a)
    np.testing.assert_array_equal(lang[1, :5], b)
    assert not lang[0, 3:].any() and not lang[1, 5:].any()
    with pytest.raises(ValueError, match="5 tokens, more than the batch's 4"):
        language.pad_embeddings([a, b], 4)
    wide, wide_mask = language.extend_padding(lang, mask, 8)
    assert wide.shape == (2, 8, 4096) and wide_mask.shape == (2, 8)
    np.testing.assert_array_equal(wide[:, :6], lang)
    assert not wide[:, 6:].any() and not wide_mask[:, 6:].any()
    np.testing.assert_array_equal(wide_mask[:, :6], mask)
    with pytest.raises(ValueError, match="cannot pad 6 language tokens to fewer"):
        language.extend_padding(lang, mask, 4)
