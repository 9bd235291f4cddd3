"""One training per run directory: an advisory lock on `RUN_DIR/.lock`, and workers that stop
with their launcher.

Two `cpt train` runs writing one run directory (a resume started while the first run still
trains, say) would rotate, rewrite and resume each other's checkpoints. The main process holds
an exclusive `flock` on `.lock` for as long as it trains; the kernel drops it when the process
exits, however it exits, so a killed run never leaves a stale lock behind. The file holds the
holder's process id, for the message a second run prints.

Under `accelerate launch`, torch's elastic agent starts each worker in a session of its own: a
SIGKILL to the launcher's process group would leave the workers training on, unsupervised.
`stop_with_parent` asks Linux (`PR_SET_PDEATHSIG`) to signal a process when its parent dies:
SIGTERM for the launcher (torch's agent then stops its workers), SIGUSR1 (`LAUNCHER_GONE`) for a
worker, which the trainer handles as a preemption: finish the step, write a checkpoint, exit.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import sys
from pathlib import Path

LOCK_NAME = ".lock"
# A worker's parent-death signal: not SIGTERM, since Linux may send it more than once (a second
# SIGTERM means "exit now"); the trainer ignores a repeated one.
LAUNCHER_GONE = signal.SIGUSR1
_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
_HAS_FLOCK = importlib.util.find_spec("fcntl") is not None  # POSIX; elsewhere no lock


class RunBusy(Exception):
    """Another process holds the run directory's lock."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def _lock(fd: int) -> None:
    """An exclusive flock on `fd`, or close it and raise RunBusy with the pid the file holds."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunBusy(holder) from None


def lock_run_dir(run_dir: Path) -> int | None:
    """Take the run directory's lock (creating the folder), or raise RunBusy naming the holder.
    Returns the descriptor to close when training ends (None where flock does not exist)."""
    if not _HAS_FLOCK:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    _lock(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def busy_message(run_dir: Path, holder: str) -> str:
    return (f"{run_dir} is being trained by another cpt train (process {holder}); wait for it "
            "to end or stop it, then run again (--resume auto continues it)")


def check_free(run_dir: Path) -> None:
    """Raise RunBusy if a training holds the run directory's lock; create nothing."""
    path = run_dir / LOCK_NAME
    if _HAS_FLOCK and path.is_file():
        fd = os.open(path, os.O_RDONLY)
        _lock(fd)
        os.close(fd)


def stop_with_parent(signum: int, parent_pid: int | None = None) -> None:
    """Have Linux send this process `signum` when its parent exits (Linux only). With
    `parent_pid` (the parent as it was at fork), a parent already gone sends it at once."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
