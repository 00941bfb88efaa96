#!/usr/bin/env python
"""Benchmark ``predict_action`` (batch 1, 5 DPM-Solver++ steps, random weights) on this machine.

Official conditioning sizes: 32 language tokens x 4096 (T5-XXL), 4374 image tokens x 1152 (SigLIP,
6 images x 729), state/mask 128. Each (model, precision) runs in a fresh subprocess so peak RSS is
its own. Prints a table: compile time, median of N timed calls, peak RSS, GFLOP per call (analytic,
MODEL.md §10 convention; XLA's own count in brackets) and achieved GFLOP/s.

    python scripts/bench_inference.py                      # rdt-170m and rdt-1b, fp32/bf16
    python scripts/bench_inference.py --models rdt-170m --precisions fp32 --runs 5
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

PRECISIONS = {
    # name: (param dtype, compute dtype)
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
    "bf16w-fp32": ("bfloat16", "float32"),  # bf16 weights in memory, float32 arithmetic
}
# The official PyTorch code measured on this machine (BENCHMARKS.md, 2026-12-02, AVX512-BF16 Zen 5):
# its best time (bf16, native here) in median seconds, and that run's process peak RSS in GiB, batch 1.
OFFICIAL_HERE = {"rdt-170m": (3.608, 0.99), "rdt-1b": (16.396, 4.96)}


def run_one(model: str, precision: str, runs: int, cached: bool, layer_layout: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rdt_jax.model.config import PRESETS
    from rdt_jax.model.flops import predict_action_flops
    from rdt_jax.runner import RDTRunner, sampling_compiler_options

    param_dtype, dtype = PRECISIONS[precision]
    cfg = PRESETS[model](param_dtype=param_dtype, dtype=dtype)
    # The layout a user's runner gets (``auto``: per-layer blocks on CPU).
    runner = RDTRunner.from_config(cfg, layer_layout=layer_layout)
    graphdef, state, layer_layout = runner.graphdef, runner.state, runner.config.layer_layout
    del runner

    rng = np.random.default_rng(0)
    lang_len = 32
    inputs = (
        jnp.asarray(rng.standard_normal((1, lang_len, cfg.lang_token_dim)), jnp.float32),
        jnp.ones((1, lang_len), bool),
        jnp.asarray(rng.standard_normal((1, cfg.img_cond_len, cfg.img_token_dim)), jnp.float32),
        jnp.asarray(rng.standard_normal((1, 1, cfg.state_token_dim)), jnp.float32),
        jnp.ones((1, 1, cfg.action_dim), jnp.float32),
        jnp.array([25], jnp.int32),
        jnp.asarray(rng.standard_normal((1, cfg.pred_horizon, cfg.action_dim)), jnp.float32),
    )

    def sample(state, *args):
        return nnx.merge(graphdef, state).predict_action(*args, cache_cond_kv=cached)

    t0 = time.perf_counter()
    compiled = jax.jit(sample, compiler_options=sampling_compiler_options(state)).lower(state, *inputs).compile()
    compile_s = time.perf_counter() - t0
    try:
        xla_flops = float(compiled.cost_analysis().get("flops", float("nan")))
    except Exception:  # cost analysis is best-effort on some backends
        xla_flops = float("nan")
    compiled(state, *inputs).block_until_ready()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = compiled(state, *inputs)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    assert np.all(np.isfinite(np.asarray(out, np.float32))), "non-finite actions"
    flops = predict_action_flops(cfg, lang_len, cached=cached).total
    median = statistics.median(times)
    return {
        "model": model, "precision": precision, "cached_kv": cached, "compile_s": compile_s,
        "layer_layout": layer_layout,
        "median_s": median, "min_s": min(times), "runs": runs,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "gflop": flops / 1e9, "xla_gflop": xla_flops / 1e9, "gflops_per_s": flops / 1e9 / median,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["rdt-170m", "rdt-1b"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "bf16w-fp32"], choices=list(PRECISIONS))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--uncached", action="store_true", help="also run without the condition K/V cache")
    p.add_argument("--layer-layout", default="auto", choices=["auto", "stacked", "per_layer"],
                   help="block storage of the runner (auto: per_layer on CPU)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--official", help="bench_official.py results (JSON lines) measured on this machine; "
                                      "default: the built-in Zen 5 numbers")
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        model, precision, cached = args._one
        print(json.dumps(run_one(model, precision, args.runs, cached == "1", args.layer_layout)))
        return

    results = []
    for model in args.models:
        for precision in args.precisions:
            for cached in [True, False] if args.uncached else [True]:
                cmd = [sys.executable, __file__, "--runs", str(args.runs), "--layer-layout", args.layer_layout,
                       "--_one", model, precision, "1" if cached else "0"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{model} {precision}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(f"  done {model} {precision} cached={cached}: {r['median_s']:.2f} s", file=sys.stderr)

    import jax

    machine = platform.processor() or platform.machine()
    print(f"\npredict_action, batch 1, 5 steps, 32 lang + 4374 img tokens | {machine}"
          f" | jax {jax.__version__} | {jax.devices()[0].device_kind}")
    header = (f"{'model':9} {'precision':11} {'layers':9} {'K/V cache':9} {'compile s':>9} {'median s':>9} "
              f"{'min s':>7} {'peak RSS GiB':>12} {'GFLOP':>8} {'(XLA)':>8} {'GFLOP/s':>8} {'vs official':>11} "
              f"{'RSS vs off.':>11}")
    print(header)
    print("-" * len(header))
    official = OFFICIAL_HERE
    if args.official:
        from official_baseline import best_official  # scripts/ is sys.path[0] when run as a script

        official = {m: (t, rss) for (m, b), (t, rss, _) in best_official(args.official, "pa").items() if b == 1}
    for r in results:
        best_s, best_rss = official.get(r["model"], (float("nan"), float("nan")))
        print(f"{r['model']:9} {r['precision']:11} {r['layer_layout']:9} {'yes' if r['cached_kv'] else 'no':9} "
              f"{r['compile_s']:9.1f} {r['median_s']:9.2f} {r['min_s']:7.2f} {r['peak_rss_gib']:12.2f} "
              f"{r['gflop']:8.1f} {r['xla_gflop']:8.1f} {r['gflops_per_s']:8.1f} {best_s / r['median_s']:10.2f}x "
              f"{r['peak_rss_gib'] / best_rss:10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    from rdt_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any XLA work: glibc reads the tunable at start-up
    main()
