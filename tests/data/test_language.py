"""Language embeddings: official .pt, our safetensors, the empty embedding, padding."""

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


def test_pt_embedding_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    torch.save(torch.zeros(2, 4096), tmp_path / "a.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # an install without the torch extra
    with pytest.raises(ValueError, match=r"a\.pt: reading \.pt embeddings needs torch: pip install 'rdt-jax\[torch\]'"):
        language.load_embedding(tmp_path / "a.pt")
