"""Outputs other users share (converted checkpoints, embedding stores) get the umask's permissions, not the
0700/0600 of mkdtemp and safetensors."""

import os
import stat

import numpy as np
import pytest

from rdt_jax.convert.cli import main as convert_main
from rdt_jax.data import language


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
    stored = language.EmbeddingStore(tmp_path / "store").put("open the drawer", emb)
    assert mode(tmp_path / "a.safetensors") == mode(stored) == 0o644
