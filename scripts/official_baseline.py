"""The official code's best time per model, read from ``bench_official.py``'s JSON lines.

The benchmarks compare against the official code measured on the same machine; their built-in numbers
are one machine's. ``--official FILE`` points them at this machine's own measurements instead.
"""

from __future__ import annotations

import json
import pathlib

# bench_official.py's model names -> ours
MODELS = {"170m": "rdt-170m", "1b": "rdt-1b"}


def best_official(path: str | pathlib.Path, case: str) -> dict[tuple[str, int], tuple[float, float, str]]:
    """{(model, batch): (median s, peak RSS GiB, dtype)} of the fastest dtype per model and batch size
    for ``case`` (``pa`` or ``train``)."""
    best: dict[tuple[str, int], tuple[float, float, str]] = {}
    for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if r["case"] != case:
                continue
            key = (MODELS[r["model"]], int(r.get("batch", 1)))
            row = (float(r["median_s"]), float(r["peak_rss_gib"]), r["dtype"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a bench_official.py result line ({e!r})") from e
        if key not in best or row[0] < best[key][0]:
            best[key] = row
    return best
