"""mdmrl.hostmem: glibc malloc settings applied by the CLI, and when they are not."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from mdmrl import hostmem


def test_user_settings_win():
    assert hostmem.keep_freed_memory({"MDMRL_KEEP_FREED_MEMORY": "0"}) == "disabled"
    for var in hostmem.GLIBC_VARS:
        assert hostmem.keep_freed_memory({var: "1"}) == "user"


def test_no_mallopt_is_reported(monkeypatch):
    monkeypatch.setattr(hostmem, "_mallopt", lambda: None)
    assert hostmem.keep_freed_memory({}) == "unsupported"


def test_refused_value_is_reported(monkeypatch):
    monkeypatch.setattr(hostmem, "_mallopt", lambda: lambda param, value: 0)
    assert hostmem.keep_freed_memory({}) == "failed"


def test_passes_the_thresholds_to_mallopt(monkeypatch):
    calls = []
    monkeypatch.setattr(hostmem, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    assert hostmem.keep_freed_memory({}) == "set"
    assert calls == [
        (hostmem.M_MMAP_THRESHOLD, hostmem.MMAP_THRESHOLD),
        (hostmem.M_TRIM_THRESHOLD, hostmem.TRIM_THRESHOLD),
    ]


_PROBE = """
import ctypes, resource, sys
from mdmrl.hostmem import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size, count = 512 << 10, 16
faults = []
for _ in range(20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(count)]
    for p in blocks:
        libc.memset(p, 1, size)
    for p in reversed(blocks):
        libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[5:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_freed_blocks_are_reused_without_page_faults():
    """Sixteen 512 KiB blocks written, freed and allocated again, as a forward's
    activations are: with glibc's defaults the freed top of the heap goes back to the
    system and its pages are faulted in anew each round; once the settings are
    applied the blocks are reused without a fault."""
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc")

    def probe(flag: str) -> tuple[str, int]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        env["MDMRL_KEEP_FREED_MEMORY"] = flag
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
        )
        state, faults = out.stdout.split()
        return state, int(faults)

    state, kept = probe("1")
    assert state == "set"
    assert kept < 50  # of the 15 rounds x 2048 pages written
    state, default = probe("0")
    assert state == "disabled"
    assert default > 15 * 1000


def test_cli_applies_the_settings(monkeypatch, tmp_path, capsys):
    from mdmrl import cli

    seen = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: seen.append(True) or "set")
    assert cli.main(["run", str(tmp_path / "missing.toml")]) != 0
    assert seen == [True]
    assert "missing.toml" in capsys.readouterr().err


def test_the_run_environment_records_the_setting(monkeypatch):
    from mdmrl import rundir

    monkeypatch.setattr(hostmem, "_last", None)
    assert rundir.environment()["keep_freed_memory"] is None
    hostmem.keep_freed_memory({"MDMRL_KEEP_FREED_MEMORY": "0"})
    assert rundir.environment()["keep_freed_memory"] == "disabled"
