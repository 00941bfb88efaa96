"""Training tests: one on-disk XLA compilation cache for the whole session (in-process and the
``scripts/train.py`` subprocesses), so each program shape compiles once."""

import os
import pathlib
import tempfile

import pytest

CACHE = pathlib.Path(tempfile.gettempdir()) / "rdt_jax_test_xla_cache"
os.environ.setdefault("RDT_JAX_COMPILATION_CACHE", str(CACHE))


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache():
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["RDT_JAX_COMPILATION_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
