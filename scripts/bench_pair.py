#!/usr/bin/env python
"""The official PyTorch train step and ours, timed in alternation on the same machine.

Shared 2-core VMs drift in speed by tens of percent within minutes, so two benchmarks run one after
the other can disagree by more than the difference they measure. Here both programs are loaded at
once (``bench_official.py`` in the official code's venv, ``bench_train.py`` in ours), and
``bench_turns.py`` hands out turns: both warm up, then their timed steps alternate A B B A A B ...
with nothing else running, so each pair of steps meets the machine in the same state (each timed
step follows an untimed one of the same program: ``--settle``). The table
lists every pair and the speed-up of each; the summary is their median.

    python scripts/bench_pair.py --official-python /path/to/official-venv/bin/python \\
        --official-dir /path/to/RoboticsDiffusionTransformer --model 170m --batch 2 --runs 8

Both processes stay resident, so the model must fit in memory twice (rdt-170m does; rdt-1b needs
~20 GB per process: run ``bench_official.py`` and ``bench_train.py`` one after the other).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

SCRIPTS = pathlib.Path(__file__).resolve().parent
# Parameters per model (bench_official.py's names), for the fits-twice check: fp32 params, grads and
# two AdamW moments per process.
PARAMS = {"170m": 166_229_888, "1b": 1_228_581_888}
BYTES_PER_PARAM = 16


def official_env(base: dict, official_dir: str, huge_pages: bool) -> dict:
    """The official program's environment: ours (re-executed with glibc's huge-page tunable by
    rdt_jax.huge_pages) minus that tunable, unless ``huge_pages``."""
    from rdt_jax.huge_pages import TUNABLE

    entries = [e for e in base.get("GLIBC_TUNABLES", "").split(":") if e and e.split("=", 1)[0] != TUNABLE]
    if huge_pages:
        entries.append(f"{TUNABLE}=1")
    env = {k: v for k, v in base.items() if k != "GLIBC_TUNABLES"}
    if entries:
        env["GLIBC_TUNABLES"] = ":".join(entries)
    return {**env, "RDT_OFFICIAL_DIR": official_dir}


class ChildFailed(RuntimeError):
    pass


class Child:
    """A benchmark process speaking ``bench_turns.py``'s protocol on its stdin/stdout."""

    def __init__(self, name: str, cmd: Sequence[str], log: pathlib.Path, env: dict | None = None):
        self.name, self.log, self.env = name, log, dict(os.environ if env is None else env)
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log_file, text=True, env=self.env)
        self.output: list[str] = []  # stdout lines that are not protocol
        self.waiting: str | None = None  # label of the turn it is waiting for

    def _fail(self, why: str) -> ChildFailed:
        self.proc.kill()
        self.proc.wait()
        self._log_file.flush()
        tail = self.log.read_text()[-3000:]
        return ChildFailed(f"{self.name}: {why} (rc {self.proc.returncode}); stderr in {self.log}:\n{tail}")

    def _next_event(self) -> list[str] | None:
        """The next protocol line, split; None at end of output."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return None
            if line.startswith("TURN-"):
                return line.split()
            self.output.append(line.rstrip("\n"))

    def ready(self) -> str | None:
        """Block until the process waits for its next turn; its label, or None if it has finished."""
        if self.waiting is None:
            event = self._next_event()
            if event is None:
                return None
            if event[0] != "TURN-WAIT" or len(event) != 2:
                raise self._fail(f"expected 'TURN-WAIT <label>', got {' '.join(event)!r}")
            self.waiting = event[1]
        return self.waiting

    def cpu_s(self) -> float:
        """CPU seconds the process has used so far (Linux /proc)."""
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def turn(self, label: str) -> float:
        """Give the process its ``label`` turn; the seconds it reports for it."""
        got = self.ready()
        if got != label:
            raise self._fail(f"expected to wait for turn {label!r}, waits for {got!r}")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.waiting = None
        event = self._next_event()
        if event is None or event[:2] != ["TURN-DONE", label] or len(event) != 3:
            raise self._fail(f"turn {label!r} did not end with 'TURN-DONE {label} <s>': {event}")
        return float(event[2])

    def finish(self) -> list[str]:
        """Give every remaining turn, wait for the exit; the process's other stdout lines."""
        while (label := self.ready()) is not None:
            self.turn(label)
        if self.proc.wait():
            raise self._fail("exited with an error")
        self._log_file.close()
        return self.output


