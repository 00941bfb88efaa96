"""Skipping samples whose data fail to read mid-run (``--data.skip-bad-episodes``), for any step source.

A source draws a sample, and on a read error (a frame that does not decode, a file changed since it was
scanned) draws again from the same ``rng``. The draws stay a function of the sample's rng alone, so a
run over reproducibly corrupt data still resumes exactly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

MAX_REDRAWS = 64  # consecutive failed draws before giving up: the data are broken, not a few episodes
_MAX_NAMED = 100  # distinct read errors named in warnings per source copy

T = TypeVar("T")


class BadSampleLog:
    """Counts the skipped draws of one source and names each distinct error once (a bad frame is drawn
    again and again over a long run). Thread-safe; not pickled with its source (a copy starts afresh)."""

    def __init__(self, dataset_name: str):
        self.dataset_name = dataset_name
        self.count = 0
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def skipped(self, error: Exception) -> None:
        message = str(error)
        with self._lock:
            self.count += 1
            if message in self._named or len(self._named) >= _MAX_NAMED:
                return
            self._named.add(message)
        log.warning("%s: skipping a sample that failed to read (--data.skip-bad-episodes): %s",
                    self.dataset_name, message)


def first_readable(draw: Callable[[], T], errors: tuple[type[Exception], ...], skip: BadSampleLog | None) -> T:
    """``draw()``, drawn again after each of ``errors`` when ``skip`` is given (else the error propagates)."""
    last: Exception | None = None
    for _ in range(MAX_REDRAWS):
        try:
            return draw()
        except errors as err:
            if skip is None:
                raise
            skip.skipped(err)
            last = err
    raise type(last)(f"{skip.dataset_name}: {MAX_REDRAWS} draws in a row failed to read; the last: {last}") from last
