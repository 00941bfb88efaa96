"""Transparent huge pages for the C library's large blocks (glibc's ``glibc.malloc.hugetlb`` tunable).

XLA:CPU takes each call's temporaries as one ``malloc`` block, and glibc maps a block that large
afresh and unmaps it when freed, so every call faults in and zeroes all of it again, 4 KiB at a time:
1.5 M page faults (6 GB) per rdt-1b train step, 0.4 M per rdt-170m step. Under a hypervisor each fault
is dear. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35) glibc asks for transparent
huge pages on its mappings (``MADV_HUGEPAGE``): 2 MiB pages, 500x fewer faults, and fewer TLB misses
over the 20 GB train state. rdt-1b's train step went from 24.4 to 18.8 s at the same peak RSS
(BENCHMARKS.md). Results do not change: only the page size of the same memory does.

glibc reads its tunables once, when the process starts, so the command-line entry points call
:func:`reexec_with_huge_pages` first: it runs the same command again in place (``os.execv``, same
PID) with the tunable added. It does nothing when the tunable is already set (either value: the
user's choice stands), when glibc or the kernel's huge-page mode cannot use it, or when
``RDT_JAX_HUGE_PAGES=0``. Importing rdt_jax never re-executes anything.
"""

from __future__ import annotations

import os
import pathlib
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "RDT_JAX_HUGE_PAGES"  # "0": leave the process as it is
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None for another C library."""
    try:
        _, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, OSError, ValueError, TypeError):
        return None


def thp_mode(path: pathlib.Path = _THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``); None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    selected = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return selected[0] if selected else None


def huge_pages_available() -> bool:
    """Whether the tunable would take effect here: glibc >= 2.35 and THP not ``never``."""
    version = glibc_version()
    return version is not None and version >= (2, 35) and thp_mode() in ("always", "madvise")


def tunables_with_huge_pages(current: str) -> str | None:
    """``GLIBC_TUNABLES`` with the tunable added; None when ``current`` already sets it."""
    entries = [e for e in current.split(":") if e]
    if any(e.split("=", 1)[0] == TUNABLE for e in entries):
        return None
    return ":".join([*entries, f"{TUNABLE}=1"])


def reexec_with_huge_pages() -> None:
    """Re-executes this command once with glibc's huge-page tunable set (see the module docstring);
    returns without doing anything when it is set already, unavailable, or opted out of."""
    if os.environ.get(OPT_OUT, "1") == "0" or not huge_pages_available():
        return
    tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv keeps the interpreter's own options (-m, -X, -u, ...), sys.argv would drop them.
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
