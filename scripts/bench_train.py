#!/usr/bin/env python
"""Train-step benchmark on the CPU: step time (median), peak RSS, FLOPs and utilisation.

Conditioning has the official sizes but comes as precomputed features (no SigLIP / T5 in the step):
32 language tokens x 4096 (--lang-len; --lang-padded pads them further, masked, as "max" padding does)
and 4374 image tokens x 1152 per sample, 64 x 128 actions. Each case runs in
its own subprocess so its peak RSS is its own. AdamW (fp32 moments unless --mu-dtype / --nu-dtype bfloat16),
clipping on, EMA off (the official 20.2 GiB reference keeps a bf16 EMA; ours would add 4.9 GB fp32),
buffer donation on.

    python scripts/bench_train.py                    # all cases, markdown table on stdout
    python scripts/bench_train.py --case rdt-170m:2:float32:none
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench_turns import Turns  # scripts/ is sys.path[0] when run as a script

CASES = ["rdt-170m:2:float32:none", "rdt-170m:2:bfloat16:none", "rdt-1b:1:bfloat16:full",
         "rdt-1b:1:bfloat16:save_cond_kv_and_tokens", "rdt-1b:1:float32:full"]
# The official code on the development machine of 2026-12-04 (AMD EPYC Zen 4, 2 cores; BENCHMARKS.md, the
# 2026-12-04 sections): its best step, median s (bf16 autocast, with the huge-page tunable). Another machine
# needs its own measurement: --official with bench_official.py's results.
OFFICIAL_HERE = {("rdt-170m", 2): 6.166, ("rdt-1b", 1): 19.16}  # (model, batch): s
OFFICIAL_HERE_MACHINE = "the AMD EPYC Zen 4 of 2026-12-04"
# Memory floor: fp32 params and grads (8 bytes per parameter) plus the two AdamW moments (4 bytes each in
# float32, the 16 B/param floor; 2 in bfloat16).
PARAM_AND_GRAD_BYTES = 8
LANG_TOKENS = 32  # per sample, as the official benchmark


def matmul_peak(dtype: str, n: int = 2048, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    # A float32 result: XLA:CPU's native bf16 kernels need it (a bf16 result converts the operands).
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts)


def run_case(case: str, steps: int, mu_dtype: str, nu_dtype: str = "float32", layer_layout: str = "auto",
             turns: Turns | None = None, lang_len: int = LANG_TOKENS, lang_padded: int | None = None) -> dict:
    import jax
    import numpy as np

    from rdt_jax.model.config import PRESETS
    from rdt_jax.model.flops import train_step_flops
    from rdt_jax.runner import resolve_layer_layout
    from rdt_jax.training.config import MeshConfig, OptimConfig
    from rdt_jax.training.mesh import make_mesh
    from rdt_jax.training.optimizer import make_optimizer
    from rdt_jax.training.train_step import (
        init_params,
        init_state,
        make_train_step,
        state_in_layout,
        state_shardings,
    )

    layer_layout = resolve_layer_layout(layer_layout)  # recorded as run
    name, b, dtype, remat = case.split(":")
    b = int(b)
    rcfg = PRESETS[name](param_dtype="float32", dtype=dtype, remat=remat)
    padded = lang_padded or lang_len
    tx, schedule = make_optimizer(OptimConfig(mu_dtype=mu_dtype, nu_dtype=nu_dtype), 1000)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {
        "lang_embeds": rng.standard_normal((b, padded, 4096), np.float32) * (np.arange(padded) < lang_len)[:, None],
        "lang_attn_mask": np.broadcast_to(np.arange(padded) < lang_len, (b, padded)).copy(),
        "img_tokens": rng.standard_normal((b, rcfg.img_cond_len, rcfg.img_token_dim), np.float32),
        "states": rng.standard_normal((b, 1, 128), np.float32),
        "actions": rng.standard_normal((b, rcfg.pred_horizon, 128), np.float32),
        "state_elem_mask": np.ones((b, 128), np.float32),
        "ctrl_freqs": np.full((b,), 25.0, np.float32),
    }
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    fresh = lambda p: init_state(p, tx, 0, ema_enabled=False)
    params = state_in_layout(init_params(rcfg, 0), layer_layout)
    abstract = jax.eval_shape(fresh, params)
    state = jax.jit(fresh, out_shardings=state_shardings(abstract, mesh), donate_argnums=0)(params)
    del params
    step = make_train_step(rcfg, tx, schedule, rcfg.ema, mesh, abstract, shapes, None, ema_enabled=False,
                           layer_layout=layer_layout)
    dev_batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, None, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    # Analytic count (MODEL.md §10 convention, forward + backward = 3x forward). XLA's cost
    # analysis counts a scanned loop body once, so it undercounts the stacked blocks.
    flops = train_step_flops(rcfg, padded, b)  # padded tokens are computed (and masked)
    turns = turns or Turns(False)
    times = []
    for i in range(steps + 1):
        with turns.turn("run" if i else "warmup"):
            t0 = time.perf_counter()
            state, m = compiled(state, None, dev_batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])
    with turns.turn("peak"):
        peak = matmul_peak("float32" if dtype == "float32" else "bfloat16")
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {"case": case, "params": n_params, "batch": b, "compute_dtype": dtype, "remat": remat,
            "mu_dtype": mu_dtype, "nu_dtype": nu_dtype, "layer_layout": layer_layout, "step_s_median": med,
            "lang_len": lang_len, "lang_padded": padded,
            "step_times": times, "compile_s": compile_s,
            "flops": flops, "matmul_peak_flops": peak, "utilisation": flops / med / peak,
            "loss": float(m["loss"]), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="model:batch:compute_dtype:remat (repeatable)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mu-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--nu-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layer-layout", default="auto", choices=["auto", "stacked", "per_layer"],
                    help="how the step runs the blocks (auto, as training: per_layer on CPU)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--turns", action="store_true", help=argparse.SUPPRESS)  # with --one: bench_pair.py
    ap.add_argument("--lang-len", type=int, default=LANG_TOKENS, help="instruction tokens per sample")
    ap.add_argument("--lang-padded", type=int, help="language tokens per sample after padding (default: "
                                                    "--lang-len); e.g. 1024 for --data.lang-padding max")
    ap.add_argument("--json", help="append per-case JSON lines here")
    ap.add_argument("--official", help="bench_official.py results (JSON lines) measured on this machine; "
                                       "default: the built-in Zen 5 numbers")
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.one:
        result = run_case(a.case[0], a.steps, a.mu_dtype, a.nu_dtype, a.layer_layout, Turns(a.turns), a.lang_len,
                          a.lang_padded)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    rows = []
    for case in a.case or CASES:
        cmd = [sys.executable, __file__, "--one", "--case", case, "--steps", str(a.steps), "--mu-dtype", a.mu_dtype,
               "--nu-dtype", a.nu_dtype, "--layer-layout", a.layer_layout, "--lang-len", str(a.lang_len)]
        cmd += ["--lang-padded", str(a.lang_padded)] if a.lang_padded else []
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{case}: FAILED (rc {p.returncode})\n{p.stderr[-2000:]}", file=sys.stderr, flush=True)
            rows.append({"case": case, "failed": f"rc {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"})
            continue
        r = json.loads(line[0][7:])
        rows.append(r)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        print(json.dumps(r), file=sys.stderr, flush=True)
    official, official_label = OFFICIAL_HERE, f"official on {OFFICIAL_HERE_MACHINE} s"
    if a.official:
        from official_baseline import best_official  # scripts/ is sys.path[0] when run as a script

        official = {key: t for key, (t, _, _) in best_official(a.official, "train").items()}
        official_label = "official here s"
    else:
        print(f"(speed-up against the official code measured on {OFFICIAL_HERE_MACHINE}, not necessarily this "
              "machine: pass --official with bench_official.py's results from here)")
    print(f"| case (model:batch:compute:remat) | step s (median) | {official_label} | speed-up | peak RSS GB | "
          "RSS / floor (params, grads, moments) | GFLOP/step | util. vs matmul peak | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['case']} | failed: {r['failed']} | | | | | | | |")
            continue
        name = r["case"].split(":")[0]
        ref = official.get((name, r["batch"]))
        sp = f"{ref / r['step_s_median']:.2f}x" if ref else ""
        rss = r["peak_rss_gib"] * 2**30
        moment_bytes = sum(2 if r.get(k) == "bfloat16" else 4 for k in ("mu_dtype", "nu_dtype"))
        floor = (PARAM_AND_GRAD_BYTES + moment_bytes) * r["params"]
        lang = f"{r['lang_len']}/{r['lang_padded']}" if r["lang_padded"] != r["lang_len"] else f"{r['lang_len']}"
        print(f"| {r['case']} ({r['layer_layout']}, language tokens {lang}) | {r['step_s_median']:.2f} | "
              f"{ref or '-'} | {sp} | "
              f"{rss / 1e9:.2f} | {rss / floor:.3f} | "
              f"{r['flops'] / 1e9:.0f} | {100 * r['utilisation']:.0f}% of {r['matmul_peak_flops'] / 1e9:.0f} "
              f"GFLOP/s | {r['compile_s']:.0f} |")
    return 0


if __name__ == "__main__":
    from rdt_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any XLA work: glibc reads the tunable at start-up
    sys.exit(main())
