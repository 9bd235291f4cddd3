"""What `cpt train` shows while it runs: a rich live progress bar when both stdout and stderr are a
terminal; otherwise (CI logs, `| tee`, a batch job) plain lines with no colour or cursor movement,
one per logged step; nothing on processes other than the main one."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainDisplay:
    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal and sys.stdout.isatty()
        self.total_steps = 0
        self.tokens_per_step = 0
        self.progress: Progress | None = None
        self.task: Any = None
        self._data_seen: dict[str, int] = {}
        self._last_data_print = 0.0

    def status(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]{message}[/dim]" if self.live else message,
                               highlight=False)

    def warning(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def data_progress(self, source: str, documents: int, tokens: int) -> None:
        if not self.enabled:
            return
        self._data_seen[source] = tokens
        now = time.monotonic()
        if now - self._last_data_print > 2.0:
            self._last_data_print = now
            self.console.print(f"tokenizing {source}: {documents:,} documents, {tokens:,} tokens",
                               highlight=False)

    def start_training(self, steps: int, start_step: int, tokens_per_step: int) -> None:
        if not self.enabled:
            return
        self.tokens_per_step, self.total_steps = tokens_per_step, steps
        if start_step:
            self.status(f"resuming at step {start_step} of {steps}")
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=steps, completed=start_step,
                                               info="")
            self.progress.start()

    def train_line(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        info = (f"loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
                f"{event['tokens_per_s']:,.0f} tok/s  {event['tokens']:,} tokens")
        if event.get("mfu") is not None:
            info += f"  MFU {event['mfu']:.1%}"
        if self.progress is not None:
            self.progress.update(self.task, completed=event["step"], info=info)
        else:
            left = max(0, self.total_steps - event["step"]) * self.tokens_per_step / max(
                event["tokens_per_s"], 1e-9)
            print(f"step {event['step']}/{self.total_steps}  {info}  ETA {_duration(left)}",
                  file=sys.stderr, flush=True)

    def checkpoint_saved(self, path: Any) -> None:
        if not self.enabled:
            return
        line = f"checkpoint saved: {path}"
        if self.progress is not None:
            self.progress.console.print(f"[dim]{line}[/dim]", highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def eval_line(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = []
        for name, d in event["domains"].items():
            delta = d.get("delta_bpb")
            parts.append(f"{name} {d['bpb']:.4f}" + (f" ({delta:+.4f})" if delta is not None
                                                     else ""))
        line = f"eval step {event['step']}: bpb " + ", ".join(parts)
        if self.progress is not None:
            self.progress.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
