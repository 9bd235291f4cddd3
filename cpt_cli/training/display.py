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
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Off a terminal, one tokenizing line per this many seconds per run: a log gets a line a few
# times a minute on long work, where a line per batch (4M characters) would be one a second.
DATA_LINE_EVERY_S = 10.0
# A rate over less time than this is noise (one batch seen at once): it is left out.
MIN_RATE_SECONDS = 0.5


class TrainDisplay:
    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal and sys.stdout.isatty()
        self.total_steps = 0
        self.tokens_per_step = 0
        self.progress: Progress | None = None
        self.task: Any = None
        self._data_bar: Progress | None = None
        self._data_tasks: dict[str, Any] = {}
        self._data_started: dict[str, float] = {}
        self._last_data_print = float("-inf")  # the first update prints

    def status(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]{message}[/dim]" if self.live else message,
                               highlight=False)

    def warning(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def data_progress(self, update: Any) -> None:
        """A `SourceProgress` of tokenizing: a bar per source on a terminal (bytes read of the
        local files, documents, tokens, rate, time left), a plain line every
        DATA_LINE_EVERY_S seconds off one, and always a last line with the true totals and
        one naming the records skipped."""
        if not self.enabled:
            return
        now = time.monotonic()
        started = self._data_started.setdefault(update.source, now)
        if update.done:
            self._data_finished(update, now - started)
            return
        if self.live:
            self._data_bar_update(update, now - started)
        elif now - self._last_data_print >= DATA_LINE_EVERY_S:
            self._last_data_print = now
            self.console.print(f"tokenizing {update.source}: "
                               f"{_data_figures(update, now - started)}", highlight=False)

    def _data_bar_update(self, update: Any, elapsed: float) -> None:
        if self._data_bar is None:
            self._data_bar = Progress(
                TextColumn("tokenizing [bold]{task.description}"), BarColumn(),
                DownloadColumn(), TextColumn("{task.fields[figures]}"), TimeRemainingColumn(),
                console=self.console, transient=True)
            self._data_bar.start()
        if update.source not in self._data_tasks:
            self._data_tasks[update.source] = self._data_bar.add_task(
                update.source, total=update.bytes_total or None, figures="")
        self._data_bar.update(self._data_tasks[update.source], completed=update.bytes_read,
                              figures=f"{update.documents:,} documents  {update.tokens:,} "
                                      f"tokens{_rate(update.tokens, elapsed, '  ')}")

    def _data_finished(self, update: Any, elapsed: float) -> None:
        if self._data_bar is not None and update.source in self._data_tasks:
            self._data_bar.remove_task(self._data_tasks.pop(update.source))
            if not self._data_tasks:
                self._data_bar.stop()
                self._data_bar = None
        if update.cached:
            line = (f"{update.source}: {update.documents:,} documents, {update.tokens:,} tokens "
                    "(tokenized before, from the cache)")
        else:
            line = (f"tokenized {update.source}: {update.documents:,} documents, "
                    f"{update.tokens:,} tokens"
                    + (f" in {elapsed:,.1f} s ({_rate(update.tokens, elapsed, '')})"
                       if elapsed >= MIN_RATE_SECONDS else ""))
        self.console.print(line, highlight=False)
        skipped = update.skipped_line()
        if skipped:
            self.console.print(f"[yellow]{skipped}[/yellow]" if self.live else skipped,
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
                TextColumn("{task.fields[info]}"), TextColumn("{task.fields[replay]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                transient=False)
            self.task = self.progress.add_task("train", total=steps, completed=start_step,
                                               info="", replay="")
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

    def replay_line(self, event: dict[str, Any]) -> None:
        """A `replay` decision (ratio: auto): the share from this step and the worst retained
        domain against the budget; on a terminal the bar keeps both until the next one."""
        if not self.enabled:
            return
        share = f"replay {event['share']:.1%}"
        worst = event.get("worst_forgetting_bpb")
        against = "no retained figure" if worst is None else (
            f"worst {event['worst_domain']} {worst:+.4f} of budget {event['budget_bpb']:.4f} bpb")
        held = f" ({event['limited']} limit)" if event.get("limited") else ""
        if self.progress is not None:
            self.progress.update(self.task, replay=f"{share}  {against}")
        line = (f"replay step {event['step']}: share {event.get('previous_share', 0):.1%} -> "
                f"{event['share']:.1%}{held}; {against}")
        if self.progress is not None:
            self.progress.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._data_bar is not None:
            self._data_bar.stop()
            self._data_bar = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _rate(tokens: int, elapsed: float, sep: str = ", ") -> str:
    """`sep` + tokens per second, or nothing over too short a time: a source seen only once
    (tokenized in one batch) has an elapsed time near 0, and its rate would read 1e14."""
    return f"{sep}{tokens / elapsed:,.0f} tokens/s" if elapsed >= MIN_RATE_SECONDS else ""


def _data_figures(update: Any, elapsed: float) -> str:
    text = f"{update.documents:,} documents, {update.tokens:,} tokens" \
        f"{_rate(update.tokens, elapsed)}"
    if update.bytes_total:
        share = update.bytes_read / update.bytes_total
        left = elapsed * (1 - share) / share if share else None
        text = (f"{share:.0%} of {_size(update.bytes_total)} read, {text}"
                + (f", about {_duration(left)} left" if left is not None else ""))
    return text


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes} bytes"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
