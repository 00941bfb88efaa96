"""scripts/official_baseline.py: the benchmarks' per-machine official reference."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from official_baseline import best_official


def _line(case, model, dtype, median, batch=1, rss=1.0):
    return json.dumps({"case": case, "model": model, "dtype": dtype, "batch": batch, "median_s": median,
                       "peak_rss_gib": rss, "times_s": [median]})


def test_picks_the_fastest_dtype_per_model_and_batch(tmp_path):
    f = tmp_path / "official.jsonl"
    f.write_text("\n".join([
        _line("pa", "170m", "fp32", 6.7, rss=1.16), _line("pa", "170m", "bf16", 8.7, rss=1.04),
        _line("pa", "1b", "bf16", 16.4), _line("pa", "1b", "fp32", 44.6),
        _line("train", "170m", "fp32", 10.9, batch=2), _line("train", "170m", "bf16autocast", 14.0, batch=2),
        _line("train", "170m", "fp32", 5.0, batch=1), "",
    ]) + "\n")
    assert best_official(f, "pa") == {("rdt-170m", 1): (6.7, 1.16, "fp32"), ("rdt-1b", 1): (16.4, 1.0, "bf16")}
    train = best_official(f, "train")
    assert train[("rdt-170m", 2)] == (10.9, 1.0, "fp32") and train[("rdt-170m", 1)][0] == 5.0


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    f = tmp_path / "official.jsonl"
    f.write_text(_line("pa", "170m", "fp32", 6.7) + "\n{\"case\": \"pa\"}\n")
    with pytest.raises(ValueError, match=r"official\.jsonl:2: not a bench_official\.py result line"):
        best_official(f, "pa")