def interleave(a: Child, b: Child, runs: int, gap_s: float = 0.0, settle: int = 0
               ) -> tuple[list[float], list[float], float]:
    """Warm-ups, then ``runs`` timed turns each, in A B B A order, ``gap_s`` of idle before each;
    each timed turn comes after ``settle`` untimed ones of the same program (a program's first step
    after the other's ran slower on the shared VM, so the timed step follows one of its own).

    Returns (a's seconds, b's seconds, the most CPU seconds the idle process used during one of the
    other's timed turns). Nothing is given a turn until both have finished setting up (loading,
    compiling), so from the first warm-up on only one process computes at a time.
    """
    for c in (a, b):
        if c.ready() != "warmup":
            raise c._fail("ended or skipped its warm-up turn")
    for c in (a, b):
        c.turn("warmup")
    times: dict[str, list[float]] = {a.name: [], b.name: []}
    idle_cpu = 0.0
    for i in range(runs):
        for c, other in ((a, b), (b, a)) if i % 2 == 0 else ((b, a), (a, b)):
            for _ in range(settle):
                c.turn("run")
            time.sleep(gap_s)
            cpu0 = other.cpu_s()
            times[c.name].append(c.turn("run"))
            idle_cpu = max(idle_cpu, other.cpu_s() - cpu0)
    return times[a.name], times[b.name], idle_cpu


def _last_json(lines: list[str], prefix: str = "") -> dict:
    for line in reversed(lines):
        if line.startswith(prefix + "{"):
            return json.loads(line[len(prefix):])
    raise ValueError(f"no {prefix or 'JSON'} result line in: {lines[-5:]}")


