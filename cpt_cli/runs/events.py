"""metrics.jsonl: one JSON object per log or eval event, written by the training loop and read
by `cpt eval` and its plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cpt_cli.errors import UsageError
from cpt_cli.runs.atomic import write_failure
from cpt_cli.runs.lineage import json_safe


class MetricsLog:
    """metrics.jsonl, one JSON object per event, flushed at once (a kill loses nothing)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # Events after the step we resume from (a checkpoint's, or 0 when a run killed before
            # its first checkpoint starts over) will happen again: drop them, and a last line cut
            # short by a kill. Rewritten atomically, so a kill now loses nothing.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict) and event.get("step", 0) <= resume_step:
                    kept.append(line)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, path)
        self.fh = open(path, "a") if enabled else None  # noqa: SIM115 - closed in close()

    def write(self, event: dict[str, Any]) -> None:
        if self.fh is not None:
            try:
                self.fh.write(json.dumps(json_safe(event)) + "\n")
                self.fh.flush()
            except OSError as err:
                raise UsageError(write_failure("metrics.jsonl", self.path, err)) from None

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl, skipping a line that is not a JSON object (the last one
    of a run killed mid-write; the next `--resume auto` removes it)."""
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
