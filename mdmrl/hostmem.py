"""Host-memory allocator settings for CPU runs.

glibc's malloc serves every block above its mmap threshold (128 KiB at start, raised
up to 32 MiB as blocks are freed) with a fresh ``mmap`` and returns it at ``free``;
it also gives the top of the heap back to the system once 128 KiB of it is free. A
forward pass allocates and frees many activation tensors of that size, so each one
starts on pages the kernel must fault in again. ``benchmarks/allocator.py`` measures
it side by side: on the 2-core benchmark machine a 16-step, batch-8 rollout of the
shapes MDM took about 47 000 minor page faults (tiny aMUSEd: 89 000), and rollouts
were 1.26x (1.07x) slower than with the settings below (docs/performance.md).

:func:`keep_freed_memory` sets the mmap threshold to 32 MiB and the trim threshold
to 1 GiB, so freed blocks stay in the process and are reused: the process keeps its
peak heap instead of shrinking between steps. It does nothing off glibc, when the
user set any ``MALLOC_*_`` tuning variable of glibc, or when
``MDMRL_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc's largest allowed mmap threshold
#: on 64-bit systems).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap kept before it is returned to the system.
TRIM_THRESHOLD = 1024 * 1024 * 1024
#: Environment variable that turns the settings off ("0").
ENV = "MDMRL_KEEP_FREED_MEMORY"
#: glibc's own tuning variables; when any is set the user's choice stands.
GLIBC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


#: What the last :func:`keep_freed_memory` call did in this process (None: not called).
_last: str | None = None


def state() -> str | None:
    """What :func:`keep_freed_memory` did in this process, or None when it was not
    called (recorded in a run's environment.json)."""
    return _last


def keep_freed_memory(environ: dict[str, str] | None = None) -> str:
    """Apply the settings of the module docstring (early in a process, before large
    allocations; calling it again changes nothing). Returns what was
    done: "set", "disabled" (MDMRL_KEEP_FREED_MEMORY=0), "user" (a glibc tuning
    variable is set), "unsupported" (no glibc ``mallopt``) or "failed" (mallopt
    refused a value)."""
    global _last
    _last = _apply(os.environ if environ is None else environ)
    return _last


def _apply(env) -> str:
    if env.get(ENV, "1").strip() == "0":
        return "disabled"
    if any(k in env for k in GLIBC_VARS):
        return "user"
    mallopt = _mallopt()
    if mallopt is None:
        return "unsupported"
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "set" if ok else "failed"


def _mallopt():
    """glibc's ``mallopt(int, int) -> int``, or None where there is none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl has no mallopt tuning)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