def pair_table(official: list[float], ours: list[float]) -> tuple[str, dict]:
    """Markdown rows, one per pair, and the summary."""
    ratios = [o / u for o, u in zip(official, ours, strict=True)]
    rows = ["| pair | official s | rdt-jax s | speed-up |", "|---:|---:|---:|---:|"]
    rows += [f"| {i + 1} | {o:.3f} | {u:.3f} | {r:.2f}x |" for i, (o, u, r) in
             enumerate(zip(official, ours, ratios, strict=True))]
    summary = {
        "pairs": len(ratios),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "official_median_s": statistics.median(official),
        "ours_median_s": statistics.median(ours),
    }
    return "\n".join(rows), summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-python", required=True, help="python of a venv with the official code's dependencies")
    ap.add_argument("--official-dir", default=os.environ.get("RDT_OFFICIAL_DIR"),
                    help="checkout of thu-ml/RoboticsDiffusionTransformer (default: $RDT_OFFICIAL_DIR)")
    ap.add_argument("--model", default="170m", choices=sorted(PARAMS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--official-dtype", default="bf16autocast", choices=["fp32", "bf16autocast"])
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="none", choices=["none", "full", "save_dots", "save_cond_kv",
                                                        "save_cond_kv_and_tokens"])
    ap.add_argument("--layer-layout", default="auto", choices=["auto", "stacked", "per_layer"])
    ap.add_argument("--runs", type=int, default=8, help="timed steps per program")
    ap.add_argument("--official-huge-pages", action="store_true",
                    help="give the official program glibc's huge-page tunable too (rdt-jax's scripts set it "
                         "for themselves, rdt_jax/huge_pages.py)")
    ap.add_argument("--settle", type=int, default=1,
                    help="untimed steps of the same program before each timed one (0: strict A B alternation)")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds of idle before each timed turn")
    ap.add_argument("--log-dir", default=".", help="where the two programs' stderr logs go")
    ap.add_argument("--json", help="append the result (times, pairs, summary) as one JSON line here")
    a = ap.parse_args()
    if not a.official_dir:
        ap.error("--official-dir (or RDT_OFFICIAL_DIR) is required")
    need = 2 * BYTES_PER_PARAM * PARAMS[a.model]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.9 * total:
        ap.error(f"two resident rdt-{a.model} train states need ~{need / 1e9:.0f} GB of this machine's "
                 f"{total / 1e9:.0f} GB; time bench_official.py and bench_train.py one after the other")

    log_dir = pathlib.Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    ours_case = f"rdt-{a.model}:{a.batch}:{a.compute_dtype}:{a.remat}"
    steps = a.runs * (1 + a.settle)
    official = Child("official", [a.official_python, str(SCRIPTS / "bench_official.py"), "--case", "train",
                                  "--model", a.model, "--dtype", a.official_dtype, "--batch", str(a.batch),
                                  "--warmup", "1", "--runs", str(steps), "--turns", "--out", os.devnull],
                     log_dir / "bench_pair_official.log", env=official_env(dict(os.environ), a.official_dir,
                                                                           a.official_huge_pages))
    ours = Child("rdt-jax", [sys.executable, str(SCRIPTS / "bench_train.py"), "--one", "--turns", "--case", ours_case,
                             "--steps", str(steps), "--layer-layout", a.layer_layout],
                 log_dir / "bench_pair_rdt_jax.log", env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        t_official, t_ours, idle_cpu = interleave(official, ours, a.runs, a.gap, a.settle)
        official_rec = _last_json(official.finish())
        ours_rec = _last_json(ours.finish(), "RESULT ")
    except BaseException:
        for c in (official, ours):
            c.proc.kill()
        raise
    table, summary = pair_table(t_official, t_ours)
    tunables = {c.name: c.env.get("GLIBC_TUNABLES", "-") for c in (official, ours)}
    print(f"GLIBC_TUNABLES: official {tunables['official']}, rdt-jax {tunables['rdt-jax']}")
    print(f"official {a.model} train step, {a.official_dtype}, batch {a.batch}  vs  rdt-jax {ours_case} "
          f"({ours_rec['layer_layout']} layers), alternating A B B A, "
          f"each timed step after {a.settle} untimed one(s) of the same program:\n")
    print(table)
    print(f"\nspeed-up: median {summary['speedup_median']:.2f}x over {summary['pairs']} adjacent pairs "
          f"(min {summary['speedup_min']:.2f}x, max {summary['speedup_max']:.2f}x); "
          f"medians {summary['official_median_s']:.3f} s vs {summary['ours_median_s']:.3f} s")
    print(f"rdt-jax: {ours_rec['flops'] / 1e9:.0f} GFLOP/step, "
          f"{ours_rec['flops'] / summary['ours_median_s'] / 1e9:.0f} GFLOP/s against a "
          f"{ours_rec['matmul_peak_flops'] / 1e9:.0f} GFLOP/s matmul; peak RSS official "
          f"{official_rec['peak_rss_gib']:.2f} GiB, rdt-jax {ours_rec['peak_rss_gib']:.2f} GiB")
    print(f"the waiting process used at most {idle_cpu:.2f} CPU s during one of the other's steps")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"model": a.model, "batch": a.batch, "official_dtype": a.official_dtype,
                                "ours_case": ours_case, "glibc_tunables": tunables, "gap_s": a.gap, "settle": a.settle,
                                "idle_cpu_s": idle_cpu, "official_s": t_official, "ours_s": t_ours, **summary,
                                "official": official_rec, "ours": ours_rec}) + "\n")
    return 0


if __name__ == "__main__":
    from rdt_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any XLA work: glibc reads the tunable at start-up
    sys.exit(main())
