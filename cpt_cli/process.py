"""This process's place in a launched run: the launcher's environment, the worker's rank, and how
a worker hands back its exit status and leaves. A leaf: it imports nothing of cpt's, so the
trainer can use it without importing the launcher (launch.py imports the trainer's checks)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

LAUNCHED_ENV = "CPT_LAUNCHED"
# A folder cpt's parent process shares with the workers it launched: each worker writes its
# process id there (the parent passes Ctrl-C and SIGTERM to them directly) and a mark when it has
# finished, and the main worker its exit status, for the parent to return.
CONTROL_ENV = "CPT_LAUNCH_CONTROL"


def already_launched() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def worker_rank() -> str:
    """This process's rank in a launched run, from the launcher's environment ("0" alone)."""
    return os.environ.get("RANK") or "0"


def register_worker() -> None:
    """Under cpt's launcher: write this worker's process id for the parent (see relaunch)."""
    control = os.environ.get(CONTROL_ENV)
    if control and "LOCAL_RANK" in os.environ:
        with contextlib.suppress(OSError):
            Path(control, f"worker-{worker_rank()}.pid").write_text(str(os.getpid()))


def finish_worker(code: int) -> int:
    """The exit status for a worker that ends on purpose: under cpt's launcher the main worker
    leaves `code` for the parent and every worker exits 0, so that torch's launcher reports no
    failure (a traceback per process); elsewhere `code` itself."""
    control = os.environ.get(CONTROL_ENV)
    if not control or "LOCAL_RANK" not in os.environ:
        return code
    rank = worker_rank()
    if rank == "0":
        try:
            Path(control, "status").write_text(str(code))
        except OSError:
            return code
    with contextlib.suppress(OSError):
        Path(control, f"worker-{rank}.done").touch()
    return 0


def end_worker(code: int) -> None:
    """A process of a multi-process run exits here, with `code`, once its part is over (its
    status handed over, its files written), skipping the interpreter's teardown: there, torch's
    gloo threads abort now and then ("terminate called without an active exception", SIGABRT)
    even after the process group is destroyed, and the launcher then reports a finished run as
    failed (about one 2-process run in 30 without destroying the group, one in 140 with it, on
    2 CPU cores). Trackers are finished and the process group destroyed before
    (training/backend.end)."""
    world = os.environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) <= 1:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
