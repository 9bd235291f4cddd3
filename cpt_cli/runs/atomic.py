"""Atomic writes in the run directory: write to a temporary folder, fsync, publish by rename,
rotate old checkpoints, remove what a killed run left behind.

At every moment a `step-N` folder (or `final/`) is either absent, the old complete folder or the
new complete one: `.tmp-` folders are being written, `.old-` ones are being replaced, `.del-` ones
are being deleted, and `remove_debris` settles all three when the next run starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from cpt_cli.runs.layout import CHECKPOINTS, complete_checkpoints

# What a failed write raises: OSError from Python's own files, RuntimeError from torch.save (a
# full disk reads "[enforce fail at inline_container.cc] . unexpected pos"), SafetensorError
# ("I/O error: No space left on device") from safetensors.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)


def write_failure(what: str, path: Path, error: BaseException | None) -> str:
    """The message for a failed write: the reason, the free space, whether the folder is
    writable, and the newest checkpoint that is still intact."""
    if error is None:
        reason = "the write failed on another process (see its log)"
    else:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        reason = f"{type(error).__name__}: {first}"
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(existing).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    writable = os.access(existing, os.W_OK)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    last = complete_checkpoints(run_dir)
    newest = f"newest: {last[-1]}" if last else "none was written yet"
    return (f"could not write {what} ({path}): {reason}. The disk holding it has {free}"
            f"{'' if writable else ' and the folder is not writable'}. Earlier checkpoints are "
            f"intact ({newest}); free space or fix permissions, then run the same command with "
            "--resume auto.")


def fsync_tree(folder: Path) -> None:
    """Flush a finished checkpoint's files to disk before its rename publishes it: after a
    power loss the rename could otherwise reach the disk before the data (a SIGKILL alone
    loses nothing, the page cache survives the process)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish(tmp: Path, target: Path) -> None:
    """Rename a complete folder into place. A folder already there (a run resumed from an
    older checkpoint writes the same step again) is first renamed out of the way: at every
    moment `target` is either the old complete folder, absent, or the new complete one."""
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def discard(folder: Path) -> None:
    """Delete a checkpoint: renamed to a hidden name first, so that a kill halfway through the
    deletion never leaves a `step-N` folder with some of its files missing."""
    doomed = folder.with_name(f".del-{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def remove_debris(run_dir: Path) -> None:
    """Remove what a killed run left half-written or half-deleted (hidden `.tmp-` and `.del-`
    folders); complete checkpoints are never touched. An `.old-X` whose replacement never
    arrived (killed between the two renames of `publish`) is complete: it becomes `X` again."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if not path.is_dir():
                continue
            if path.name.startswith(".old-") and not (folder / path.name[5:]).exists():
                os.replace(path, folder / path.name[5:])
            elif path.name.startswith((".tmp-", ".old-", ".del-")):
                shutil.rmtree(path, ignore_errors=True)


def rotate(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints under `root`, besides those marked to keep forever
    (`"keep": true` in their trainer_state.json: a wsd run's pre-decay checkpoint)."""
    ckpts = complete_checkpoints(root.parent)
    kept_forever = {p for p in ckpts if json.loads(
        (p / "trainer_state.json").read_text()).get("keep")}
    rotating = [p for p in ckpts if p not in kept_forever]
    for old in rotating[:-keep]:
        discard(old)
