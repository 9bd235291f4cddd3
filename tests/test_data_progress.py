"""What tokenizing shows: the true totals of every source at the end, and one line per source
that skipped records (count per reason, first file:line), from `cpt data prepare`,
`cpt mix inspect` and `cpt train`, cache hits included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from cpt_cli.data.prepare import SourceProgress
from cpt_cli.training import display as display_module
from cpt_cli.training.display import TrainDisplay

BAD_LINE = 7


def _bad_source(tmp_path: Path, tiny_recipe: dict, tiny_tokenizer: Path) -> list[bytes]:
    lines = (tmp_path / "data" / "prose.jsonl").read_bytes().splitlines()[:40]
    lines.insert(BAD_LINE - 1, b'{"text": "an unterminated string}')
    lines.insert(20, b'{"text": "   "}')
    (tmp_path / "data" / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    tiny_recipe["model"].pop("train_tokenizer")
    tiny_recipe["model"]["tokenizer"] = str(tiny_tokenizer)
    tiny_recipe["data"]["sources"][0].update(path="data/bad.jsonl", on_error="skip")
    return lines


def test_skipped_records_are_named_by_every_command(cli: Any, tmp_path: Path, tiny_recipe: dict,
                                                    write_recipe: Any,
                                                    tiny_tokenizer: Path) -> None:
    lines = _bad_source(tmp_path, tiny_recipe, tiny_tokenizer)
    recipe = write_recipe(tiny_recipe)
    expected = (f"source 'prose' skipped 2 records: 1 invalid JSON (first at "
                f"{tmp_path / 'data' / 'bad.jsonl'}:{BAD_LINE}); 1 empty (first at ")
    first = cli("data", "prepare", recipe)
    assert first.exit_code == 0, first.output
    # Compared without whitespace: rich may fold a long tmp path anywhere, even before ';'.
    assert "".join(expected.split()) in "".join(first.output.split()), first.output
    flat = " ".join(first.output.split())
    assert f"tokenized prose: {len(lines) - 2:,} documents" in flat
    for args in (["mix", "inspect", recipe], ["train", recipe]):  # from the cache now
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "".join(expected.split()) in "".join(result.output.split()), result.output
        flat = " ".join(result.output.split())
        assert f"prose: {len(lines) - 2:,} documents" in flat and "from the cache" in flat
    quiet = cli("mix", "inspect", recipe, "--json")  # stdout stays JSON alone
    assert json.loads(quiet.stdout)["sources"][0]["skipped"] == {"invalid JSON": 1, "empty": 1}


def test_plain_lines_off_a_terminal_and_always_the_totals(monkeypatch: Any) -> None:
    console = Console(record=True, width=120, force_terminal=False)
    display = TrainDisplay(console=console)
    clock = iter([0.0, 1.0, 11.0, 12.0, 30.0])
    monkeypatch.setattr(display_module.time, "monotonic", lambda: next(clock))
    for documents, read in ((10, 100), (20, 200), (30, 300), (40, 400)):
        display.data_progress(SourceProgress("code", documents, documents * 50, read, 1000))
    display.data_progress(SourceProgress("code", 45, 2_250, done=True))
    lines = console.export_text().splitlines()
    # The first update at 0 s, the next 10 s later; then the true totals, whatever came before.
    assert lines[0].startswith("tokenizing code: 10% of 1.0 kB read, 10 documents")
    assert lines[1].startswith("tokenizing code: 30% of 1.0 kB read, 30 documents, 1,500 tokens")
    assert "about" in lines[1] and "left" in lines[1]
    assert lines[2].startswith("tokenized code: 45 documents, 2,250 tokens in 30.0 s")
    assert len(lines) == 3


def test_a_source_seen_once_shows_no_rate(monkeypatch: Any) -> None:
    """Tokenized in one batch, a source's first update is its last: elapsed time is about 0,
    and a rate over it would read 1e14 tokens/s. Totals only."""
    console = Console(record=True, width=120, force_terminal=False)
    display = TrainDisplay(console=console)
    monkeypatch.setattr(display_module.time, "monotonic", lambda: 5.0)
    display.data_progress(SourceProgress("notes", 12, 3_000, done=True))
    text = console.export_text()
    assert "tokenized notes: 12 documents, 3,000 tokens" in text
    assert "tokens/s" not in text
