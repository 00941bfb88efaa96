"""Benchmark the JAX encoders against transformers' PyTorch models on this machine.

SigLIP so400m/14-384 on the six 384×384 images of one observation, and the T5-v1.1-XXL
encoder on one 32-token instruction, in float32 and bfloat16, random weights with the
published configs. Every (model, dtype, framework) runs in its own subprocess, one after
the other, so a 19 GB float32 T5-XXL never shares memory with another copy::

    python scripts/bench_encoders.py                       # everything (slow on a laptop CPU)
    python scripts/bench_encoders.py --models siglip --dtypes bfloat16 --reps 2

Reported: setup (weights), JAX compile time (lower + compile; PyTorch: none, eager), the first
call, the median of ``--reps`` further calls, the analytic matmul GFLOP count (2·m·n·k over
all projections, attention and MLPs; identical for both frameworks) and GFLOP/s.
JAX weights are streamed through the same importer as real checkpoints (``import_params``)
from a reader that returns random tensors, so the benchmark also exercises the load path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Literal

import numpy as np
import tyro

from rdt_jax.encoders.siglip import SIGLIP_SO400M_384
from rdt_jax.encoders.t5 import T5_V1_1_XXL

Model = Literal["siglip", "t5"]
DType = Literal["float32", "bfloat16"]
Framework = Literal["jax", "torch"]

# The published configs, as keyword arguments for transformers' PyTorch models (same field names).
SO400M = dataclasses.asdict(SIGLIP_SO400M_384)
T5_XXL = dataclasses.asdict(T5_V1_1_XXL)


@dataclasses.dataclass(frozen=True)
class Args:
    models: tuple[Model, ...] = ("siglip", "t5")
    dtypes: tuple[DType, ...] = ("float32", "bfloat16")
    frameworks: tuple[Framework, ...] = ("jax", "torch")
    reps: int = 3
    """Timed calls after the first one (median reported)."""
    images: int = 6
    tokens: int = 32
    layers: int | None = None
    """Override the depth of both models (for quick runs); None = the published depth."""
    layer_layout: Literal["per_layer", "stacked"] = "per_layer"
    """JAX parameter layout: per-layer arrays, unrolled (fast on CPU), or stacked + lax.scan."""
    timeout_s: int = 5400
    """Per-subprocess time limit."""
    memory_fraction: float = 0.8
    """Refuse a run whose weights need more than this fraction of RAM (float32 T5-XXL needs ~0.9 of 24 GiB;
    raise it only on an otherwise idle machine)."""
    json_out: pathlib.Path | None = None
    worker: str | None = None
    """Internal: run one measurement (JSON spec) and print its result as JSON."""

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"--layers must be >= 1 (None: the published depth), got {self.layers}")
        if self.reps < 1 or self.images < 1 or self.tokens < 1:
            raise ValueError("--reps, --images and --tokens must be >= 1")


def gflop(model: Model, images: int, tokens: int, layers: int | None) -> float:
    """Matmul FLOPs (2·m·n·k) of one forward pass, in GFLOP."""
    if model == "siglip":
        c = SO400M
        d, f, n_layers = c["hidden_size"], c["intermediate_size"], layers or c["num_hidden_layers"]
        n = (c["image_size"] // c["patch_size"]) ** 2
        patch = 2 * n * (3 * c["patch_size"] ** 2) * d
        per_layer = 2 * n * d * d * 4 + 2 * 2 * n * n * d + 2 * 2 * n * d * f
        return images * (patch + n_layers * per_layer) / 1e9
    c = T5_XXL
    d, f, inner, n_layers = c["d_model"], c["d_ff"], c["num_heads"] * c["d_kv"], layers or c["num_layers"]
    per_layer = 2 * tokens * d * inner * 4 + 2 * 2 * tokens * tokens * inner + 2 * 3 * tokens * d * f
    return n_layers * per_layer / 1e9


# ----------------------------------------------------------------------------- workers


class _RandomReader:
    """Stands in for a CheckpointReader: HF key/shape list of a meta-built model, random data."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        from rdt_jax.encoders.hf_import import TensorInfo

        self.hf_dir = pathlib.Path("<random weights>")
        self.entries = {k: TensorInfo(s, "F32", self.hf_dir) for k, s in shapes.items()}
        self._rng = np.random.default_rng(0)

    def read(self, key: str) -> np.ndarray:
        shape = self.entries[key].shape
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layer_norm.weight")):
            return np.ones(shape, np.float32)
        # Uniform with std 0.02: cheap to draw for 4.7 B parameters, never denormal or NaN.
        return (self._rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(0.02 * 12**0.5)

    read_weight = read  # the importer's checked read (random data is finite float32)


def _hf_model(model: Model, layers: int | None, torch_dtype):
    import torch
    import transformers

    with torch.device("meta"):
        if model == "siglip":
            cfg = dict(SO400M, num_hidden_layers=layers or SO400M["num_hidden_layers"])
            m = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg))
        else:
            cfg = dict(T5_XXL, num_layers=layers or T5_XXL["num_layers"])
            m = transformers.T5EncoderModel(transformers.T5Config(**cfg))
    return m.to(torch_dtype)


