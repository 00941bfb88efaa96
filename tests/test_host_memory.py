"""rdt_jax.host_memory: heap trimming after XLA compilations (glibc)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdt_jax import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="heap trimming is glibc-only")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_trim_heap_returns_freed_heap_pages():
    # 4096 blocks of 64 KiB (under glibc's smallest mmap threshold, so heap-allocated), freed with the
    # last one kept: the heap cannot shrink from its top, only malloc_trim gives the pages back.
    blocks = [np.ones(1 << 14, np.float32) for _ in range(4096)]
    keep = blocks[-1]
    del blocks
    before = _rss_bytes()
    host_memory.trim_heap()
    assert _rss_bytes() < before - (128 << 20), "malloc_trim released less than half of 256 MiB of freed heap"
    assert keep.sum() == keep.size


def test_compilations_trigger_a_trim(monkeypatch):
    assert host_memory.trim_heap_after_compiles()
    assert host_memory.trim_heap_after_compiles()  # idempotent: one listener
    x7, x9 = np.ones(7, np.float32), np.ones(9, np.float32)
    calls = []
    monkeypatch.setattr(host_memory, "trim_heap", lambda: calls.append(1) or True)
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + x.shape[0])
    f(x7).block_until_ready()
    assert len(calls) == 1
    f(x7).block_until_ready()  # cached: no compilation, no trim
    assert len(calls) == 1
    f(x9).block_until_ready()
    assert len(calls) == 2
