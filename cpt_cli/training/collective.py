"""Steps every process takes together, so that a failure on one process is an error on all of
them (one reduce) instead of the others waiting forever at the next collective."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from cpt_cli.errors import UsageError
from cpt_cli.runs.atomic import WRITE_ERRORS, write_failure
from cpt_cli.runs.lock import LOCK_NAME, RunBusy, busy_message, lock_run_dir

_T = TypeVar("_T")


def on_any_process(accelerator: Any, flag: bool) -> bool:
    """Whether `flag` is true on any process (one reduce; every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device),
                               reduction="sum")
    return bool(total.item() > 0)


def main_first(accelerator: Any, work: Callable[[], _T]) -> _T:
    """`work` on the main process, then on the others (accelerate's `main_process_first`), except
    that a UsageError on the main process is raised on every process, instead of leaving the
    others at the barrier until the main one exits and their connection breaks (a traceback
    from each)."""
    error: UsageError | None = None
    result: Any = None
    if accelerator.is_main_process:
        try:
            result = work()
        except UsageError as err:
            error = err
    failed = on_any_process(accelerator, error is not None)
    if failed:
        raise error or UsageError("the data could not be prepared (see the main process)")
    return result if accelerator.is_main_process else work()


def lock_together(accelerator: Any, run_dir: Path, cleanup: contextlib.ExitStack,
                  unchanged: Callable[[], bool]) -> None:
    """The main process takes the run directory's lock for the rest of the run (see
    runs/lock.py) and checks that the directory still holds what this run planned on; if not,
    every process raises (one reduce), as `write_together` does."""
    problem: str | None = None
    if accelerator.is_main_process:
        try:
            fd = lock_run_dir(run_dir)
            if fd is not None:
                cleanup.callback(os.close, fd)
            if not unchanged():
                problem = (f"{run_dir} changed while this run prepared (another cpt train wrote "
                           "it); run the same command again")
        except RunBusy as busy:
            problem = busy_message(run_dir, busy.holder)
        except UsageError as err:
            problem = f"{run_dir} changed while this run prepared: {err}"
        except OSError as err:
            problem = write_failure("the run directory's lock", run_dir / LOCK_NAME, err)
    failed = on_any_process(accelerator, problem is not None)
    if failed:
        raise UsageError(problem or "the run directory is in use (see the main process)")


def write_together(accelerator: Any, what: str, path: Path, write: Callable[[], _T],
                   cleanup: Path | None = None) -> _T:
    """Run `write` on every process; if it fails on any, all of them raise the same UsageError
    (one reduce), instead of the others waiting forever at the next collective."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = write()
    except WRITE_ERRORS as err:
        error = err
    failed = on_any_process(accelerator, error is not None)
    if failed:
        if cleanup is not None and accelerator.is_main_process:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise UsageError(write_failure(what, path, error)) from None
    return result
