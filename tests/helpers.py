"""Shared test helpers: relative errors and converting the golden fixtures once per session."""

from __future__ import annotations

import numpy as np


def rel_err(actual, expected) -> float:
    """max |a - e| / max |e|: the relative error measure used by every parity test."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    a = np.asarray(actual, dtype=np.float64)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err = rel_err(a, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def run_together(cmds: list[list[str]], envs: list[dict[str, str]], timeout: float, cwd=None) -> list[str]:
    """Runs the commands at the same time (each with its environment), kills what is left after
    ``timeout`` seconds, asserts that each exited with 0 and returns their combined stdout/stderr."""
    import subprocess

    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
             for c, e in zip(cmds, envs, strict=True)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outs