def _check_memory(spec: dict) -> None:
    """Refuse (instead of swapping or waking the OOM killer) when the weights cannot fit in RAM."""
    import psutil

    n_params = 0.428e9 if spec["model"] == "siglip" else 4.76e9
    if spec["layers"]:
        n_params *= spec["layers"] / (27 if spec["model"] == "siglip" else 24)
    need = n_params * (4 if spec["dtype"] == "float32" else 2) * 1.1 + 1.5e9
    mem = psutil.virtual_memory()
    # At most this share of RAM even when more is free now: other jobs on a shared machine come back.
    limit = min(mem.available, spec.get("memory_fraction", 0.8) * mem.total)
    if need > limit:
        raise MemoryError(
            f"skipped: needs ~{need / 1e9:.1f} GB; {mem.available / 1e9:.1f} GB available of {mem.total / 1e9:.1f} GB"
        )


def _worker_jax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rdt_jax.encoders import SIGLIP_SO400M_384, T5_V1_1_XXL
    from rdt_jax.encoders.hf_import import import_params
    from rdt_jax.encoders.image_encoding import encode_images
    from rdt_jax.encoders.siglip import _IGNORED as SIGLIP_IGNORED
    from rdt_jax.encoders.siglip import SiglipVisionTower, siglip_sources
    from rdt_jax.encoders.t5 import T5Encoder, t5_sources

    dtype = jnp.dtype(spec["dtype"])
    layers = spec["layers"]
    layout = spec.get("layer_layout", "per_layer")
    t0 = time.perf_counter()
    hf = _hf_model(spec["model"], layers, __import__("torch").float32)
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    del hf
    rng = np.random.default_rng(1)
    if spec["model"] == "siglip":
        cfg = dataclasses.replace(SIGLIP_SO400M_384, num_hidden_layers=layers or 27)
        abstract = nnx.eval_shape(lambda: SiglipVisionTower(cfg, dtype=dtype, layer_layout=layout, rngs=nnx.Rngs(0)))
        sources, ignore = siglip_sources(cfg, layer_layout=layout), SIGLIP_IGNORED
        x = rng.uniform(-1, 1, (1, spec["images"], 3, 384, 384)).astype(np.float32)
        fn = lambda m, x: encode_images(m, x)
        args = (jnp.asarray(x),)
    else:
        cfg = dataclasses.replace(T5_V1_1_XXL, num_layers=layers or 24)
        abstract = nnx.eval_shape(lambda: T5Encoder(cfg, dtype=dtype, layer_layout=layout, rngs=nnx.Rngs(0)))
        sources, ignore = t5_sources(cfg, layer_layout=layout), ()
        shapes.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
        ids = rng.integers(2, cfg.vocab_size, (1, spec["tokens"])).astype(np.int32)
        fn = lambda m, ids, mask: m(ids, mask)
        args = (jnp.asarray(ids), jnp.ones(ids.shape, bool))
    graphdef, abs_state = nnx.split(abstract)
    state = import_params(_RandomReader(shapes), abs_state, sources, ignore=ignore)
    jax.block_until_ready(state)
    setup = time.perf_counter() - t0

    run = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
    t0 = time.perf_counter()
    compiled = run.lower(state, *args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(state, *args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, *args))
        times.append(time.perf_counter() - t0)
    finite = bool(np.isfinite(np.asarray(out.astype(jnp.float32))).all())
    return dict(
        setup_s=setup,
        compile_s=compile_s,
        first_s=first,
        times_s=times,
        finite=finite,
        out_shape=list(out.shape),
        threads=os.cpu_count(),
        version=f"jax {jax.__version__}",
        layer_layout=layout,
    )


