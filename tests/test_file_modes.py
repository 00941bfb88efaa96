"""Outputs other users share (converted checkpoints, embedding stores) get the umask's permissions, not the
0700/0600 of mkdtemp and safetensors."""

import os
import stat

import numpy as np
import pytest

from rdt_jax.convert.cli import main as convert_main
from rdt_jax.data import language
from rdt_jax.encoders.lang_embeddings import save_lang_embedding_safetensors


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_converted_checkpoints_and_embeddings_follow_the_umask(umask_022, shared_dir, tmp_path):
    small = shared_dir / "fixtures" / "rdt_small"
    assert convert_main([str(small), str(tmp_path / "jax")]) == 0
    assert mode(tmp_path / "jax") == 0o755
    assert convert_main([str(tmp_path / "jax"), str(tmp_path / "torch"), "--to-torch"]) == 0
    assert mode(tmp_path / "torch") == 0o755 and mode(tmp_path / "torch" / "model.safetensors") == 0o644
    emb = np.zeros((3, 4096), np.float32)
    language.save_embedding(tmp_path / "a.safetensors", emb, "open the drawer")
    save_lang_embedding_safetensors(tmp_path / "b.safetensors", emb, "open the drawer")
    assert mode(tmp_path / "a.safetensors") == mode(tmp_path / "b.safetensors") == 0o644
