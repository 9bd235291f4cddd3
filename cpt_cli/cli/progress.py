"""Progress of long work on stderr: a rich bar on a terminal, a plain line every few seconds off
one (CI logs, `| tee`), and always a last line with the true totals."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

# Off a terminal, one line per this many seconds: a 3-minute evaluation writes 6 lines, not
# one per batch (about 2,000 batches for 5 MB of text at 4,096 tokens a batch).
PLAIN_EVERY_S = 30.0


class ScoringProgress:
    """`progress(model, tokens scored, tokens in all)` for `evaluate`."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: Progress | None = None
        self.task: object = None
        self.name = ""
        self.start = 0.0
        self.last = 0.0
        self.done = self.total = 0

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if name != self.name:
            self.finish()
            self.name, self.start, self.last = name, now, now
            if self.console.is_terminal:
                self.bar = Progress(TextColumn(f"scoring {name}"), BarColumn(),
                                    TextColumn("{task.completed:,}/{task.total:,} tokens"),
                                    TimeRemainingColumn(), console=self.console,
                                    transient=True)
                self.task = self.bar.add_task(name, total=total)
                self.bar.start()
        self.done, self.total = done, total
        if self.bar is not None:
            self.bar.update(self.task, completed=done)  # type: ignore[arg-type]
        elif now - self.last >= PLAIN_EVERY_S:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            left = (total - done) / max(rate, 1e-9)
            self.console.print(f"scoring {name}: {done:,}/{total:,} tokens, {rate:,.0f} "
                               f"tokens/s, about {left:,.0f} s left", highlight=False)

    def finish(self) -> None:
        """The last line of the model being scored: its true totals."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.name:
            took = time.monotonic() - self.start
            self.console.print(f"scored {self.name}: {self.done:,} tokens in {took:,.1f} s",
                               highlight=False)
            self.name = ""
