"""Redrawing after read errors (rdt_jax.data.bad_samples), apart from any source."""

from __future__ import annotations

import pytest

from rdt_jax.data.bad_samples import MAX_REDRAWS, BadSampleLog, first_readable


class ReadError(ValueError):
    pass


def _draws(outcomes):
    """A draw function returning or raising the given outcomes in turn."""
    it = iter(outcomes)

    def draw():
        x = next(it)
        if isinstance(x, Exception):
            raise x
        return x

    return draw


def test_redraws_past_read_errors_and_names_each_once(caplog):
    log = BadSampleLog("ds")
    with caplog.at_level("WARNING"):
        got = first_readable(_draws([ReadError("a.h5 step 3"), ReadError("a.h5 step 3"), ReadError("b.h5"), 7]),
                             (ReadError,), log)
    assert got == 7 and log.count == 3
    assert caplog.messages == ["ds: skipping a sample that failed to read (--data.skip-bad-episodes): a.h5 step 3",
                               "ds: skipping a sample that failed to read (--data.skip-bad-episodes): b.h5"]


def test_without_a_log_and_for_other_errors_the_error_propagates():
    with pytest.raises(ReadError, match=r"^a\.h5$"):
        first_readable(_draws([ReadError("a.h5"), 7]), (ReadError,), None)
    with pytest.raises(KeyError):
        first_readable(_draws([KeyError("not a read error"), 7]), (ReadError,), BadSampleLog("ds"))


def test_gives_up_after_max_redraws():
    log = BadSampleLog("ds")
    with pytest.raises(ReadError, match=rf"^ds: {MAX_REDRAWS} draws in a row failed to read; the last: c\.h5 63$"):
        first_readable(_draws([ReadError(f"c.h5 {i}") for i in range(MAX_REDRAWS)] + [7]), (ReadError,), log)
    assert log.count == MAX_REDRAWS
