"""rdt_jax.huge_pages: glibc's huge-page tunable, set by re-executing the entry point once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from rdt_jax import huge_pages

# Prints its PID, tunables and arguments at start, then asks for the re-exec and reports back if it
# returned; then allocates and touches 64 MiB through malloc and prints the page faults taken.
PROBE = textwrap.dedent("""
    import os, resource, sys
    tunables, unbuffered = os.environ.get("GLIBC_TUNABLES", ""), int("-u" in sys.orig_argv)
    print("start", os.getpid(), tunables, sys.argv[1:], unbuffered, flush=True)
    from rdt_jax.huge_pages import reexec_with_huge_pages
    reexec_with_huge_pages()
    print("returned", flush=True)
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)  # plain malloc, as XLA:CPU's buffers (numpy asks for huge pages itself)
    ctypes.memset(block, 1, 64 << 20)
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
""")


def _run_probe(tmp_path, **env) -> list[tuple[str, str]]:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
    out = subprocess.run([sys.executable, "-u", str(probe), "arg one", "--two"], env={**base, **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [(*line.split(" ", 1), "")[:2] for line in out.splitlines()]


def test_tunables_are_added_once_and_a_user_setting_wins():
    assert huge_pages.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert (huge_pages.tunables_with_huge_pages("glibc.malloc.arena_max=2")
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert huge_pages.tunables_with_huge_pages("glibc.malloc.hugetlb=0") is None
    assert huge_pages.tunables_with_huge_pages("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1") is None


def test_thp_mode_reads_the_selected_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(f) == "madvise"
    f.write_text("always madvise [never]\n")
    assert huge_pages.thp_mode(f) == "never"
    assert huge_pages.thp_mode(tmp_path / "missing") is None


def test_reexec_keeps_pid_and_arguments_and_happens_once(tmp_path):
    lines = _run_probe(tmp_path)
    starts = [rest for kind, rest in lines if kind == "start"]
    if not huge_pages.huge_pages_available():
        assert len(starts) == 1 and any(kind == "returned" for kind, _ in lines)
        return
    assert len(starts) == 2, lines
    pid0, tun0, _ = starts[0].split(" ", 2)
    pid1, tun1, args = starts[1].split(" ", 2)
    assert pid0 == pid1 and tun0 == ""  # the same process, first without the tunable
    assert tun1 == "glibc.malloc.hugetlb=1"
    assert args == "['arg one', '--two'] 1"  # arguments and the interpreter's -u survive the exec


def test_opt_out_and_existing_setting_leave_the_process_alone(tmp_path):
    for env in ({huge_pages.OPT_OUT: "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}):
        starts = [rest for kind, rest in _run_probe(tmp_path, **env) if kind == "start"]
        assert len(starts) == 1, env


@pytest.mark.skipif(not huge_pages.huge_pages_available(), reason="needs glibc >= 2.35 and THP not 'never'")
def test_the_tunable_cuts_page_faults_of_large_blocks(tmp_path):
    faults = {}
    for setting in ("0", "1"):
        lines = _run_probe(tmp_path, GLIBC_TUNABLES=f"glibc.malloc.hugetlb={setting}")
        faults[setting] = int(next(rest for kind, rest in lines if kind == "faults").split()[0])
    # 64 MiB in 4 KiB pages is 16384 faults; in 2 MiB pages 32 (a few hundred if the kernel must split).
    assert faults["0"] > 15000
    assert faults["1"] < faults["0"] / 8, faults
