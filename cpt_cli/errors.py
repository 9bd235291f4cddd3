"""Errors that reach the user as a message, never as a traceback.

Every mistake a user can make (recipe, data, path, flag) raises `UsageError`; the CLI prints its
message and exits with status 2. Anything else is a bug in cpt and keeps its traceback.
"""

from __future__ import annotations


def offline_note(name: str, what: str = "models") -> str:
    """" (HF_HUB_OFFLINE is set: ...)" when a Hub name failed to load because of it, else ""."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1" and not os.path.exists(name):
        return f" (HF_HUB_OFFLINE is set: only local or cached {what} load)"
    return ""


class UsageError(Exception):
    """A problem with what the user gave cpt: printed as-is, exit status 2."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            lines = [message] + [f"  - {p}" for p in self.problems]
            message = "\n".join(lines)
        super().__init__(message)


class RecipeError(UsageError):
    """The recipe failed validation; `problems` lists every mistake found, each naming its key."""


class DataError(UsageError):
    """A data source could not be read: names the file (and line) and how to fix it."""


class TrainingStopped(Exception):
    """Training stopped on purpose (forgetting budget, preemption); not an error of the user."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
