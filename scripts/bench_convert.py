#!/usr/bin/env python
"""Peak memory and time of converting a full-size checkpoint (random bf16 weights, the release layout).

Writes a synthetic rdt-1b (or rdt-170m) ``model.safetensors`` / ``pytorch_model.bin`` in bfloat16
(2.46 GB for rdt-1b), converts it with ``convert_torch_weights.py`` in a subprocess and reports the
converter's peak RSS against the size of the weights. The converter streams tensor by tensor, so the
peak should stay near (source mapped + one output copy).

    python scripts/bench_convert.py --model rdt-1b --format safetensors --dtype float32
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from rdt_jax.convert.keys import key_specs
from rdt_jax.model.config import PRESETS


def write_synthetic(cfg, directory: pathlib.Path, fmt: str) -> int:
    tensors = {}
    rng = np.random.default_rng(0)
    total = 0
    for spec in key_specs(cfg):
        n = int(np.prod(spec.torch_shape))
        tensors[spec.torch_key] = (rng.standard_normal(n, np.float32) * 0.02).astype(ml_dtypes.bfloat16).reshape(
            spec.torch_shape)
        total += n
    official = cfg.to_official()
    official.pop("rdt_jax")
    (directory / "config.json").write_text(json.dumps(official))
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, str(directory / "model.safetensors"))
    else:
        import torch

        state = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in tensors.items()}
        torch.save(state, directory / "pytorch_model.bin")
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rdt-1b", choices=sorted(PRESETS))
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    cfg = PRESETS[args.model]()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="rdt_bench_convert_"))
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    n_params = write_synthetic(cfg, src, args.format)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "convert_torch_weights.py", str(src), str(out), "--dtype", args.dtype]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parent.parent)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"conversion failed:\n{proc.stderr[-3000:]}")
    peak_kib = next(int(line.split()[-1]) for line in proc.stderr.splitlines() if "Maximum resident" in line)
    src_bytes = n_params * 2
    out_bytes = n_params * (4 if args.dtype == "float32" else 2)
    print(f"{'model':9} {'format':12} {'out dtype':9} {'params':>14} {'source GB':>9} {'output GB':>9} "
          f"{'peak RSS GB':>11} {'peak/(src+out)':>14} {'time s':>7}")
    print(f"{args.model:9} {args.format:12} {args.dtype:9} {n_params:14,d} {src_bytes / 1e9:9.2f} "
          f"{out_bytes / 1e9:9.2f} {peak_kib * 1024 / 1e9:11.2f} {peak_kib * 1024 / (src_bytes + out_bytes):14.2f} "
          f"{seconds:7.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
