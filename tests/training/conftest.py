"""Training tests: one on-disk XLA compilation cache for the whole package (in-process and the
``scripts/train.py`` subprocesses, which inherit ``CACHE_ENV``), so each program compiles once."""

import os
import pathlib
import tempfile

import pytest

CACHE = pathlib.Path(tempfile.gettempdir()) / "rdt_jax_test_xla_cache"
# For the subprocesses: the cache location (read by scripts/train.py), and cache every program however
# quick to compile (JAX reads these at import).
CACHE_ENV = {
    "RDT_JAX_COMPILATION_CACHE": os.environ.get("RDT_JAX_COMPILATION_CACHE", str(CACHE)),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


@pytest.fixture(scope="package", autouse=True)
def _compilation_cache():
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = {"jax_compilation_cache_dir": CACHE_ENV["RDT_JAX_COMPILATION_CACHE"],
                "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {k: getattr(jax.config, k) for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is on: ask again with our settings
    yield
    for k, v in old.items():  # the rest of the session (other packages) runs as configured before
        jax.config.update(k, v)
    compilation_cache.reset_cache()
