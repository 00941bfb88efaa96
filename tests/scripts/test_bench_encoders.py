"""scripts/bench_encoders.py in its smallest mode: both frameworks measure (a JAX row once failed on every run
unnoticed: the script printed the errors in its table and exited 0)."""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_encoders.py"


def test_one_siglip_layer_on_one_image_measures_both_frameworks():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RDT_JAX_HUGE_PAGES": "0"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", "siglip", "--dtypes", "float32", "--reps", "1",
                        "--images", "1", "--layers", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| SigLIP")]
    assert len(rows) == 2 and not any("exit" in row or "timeout" in row for row in rows), r.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--layers", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--layers must be >= 1" in bad.stderr
