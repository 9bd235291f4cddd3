"""hostmemory: freed tensor memory stays in the process, so re-touching it takes no page faults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from cpt_cli.hostmemory import user_chose_malloc

glibc_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's; elsewhere keep_freed_memory leaves malloc alone")

# A step's pattern: a working set of blocks under 32 MiB allocated, written, then all freed.
PROGRAM = """
import json, resource, sys, torch
from cpt_cli.hostmemory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
def round_trip():
    blocks = [torch.empty(mib << 20, dtype=torch.uint8).fill_(1) for mib in (3, 5, 7, 9, 11, 13)]
    del blocks
for _ in range(3):
    round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_trip()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults": after - before}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    # One thread, so that the count is the blocks' alone (no OpenMP worker's stack or arena).
    env = {**clean, "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    tuned = _run("tuned")
    assert tuned["applied"] is True
    # The same program with every block handed back to the kernel on free (glibc's initial
    # settings, pinned): each round faults its 48 MiB (12,288 pages of 4 KiB) back in.
    handed_back = _run("stock", MALLOC_MMAP_THRESHOLD_=str(128 << 10), MALLOC_TRIM_THRESHOLD_="0")
    assert handed_back["faults"] > 10 * 12_288 * 9 // 10, handed_back
    # Kept in the process, the blocks are already mapped: here 0 faults in 10 rounds, and no
    # machine seen has faulted more than 3% of them back in (glibc's own moving defaults fault
    # anywhere from 0 to 16,000, so the stock run is no fixed baseline).
    assert tuned["faults"] < handed_back["faults"] // 10, (tuned, handed_back)


@glibc_only
def test_a_user_who_tunes_malloc_is_left_alone():
    result = _run("tuned", MALLOC_ARENA_MAX="2")
    assert result["applied"] is False
    result = _run("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=0")
    assert result["applied"] is False
    # ...and their choice holds: trimming at 0 faults the pages back in every round.
    assert result["faults"] > 10 * 48 * 256 // 2, result


def test_user_choice_detection():
    assert user_chose_malloc({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert user_chose_malloc({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert not user_chose_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "PATH": "/bin"})
