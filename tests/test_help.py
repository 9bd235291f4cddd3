"""`cpt --help` and every command's help read as whole sentences at 80 columns."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from cpt_cli import __version__, docgen
from cpt_cli.cli import app

WIDTH = 80
PAGES = [["--help"], ["mix", "--help"], ["data", "--help"],
         *([*name.split()[1:], "--help"] for name, _ in docgen.cli_commands())]
# A line may end a clause here; anything else ends mid-sentence if the next word would fit.
CLAUSE_END = (".", ":", ";", ")", "]", ",")


def render(args: list[str]) -> str:
    result = CliRunner().invoke(app, args, env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH)
    assert result.exit_code == 0, result.output
    return result.output


def broken_lines(page: str) -> list[str]:
    """Lines that stop short although the next line's first word would have fit after them:
    a hard line break that reached the layout, not a wrap."""
    lines = page.splitlines()
    found = []
    for line, after in zip(lines, lines[1:], strict=False):
        match = re.search(r"\S", after.replace("│", " ", 1))
        if not match or not line.strip():
            continue
        col = match.start()
        right = line.rfind("│") if line.rstrip().endswith("│") else len(line)
        if line[col - 1:col] != " " or not line[col:col + 1].strip():
            continue  # the next line starts a new row or a new column, not a continuation
        text = line[col:right].rstrip()
        word = after[col:].split()[0]
        room = (right - col) - len(text) - 1  # columns left on the line, one space before
        # Two columns of slack: rich keeps a cell's padding, which this reading does not see.
        if text and not text.endswith(CLAUSE_END) and len(word) + 2 <= room:
            found.append(f"{line.rstrip()}\n{after.rstrip()}")
    return found


@pytest.mark.parametrize("args", PAGES, ids=" ".join)
def test_help_lines_do_not_end_mid_sentence(args: list[str]) -> None:
    page = render(args)
    assert max(len(line) for line in page.splitlines()) <= WIDTH
    assert broken_lines(page) == []
    assert "<bool>" not in page  # flags take no value


def test_the_check_finds_a_hard_line_break() -> None:
    # What `cpt --help` showed when the docstrings' line breaks reached rich's layout.
    page = ("│ eval   Per-domain loss, perplexity and bits per byte against the start       │\n"
            "│        model: the forgetting                                                 │\n"
            "│        table.                                                                │")
    assert broken_lines(page) == [page.split("\n", 1)[1]]
    wrapped = ("│ eval   Per-domain loss, perplexity and bits per byte against the start model │\n"
               "│        table.                                                                │")
    assert broken_lines(wrapped) == []


def test_summary_is_the_first_paragraph_and_the_long_help_keeps_the_rest() -> None:
    listing = render(["--help"])
    assert "preemption" not in listing  # the list shows each command's first paragraph
    page = render(["train", "--help"])
    assert re.search(r"forgetting\s+table\.\s*\n\s*\n\s*Exit status 143", page), page


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"cpt {__version__}"