def _worker_torch(spec: dict) -> dict:
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    t0 = time.perf_counter()
    m = _hf_model(spec["model"], spec["layers"], tdtype).to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if spec["model"] == "siglip":  # a non-persistent buffer: to_empty left it uninitialised
            m.embeddings.position_ids.copy_(torch.arange(m.embeddings.position_ids.shape[1])[None])
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=g)
    rng = np.random.default_rng(1)
    if spec["model"] == "siglip":
        x = torch.from_numpy(rng.uniform(-1, 1, (spec["images"], 3, 384, 384)).astype(np.float32)).to(tdtype)
        call = lambda: m(pixel_values=x).last_hidden_state
    else:
        ids = torch.from_numpy(rng.integers(2, 32128, (1, spec["tokens"]))).long()
        mask = torch.ones_like(ids)
        call = lambda: m(input_ids=ids, attention_mask=mask).last_hidden_state
    setup = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        times = []
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return dict(
        setup_s=setup,
        compile_s=None,
        first_s=first,
        times_s=times,
        finite=bool(torch.isfinite(out.float()).all()),
        out_shape=list(out.shape),
        threads=torch.get_num_threads(),
        version=f"torch {torch.__version__}",
        attn=m.config._attn_implementation,
    )


# ----------------------------------------------------------------------------- driver


def _run_one(spec: dict, timeout_s: int) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timeout after {timeout_s}s")
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:]
        return dict(spec, error=f"exit {proc.returncode}: {' | '.join(tail)}", wall_s=wall)
    return dict(spec, **json.loads(lines[-1]), wall_s=wall)


def _fmt(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    head = (
        "| model | dtype | framework | setup s | compile s | first call s | median s | GFLOP | GFLOP/s "
        "| JAX speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    med = {(r["model"], r["dtype"], r["framework"]): statistics.median(r["times_s"]) for r in results if "times_s" in r}
    rows = []
    for r in results:
        name = f"SigLIP so400m ×{r['images']} img" if r["model"] == "siglip" else f"T5-XXL enc, {r['tokens']} tok"
        if r.get("layers"):
            name += f" ({r['layers']} layers)"
        if r["framework"] == "jax" and r.get("layer_layout", "per_layer") != "per_layer":
            name += f" [{r['layer_layout']}]"
        if "error" in r:
            rows.append(f"| {name} | {r['dtype']} | {r['framework']} | {r['error']} | | | | | | |")
            continue
        m = med[(r["model"], r["dtype"], r["framework"])]
        other = med.get((r["model"], r["dtype"], "torch"))
        speed = f"{other / m:.2f}×" if r["framework"] == "jax" and other else ""
        flag = "" if r["finite"] else " (non-finite output!)"
        rows.append(
            f"| {name} | {r['dtype']} | {r['framework']}{flag} | {_fmt(r['setup_s'], 1)} | {_fmt(r['compile_s'])} | "
            f"{_fmt(r['first_s'])} | {_fmt(m, 3)} | {r['gflop']:.1f} | {r['gflop'] / m:.1f} | {speed} |"
        )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    args = tyro.cli(Args)
    if args.worker:
        spec = json.loads(args.worker)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        _check_memory(spec)
        result = _worker_jax(spec) if spec["framework"] == "jax" else _worker_torch(spec)
        print(json.dumps(result), flush=True)
        return
    results = []
    for model in args.models:
        for dtype in args.dtypes:
            for fw in args.frameworks:
                spec = dict(
                    model=model,
                    dtype=dtype,
                    framework=fw,
                    reps=args.reps,
                    images=args.images,
                    tokens=args.tokens,
                    layers=args.layers,
                    layer_layout=args.layer_layout,
                    memory_fraction=args.memory_fraction,
                )
                spec["gflop"] = gflop(model, args.images, args.tokens, args.layers)
                print(f"running {model} {dtype} {fw} ...", file=sys.stderr, flush=True)
                r = _run_one(spec, args.timeout_s)
                print(f"  -> {json.dumps(r)}", file=sys.stderr, flush=True)
                results.append(r)
                if args.json_out:
                    args.json_out.write_text(json.dumps(results, indent=1))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print(table(results))
    failed = [r for r in results if "error" in r]
    if failed:  # a table of errors is not a benchmark
        print(f"{len(failed)} of {len(results)} measurements failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from rdt_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any XLA work: glibc reads the tunable at start-up
    main()
