"""Tests for the offline quickstart corpus builder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cpt_cli.data.corpus import (
    DOMAINS,
    MAX_CHUNK_CHARS,
    STAMP_FILE,
    build_quickstart_corpus,
    chunk_prose,
    chunk_source,
    main,
    stdlib_sources,
)

# Small enough to keep every build well under a second, big enough to mix many modules.
SMALL = 40
OUTPUT_FILES = [f"{domain}.jsonl" for domain in DOMAINS] + [STAMP_FILE]


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_quickstart_corpus(tmp_path_factory.mktemp("corpus"), max_documents=SMALL)


def test_returns_one_jsonl_per_domain(corpus: dict[str, Path]) -> None:
    assert set(corpus) == set(DOMAINS)
    for domain, path in corpus.items():
        assert path.name == f"{domain}.jsonl"
        assert path.is_file()


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    first = build_quickstart_corpus(tmp_path / "a", max_documents=SMALL)
    second = build_quickstart_corpus(tmp_path / "b", max_documents=SMALL)
    for domain in DOMAINS:
        assert first[domain].read_bytes() == second[domain].read_bytes()
    assert (tmp_path / "a" / STAMP_FILE).read_bytes() == (tmp_path / "b" / STAMP_FILE).read_bytes()


def test_records_have_the_right_fields(corpus: dict[str, Path]) -> None:
    for domain, path in corpus.items():
        records = _records(path)
        assert len(records) == SMALL
        expected = {"question", "answer"} if domain == "qa" else {"text"}
        for record in records:
            assert set(record) == expected
            assert all(isinstance(value, str) and value.strip() for value in record.values())


def test_text_documents_respect_the_length_bounds(corpus: dict[str, Path]) -> None:
    for domain in ("code", "prose"):
        for record in _records(corpus[domain]):
            assert 200 <= len(record["text"]) <= MAX_CHUNK_CHARS


def test_code_documents_look_like_python(corpus: dict[str, Path]) -> None:
    texts = [record["text"] for record in _records(corpus["code"])]
    looks_like_code = [t for t in texts if any(k in t for k in ("def ", "class ", "import"))]
    assert len(looks_like_code) >= 0.7 * len(texts)


def test_qa_pairs_ask_about_a_signature(corpus: dict[str, Path]) -> None:
    questions = set()
    for record in _records(corpus["qa"]):
        assert record["question"].count("`") == 2
        assert len(record["answer"]) >= 40
        questions.add(record["question"].split("`")[0])
    assert len(questions) > 1, "question templates should vary"


def test_domains_are_distinct(corpus: dict[str, Path]) -> None:
    code = {record["text"] for record in _records(corpus["code"])}
    prose = {record["text"] for record in _records(corpus["prose"])}
    answers = {record["answer"] for record in _records(corpus["qa"])}
    assert not code & prose
    assert not code & answers


def test_manifest_counts_match_the_files(corpus: dict[str, Path]) -> None:
    manifest = json.loads((corpus["code"].parent / STAMP_FILE).read_text(encoding="utf-8"))
    assert manifest["stamp"]["max_documents"] == SMALL
    for domain, path in corpus.items():
        records = _records(path)
        counts = manifest["domains"][domain]
        assert counts["documents"] == len(records)
        assert counts["characters"] == sum(len(v) for r in records for v in r.values())


def _age_outputs(out_dir: Path) -> dict[str, int]:
    """Backdate every output so a rewrite is visible however coarse the clock is."""
    for name in OUTPUT_FILES:
        os.utime(out_dir / name, ns=(1_000_000_000, 1_000_000_000))
    return {name: (out_dir / name).stat().st_mtime_ns for name in OUTPUT_FILES}


def test_matching_stamp_skips_and_force_rebuilds(tmp_path: Path) -> None:
    build_quickstart_corpus(tmp_path, max_documents=SMALL)
    before = _age_outputs(tmp_path)

    build_quickstart_corpus(tmp_path, max_documents=SMALL)
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in OUTPUT_FILES} == before

    build_quickstart_corpus(tmp_path, max_documents=SMALL, force=True)
    for name in OUTPUT_FILES:
        assert (tmp_path / name).stat().st_mtime_ns != before[name]


def test_changed_settings_or_missing_file_rebuilds(tmp_path: Path) -> None:
    build_quickstart_corpus(tmp_path, max_documents=SMALL)
    before = _age_outputs(tmp_path)
    build_quickstart_corpus(tmp_path, max_documents=SMALL + 1)
    assert (tmp_path / "qa.jsonl").stat().st_mtime_ns != before["qa.jsonl"]
    assert len(_records(tmp_path / "qa.jsonl")) == SMALL + 1

    (tmp_path / "prose.jsonl").unlink()
    build_quickstart_corpus(tmp_path, max_documents=SMALL + 1)
    assert (tmp_path / "prose.jsonl").is_file()


def test_no_temporary_files_are_left_behind(corpus: dict[str, Path]) -> None:
    assert sorted(p.name for p in corpus["code"].parent.iterdir()) == sorted(OUTPUT_FILES)


def test_stdlib_walk_skips_tests_and_vendored_code() -> None:
    files = stdlib_sources()
    excluded = {"test", "tests", "idle_test", "lib2to3", "site-packages", "ensurepip"}
    for path in files:
        assert not excluded & set(path.parts)
        assert path.suffix == ".py"
    assert any(path.parent.name == "json" for path in files)


def test_chunk_source_cuts_at_top_level_definitions() -> None:
    body = "    x = 1\n" * 30
    source = "".join(f"@decorator\ndef f{i}():\n{body}\n\n" for i in range(40))
    chunks = chunk_source(source, limit=1_000)
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(chunk) <= 1_000
        assert chunk.startswith("@decorator\ndef f")
    assert "".join(chunks).count("def f") == 40


def test_chunk_source_splits_an_overlong_definition_at_blank_lines() -> None:
    block = "    y = 2\n" * 20
    source = "class Big:\n" + "\n".join(block for _ in range(30))
    chunks = chunk_source(source, limit=1_000)
    assert len(chunks) > 1
    assert all(len(chunk) <= 1_000 for chunk in chunks)


def test_chunk_prose_keeps_paragraphs_whole_and_drops_short_text() -> None:
    paragraph = "word " * 60
    text = "\n\n".join(paragraph.strip() for _ in range(30))
    chunks = chunk_prose(text, limit=1_000)
    assert all(len(chunk) <= 1_000 for chunk in chunks)
    assert all(chunk.startswith("word") and chunk.endswith("word") for chunk in chunks)
    assert chunk_prose("too short") == []


def test_cli_prints_one_line_per_domain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path), "--max-documents", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == list(DOMAINS)
    assert all("5 documents" in line for line in lines)


def test_rejects_non_positive_max_documents(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_quickstart_corpus(tmp_path, max_documents=0)
