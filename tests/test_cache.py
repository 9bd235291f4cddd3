"""The tokenization cache: exact tokens, reuse without re-tokenizing, keys that follow what was
tokenized, uint16/uint32, atomic entries, and `cpt data prepare` ahead of `cpt train`."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from cpt_cli.config import SourceConfig, TokenizerTrainConfig
from cpt_cli.data import cache as cache_module
from cpt_cli.data.cache import document_hash, prepare_source, token_dtype
from cpt_cli.data.tokenization import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from cpt_cli.errors import DataError

DOCS = [f"Record {i}: the {['red', 'green', 'blue'][i % 3]} fox jumps over {i * 7} lazy dogs."
        + " Again." * (i % 5) for i in range(60)]


@pytest.fixture
def tokenizer(tiny_tokenizer: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(tiny_tokenizer))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "title": f"T{i}"}) + "\n"
                            for i, t in enumerate(DOCS)))
    return path


def prepare(tmp_path: Path, tok: PreTrainedTokenizerBase, **source: Any) -> Any:
    config = SourceConfig(name="docs", **({"path": "docs.jsonl"} | source))
    return prepare_source(config, tmp_path, tok, tokenizer_fingerprint(tok), tmp_path / "cache",
                          pool_tokens=200)


def count_tokenizations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call of the tokenizing step (by source name) while still running it."""
    calls: list[str] = []
    original = cache_module._tokenize_into

    def counting(folder: Path, source: SourceConfig, *args: Any, **kwargs: Any) -> Any:
        calls.append(source.name)
        return original(folder, source, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_tokenize_into", counting)
    return calls


def test_tokens_are_the_tokenizers_own_encoding(tmp_path: Path, corpus: Path,
                                                tokenizer: PreTrainedTokenizerBase) -> None:
    entry = prepare(tmp_path, tokenizer)
    assert entry.num_documents == len(DOCS)
    assert entry.tokens.dtype == np.uint16
    for i, text in enumerate(DOCS):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert entry.tokens[entry.offsets[i]:entry.offsets[i + 1]].tolist() == expected
        assert int(entry.hashes[i]) == document_hash(text)
        assert int(entry.nbytes[i]) == len(text.encode("utf-8"))
    assert entry.num_tokens == int(entry.offsets[-1]) == len(entry.tokens)
    # The held-out candidates are the documents with the smallest hashes, with their text.
    pool = entry.pool()
    order = np.argsort(entry.hashes, kind="stable")
    assert [d["index"] for d in pool] == order[:len(pool)].tolist()
    assert all(DOCS[d["index"]] == d["text"] for d in pool)
    assert sum(d["tokens"] for d in pool) >= 200 > sum(d["tokens"] for d in pool[:-1])


def test_document_hash_ignores_whitespace_runs_only() -> None:
    assert document_hash("a  b\n\tc ") == document_hash(" a b c")
    assert document_hash("a b c") != document_hash("a b d")
    assert document_hash("ab c") != document_hash("a bc")


def test_second_prepare_reuses_the_entry(tmp_path: Path, corpus: Path,
                                         tokenizer: PreTrainedTokenizerBase,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_tokenizations(monkeypatch)
    first = prepare(tmp_path, tokenizer)
    mtime = (first.path / "tokens.bin").stat().st_mtime_ns
    second = prepare(tmp_path, tokenizer)
    assert calls == ["docs"]
    assert second.path == first.path
    assert (second.path / "tokens.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(second.tokens, first.tokens)


def test_key_follows_content_extraction_and_tokenizer(tmp_path: Path, corpus: Path,
                                                      tokenizer: PreTrainedTokenizerBase,
                                                      cpt_cache: Path) -> None:
    base = prepare(tmp_path, tokenizer).key
    keys = {"base": base,
            "template": prepare(tmp_path, tokenizer, template="{title}: {text}").key,
            "min_chars": prepare(tmp_path, tokenizer, min_chars=60).key}
    (tmp_path / "other.jsonl").write_text(corpus.read_text().replace('"T', '"U'))
    keys["text_field"] = prepare(tmp_path, tokenizer, path="other.jsonl", text_field="title").key
    other_tok = train_tokenizer(DOCS, TokenizerTrainConfig(vocab_size=280), cpt_cache,
                                "test-cache-other-tokenizer")
    keys["tokenizer"] = prepare(tmp_path, other_tok).key
    corpus.write_text(corpus.read_text().replace("fox", "cat"))
    keys["content"] = prepare(tmp_path, tokenizer).key
    assert len(set(keys.values())) == len(keys), keys
    # A field the tokens do not depend on (the weight) keeps the key: the entry is shared.
    corpus.write_text(corpus.read_text().replace("cat", "fox"))
    assert prepare(tmp_path, tokenizer, weight=3.0).key == base


def test_a_builder_name_source_follows_its_files(tmp_path: Path,
                                                tokenizer: PreTrainedTokenizerBase) -> None:
    """`hf: {path: parquet, data_files: ...}`: a shard that shrinks is tokenized again, never
    served from the entry of its larger self."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cpt_cli.config import HFSource

    def write(n: int) -> None:
        pq.write_table(pa.Table.from_pylist([{"text": t} for t in DOCS[:n]]),
                       tmp_path / "shard.parquet")

    hf = HFSource(path="parquet", data_files="shard.parquet")
    write(60)
    assert prepare(tmp_path, tokenizer, path=None, hf=hf).num_documents == 60
    write(40)
    assert prepare(tmp_path, tokenizer, path=None, hf=hf).num_documents == 40


def test_uint32_when_the_vocabulary_outgrows_uint16(tmp_path: Path, corpus: Path,
                                                    tokenizer: PreTrainedTokenizerBase) -> None:
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(128_256) == np.uint32
    big = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    big.add_tokens([f"<extra{i}>" for i in range(66_000)])
    corpus.write_text(json.dumps({"text": "fox <extra65999> dogs <extra3>"}) + "\n")
    entry = prepare(tmp_path, big)
    assert entry.tokens.dtype == np.uint32
    ids = entry.tokens.tolist()
    assert ids == big("fox <extra65999> dogs <extra3>", add_special_tokens=False)["input_ids"]
    assert max(ids) > 65_535


def test_failure_midway_leaves_no_entry(tmp_path: Path, corpus: Path,
                                        tokenizer: PreTrainedTokenizerBase,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    original = cache_module.read_segmented

    def failing(*args: Any, **kwargs: Any) -> Iterator[str]:
        for i, text in enumerate(original(*args, **kwargs)):
            if i == 40:
                raise DataError("the disk went away")
            yield text

    monkeypatch.setattr(cache_module, "_BATCH_DOCS", 8)  # several batches written before it
    monkeypatch.setattr(cache_module, "read_segmented", failing)
    with pytest.raises(DataError, match="the disk went away"):
        prepare(tmp_path, tokenizer)
    tokens_dir = tmp_path / "cache" / "tokens"
    assert list(tokens_dir.iterdir()) == []  # neither the entry nor its temporary folder

    monkeypatch.setattr(cache_module, "read_segmented", original)
    calls = count_tokenizations(monkeypatch)
    entry = prepare(tmp_path, tokenizer)
    assert calls == ["docs"] and entry.num_documents == len(DOCS)


def test_an_entry_without_meta_is_rebuilt(tmp_path: Path, corpus: Path,
                                          tokenizer: PreTrainedTokenizerBase,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    entry = prepare(tmp_path, tokenizer)
    (entry.path / "meta.json").unlink()  # meta.json is written last: without it, incomplete
    calls = count_tokenizations(monkeypatch)
    again = prepare(tmp_path, tokenizer)
    assert calls == ["docs"] and again.num_documents == len(DOCS)


@pytest.mark.parametrize("damage", ["truncated-tokens", "meta-not-json", "offsets-missing",
                                    "hashes-short"])
def test_a_damaged_entry_is_rebuilt(damage: str, tmp_path: Path, corpus: Path,
                                    tokenizer: PreTrainedTokenizerBase,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is derived data: an entry damaged by hand or by the disk is made again, with
    the same tokens, instead of failing every later run."""
    entry = prepare(tmp_path, tokenizer)
    tokens = np.array(entry.tokens)
    if damage == "truncated-tokens":
        with open(entry.path / "tokens.bin", "r+b") as fh:
            fh.truncate(10)
    elif damage == "meta-not-json":
        (entry.path / "meta.json").write_text("{")
    elif damage == "offsets-missing":
        (entry.path / "offsets.npy").unlink()
    else:
        np.save(entry.path / "hashes.npy", entry.hashes[:-1])
    calls = count_tokenizations(monkeypatch)
    again = prepare(tmp_path, tokenizer)
    assert calls == ["docs"] and np.array_equal(np.array(again.tokens), tokens)


def _fill_the_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenizing writes part of tokens.bin, then the disk is full."""
    def full(folder: Path, *args: Any, **kwargs: Any) -> Any:
        (folder / "tokens.bin").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "tokens.bin"))

    monkeypatch.setattr(cache_module, "_tokenize_into", full)


def test_a_full_cache_disk_is_a_data_error(tmp_path: Path, corpus: Path,
                                           tokenizer: PreTrainedTokenizerBase,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _fill_the_disk(monkeypatch)
    with pytest.raises(DataError) as err:
        prepare(tmp_path, tokenizer)
    message = str(err.value)
    # A small source: its tokens, and a held-out pool that holds all of its text.
    need = 2 * corpus.stat().st_size
    for phrase in (f"the tokenization cache {tmp_path / 'cache'} is full (No space left on "
                   "device)", "source 'docs'", f"needs about {need / 1e3:,.0f} kB", "free)",
                   "point data.cache_dir (or $CPT_CACHE) at a disk with room"):
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("command", [("data", "prepare"), ("mix", "inspect"), ("train",)],
                         ids=["prepare", "inspect", "train"])
def test_a_full_cache_disk_in_every_command(command: tuple[str, ...], tmp_path: Path,
                                            tiny_recipe: dict, tiny_tokenizer: Path,
                                            write_recipe: Any, cli: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_recipe["model"].pop("train_tokenizer")
    tiny_recipe["model"]["tokenizer"] = str(tiny_tokenizer)
    tiny_recipe["data"]["cache_dir"] = "cache"
    _fill_the_disk(monkeypatch)
    result = cli(*command, write_recipe(tiny_recipe))
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert f"the tokenization cache {tmp_path / 'cache'} is full" in output, output
    assert "Traceback" not in result.output
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []
    assert not (tmp_path / "runs").exists()


def _killed_builder(folder: Path) -> None:
    """A process that starts building `folder` (takes its owner lock) and is SIGKILLed."""
    code = ("import os, signal, sys; from pathlib import Path; "
            "from cpt_cli.data.cache import _own; _own(Path(sys.argv[1])); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == -signal.SIGKILL


def test_temporaries_of_a_killed_build_are_removed(tmp_path: Path, corpus: Path,
                                                   tokenizer: PreTrainedTokenizerBase) -> None:
    tokens = tmp_path / "cache" / "tokens"
    dead, live, unowned = (tokens / f".docs-{x}.tmp" for x in ("dead", "live", "unowned"))
    for folder in (dead, live, unowned):
        folder.mkdir(parents=True)
        (folder / "tokens.bin").write_bytes(b"\0" * 4096)
    _killed_builder(dead)
    owner = cache_module._own(live)  # a build still running (this process)
    try:
        entry = prepare(tmp_path, tokenizer)
        assert not dead.exists()
        assert live.is_dir() and unowned.is_dir()  # alive, or not known to be dead
        assert entry.num_documents == len(DOCS)
    finally:
        os.close(owner)


def test_an_empty_cpt_cache_means_the_default(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CPT_CACHE", "")
    assert cache_module.default_cache_dir() == tmp_path / ".cache" / "cpt"


def test_a_source_with_no_documents(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(DataError, match=r"source 'docs' has no documents \(skipped: 1 shorter "
                                        r"than min_chars\)"):
        prepare(tmp_path, tokenizer, min_chars=100)
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


def test_cli_prepare_then_train_reuses_the_cache(tmp_path: Path, tiny_recipe: dict,
                                                 write_recipe: Any, cli: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_recipe["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe = write_recipe(tiny_recipe)
    calls = count_tokenizations(monkeypatch)
    result = cli("data", "prepare", recipe, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["name"] for s in report["sources"]] == ["prose", "qa"]
    assert calls == ["prose", "qa"]
    mtimes = {}
    for s in report["sources"]:
        folder = Path(s["cache"])
        assert folder.parent == tmp_path / "cache" / "tokens"
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["tokens"] == s["tokens"] and meta["documents"] == s["documents"] > 100
        mtimes[folder] = (folder / "tokens.bin").stat().st_mtime_ns

    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    assert calls == ["prose", "qa"]  # training tokenized nothing
    assert {f: (f / "tokens.bin").stat().st_mtime_ns for f in mtimes} == mtimes
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    fingerprints = {s["name"]: s["content_fingerprint"] for s in manifest["stages"][0]["sources"]}
    for folder in mtimes:
        meta = json.loads((folder / "meta.json").read_text())
        assert fingerprints[meta["source"]] == meta["content_fingerprint"]


def test_cli_prepare_reports_bad_data_without_traceback(tmp_path: Path, tiny_recipe: dict,
                                                        write_recipe: Any, cli: Any) -> None:
    (tmp_path / "data" / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n{oops\n')
    tiny_recipe["data"]["cache_dir"] = str(tmp_path / "cache")
    result = cli("data", "prepare", write_recipe(tiny_recipe))
    assert result.exit_code == 2
    assert "qa.jsonl:2: invalid JSON" in result.output
    assert "Traceback" not in result.output
