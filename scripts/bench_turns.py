"""Turn-taking for benchmark processes that share one machine (driven by ``bench_pair.py``).

A process started with ``--turns`` runs each phase of its benchmark (warm-up, every timed run, any
closing measurement) only when told to: it prints ``TURN-WAIT <label>`` on stdout, waits for a
``go`` line on stdin, runs the phase, and prints ``TURN-DONE <label> <seconds>``. The driver gives
one process a turn at a time, so two programs measured "side by side" never compete for the cores,
and their timed runs alternate at the same moments of the machine's (drifting) speed.

Standard library only: the official code's benchmark imports it from its own venv.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class Turns:
    """``turn(label)`` is a no-op unless ``enabled``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextlib.contextmanager
    def turn(self, label: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if not label.isidentifier():
            raise ValueError(f"turn label must be one word, got {label!r}")
        print(f"TURN-WAIT {label}", flush=True)
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"--turns: expected 'go' on stdin before turn {label!r}, got {line!r}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            print(f"TURN-DONE {label} {time.perf_counter() - t0:.6f}", flush=True)
