"""scripts/bench_pair.py + bench_turns.py: two benchmark processes timed strictly in alternation."""

import itertools
import json
import pathlib
import sys
import textwrap

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from bench_pair import Child, ChildFailed, interleave, official_env, pair_table  # noqa: E402

# A stand-in benchmark: sleeps through its setup and each phase, and records when each phase ran.
FAKE = textwrap.dedent(f"""
    import json, sys, time
    sys.path.insert(0, {str(SCRIPTS)!r})
    from bench_turns import Turns
    setup_s, run_s, runs = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    record, skip_warmup = sys.argv[4], sys.argv[5] == "1"
    time.sleep(setup_s)
    events = [["setup", 0.0, time.time()]]
    turns = Turns(True)
    def phase(label, seconds):
        with turns.turn(label):
            t0 = time.time(); time.sleep(seconds); events.append([label, t0, time.time()])
    if not skip_warmup:
        phase("warmup", 0.01)
    for _ in range(runs):
        phase("run", run_s)
    phase("extra", 0.01)
    json.dump(events, open(record, "w"))
    print("RESULT " + json.dumps({{"runs": runs}}))
""")


def _child(tmp_path, name, setup_s, run_s, runs, skip_warmup=False):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    record = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(script), str(setup_s), str(run_s), str(runs), str(record), "1" if skip_warmup else "0"]
    return Child(name, cmd, tmp_path / f"{name}.log"), record


def test_turns_alternate_and_never_overlap(tmp_path):
    a, rec_a = _child(tmp_path, "a", 0.0, 0.02, 4)
    b, rec_b = _child(tmp_path, "b", 0.3, 0.05, 4)  # b sets up slowly: a must not start before it is ready
    t_a, t_b, idle_cpu = interleave(a, b, 4)
    assert a.finish() == ["RESULT {\"runs\": 4}"] and b.finish() == ["RESULT {\"runs\": 4}"]
    assert len(t_a) == len(t_b) == 4 and 0.0 <= idle_cpu < 0.05  # a sleeping child burns no CPU
    assert all(0.02 <= t < 0.5 for t in t_a) and all(0.05 <= t < 0.5 for t in t_b)
    ev_a, ev_b = json.loads(rec_a.read_text()), json.loads(rec_b.read_text())
    assert min(s for n, s, _ in ev_a if n != "setup") >= ev_b[0][2]  # b's setup ended before a's first turn
    phases = sorted([(s, e, "a", n) for n, s, e in ev_a[1:]] + [(s, e, "b", n) for n, s, e in ev_b[1:]])
    for (_, end, *_), (start, *_) in itertools.pairwise(phases):
        assert end <= start  # one process at a time
    runs = [who for _, _, who, n in phases if n == "run"]
    assert runs == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_settle_turns_precede_each_timed_one(tmp_path):
    a, rec_a = _child(tmp_path, "a", 0.0, 0.01, 6)
    b, rec_b = _child(tmp_path, "b", 0.0, 0.01, 6)
    t_a, t_b, _ = interleave(a, b, 3, settle=1)
    a.finish(), b.finish()
    assert len(t_a) == len(t_b) == 3
    phases = sorted([(s, "a") for n, s, _ in json.loads(rec_a.read_text())[1:] if n == "run"]
                    + [(s, "b") for n, s, _ in json.loads(rec_b.read_text())[1:] if n == "run"])
    assert [who for _, who in phases] == list("aabbbbaaaabb")


def test_protocol_and_crash_errors_name_the_process(tmp_path):
    a, _ = _child(tmp_path, "a", 0.0, 0.01, 2, skip_warmup=True)
    b, _ = _child(tmp_path, "b", 0.0, 0.01, 2)
    with pytest.raises(ChildFailed, match="a: ended or skipped its warm-up turn"):
        interleave(a, b, 2)
    b.proc.kill()
    crash = Child("c", [sys.executable, "-c", "import sys; sys.exit('no official checkout')"], tmp_path / "c.log")
    with pytest.raises(ChildFailed, match=r"(?s)c: ended or skipped.*no official checkout"):
        interleave(crash, b, 1)


def test_pair_table_reports_adjacent_ratios():
    table, summary = pair_table([3.0, 4.0, 6.0], [2.0, 2.0, 2.0])
    assert "| 2 | 4.000 | 2.000 | 2.00x |" in table
    assert summary["speedup_median"] == 2.0 and summary["speedup_min"] == 1.5 and summary["speedup_max"] == 3.0
    with pytest.raises(ValueError):
        pair_table([1.0], [1.0, 2.0])


def test_official_env_has_the_huge_page_tunable_only_when_asked():
    base = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
    assert official_env(base, "/off", False) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h",
                                                 "RDT_OFFICIAL_DIR": "/off"}
    assert official_env({"HOME": "/h"}, "/off", True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in official_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "/off", False)
