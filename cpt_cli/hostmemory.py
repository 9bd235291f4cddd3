"""Host memory: keep freed tensor memory in the process instead of handing it back to the OS.

PyTorch on CPU has no caching allocator: every activation, gradient and logits tensor of a step
is a fresh `malloc` and a `free`. glibc's defaults give blocks above 128 KiB (rising with use, to
at most 32 MiB) back to the kernel and trim the heap's top once 2x that is free, so the next step
takes a page fault, and a page zeroed by the kernel, for every 4 KiB it touches again. On the
quickstart model (micro batch 16 x 256 tokens, 2 cores, 2 threads) that is 10,000 to 30,000
faults and 31-37 ms of kernel time per optimizer step; with the two settings below, under 400
faults and 9-12 ms (measured with getrusage over 15 steps): about 2% of a 0.55 s step's wall
time: small, and free.
This is what `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` (or an allocator such as jemalloc
or tcmalloc, which Intel's PyTorch CPU guides recommend) do from outside the process; cpt applies
it from inside, through glibc's public `mallopt`, so `cpt train` and `cpt eval` get it without a
launcher. The cost: a process keeps its peak heap until it exits, as CUDA's caching allocator
keeps its peak on a GPU.

It changes malloc for the whole process, once; a user who sets any glibc malloc variable
(`MALLOC_*` or `glibc.malloc` in `GLIBC_TUNABLES`) has chosen for themselves and is left alone,
and so is any platform other than Linux with glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): blocks up to 32 MiB
# (the quickstart's logits are 16 MiB per micro batch) come from the heap and are reused.
MMAP_THRESHOLD = 32 << 20
# Never trim the heap's top during training (a step frees and reallocates its whole working set):
# the largest value mallopt's C int takes, 2 GiB.
TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None


def user_chose_malloc(environ: Mapping[str, str]) -> bool:
    """True when the environment already tunes glibc's malloc."""
    return any(k.startswith("MALLOC_") for k in environ) or \
        "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc's malloc to reuse freed blocks up to 32 MiB and never trim the heap, once per
    process. Returns whether the settings are in effect (False off glibc or when the user tunes
    malloc through the environment)."""
    global _applied
    if _applied is not None:
        return _applied
    environ = os.environ if environ is None else environ
    _applied = False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or \
            user_chose_malloc(environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; setting the mmap threshold also stops glibc moving it.
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
