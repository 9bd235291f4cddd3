"""Stopping on a signal: before training starts at once, once it runs after the current step
with a checkpoint (training/loop.py)."""

from __future__ import annotations

import os
import signal
from typing import Any

from cpt_cli.process import finish_worker
from cpt_cli.runs.lock import LAUNCHER_GONE


class StopNow(BaseException):
    """A signal arrived before training started."""


class Signals:
    """SIGTERM and SIGINT (a preemption notice, Ctrl-C), and SIGUSR1: what a worker of
    `accelerate launch` gets when its launcher dies (see runs/lock.py), and what a scheduler such
    as Slurm (`--signal`) can send ahead of a time limit. Linux may send the parent-death signal
    more than once (once per exiting thread of the parent), so a repeated SIGUSR1 is ignored.

    Before training starts the first signal stops at once (nothing trained, nothing to save).
    Once `defer()` is called, the first signal is only recorded: the loop finishes the current
    step, writes a checkpoint and raises TrainingStopped with exit status 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT, as a shell reports a process that signal ended). A second
    signal exits at once with that status: a checkpoint being written is still under its
    temporary name, so every complete checkpoint stays intact.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.exit_code = 128 + signal.SIGTERM
        self.deferred = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for sig in (signal.SIGTERM, signal.SIGINT, LAUNCHER_GONE):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a notebook, say): leave signals alone
                pass
        return self

    def defer(self) -> None:
        self.deferred = True

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == LAUNCHER_GONE and self.received is not None:
            return
        if self.received is not None:
            # os.write and os._exit only: nothing here may wait on a lock the interrupted
            # code holds (a print could).
            os.write(2, f"cpt: second signal ({name}): exiting now; complete checkpoints are "
                        "intact, resume with --resume auto\n".encode())
            os._exit(finish_worker(128 + signum))
        self.received, self.exit_code = name, 128 + signum
        if not self.deferred:
            # A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
            # (reading data, say) mistakes it for a failure; train() turns it into a stop.
            raise StopNow(name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
