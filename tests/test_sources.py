"""Sources: every kind of local file, text_field / template / min_chars, and Hugging Face datasets
loaded through `datasets` from a local folder (the same code path as a Hub id)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest

from cpt_cli.config import HFSource, SourceConfig
from cpt_cli.data.sources import ReadStats, fingerprint_source, read_documents
from cpt_cli.errors import DataError

RECORDS = [{"id": i, "text": f"document number {i} says hello {'x' * i}",
            "question": f"What is {i} + {i}?", "answer": f"It is {2 * i}."} for i in range(12)]
TEXTS = [r["text"] for r in RECORDS]


def read(tmp: Path, **kwargs: object) -> list[str]:
    return list(read_documents(SourceConfig(name="s", **kwargs), tmp))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:5])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[5:])
    # Files are read in sorted order, records in file order: the order is part of the cache key.
    assert read(tmp_path, path="*.jsonl") == TEXTS


def test_json_list_and_json_lines_named_json(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(RECORDS))
    assert read(tmp_path, path="list.json") == TEXTS
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": RECORDS, "version": 1}))
    assert read(tmp_path, path="wrapped.json") == TEXTS
    write_jsonl(tmp_path / "lines.json", RECORDS)
    assert read(tmp_path, path="lines.json") == TEXTS


def test_gzipped_jsonl(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in RECORDS)
    assert read(tmp_path, path="a.jsonl.gz") == TEXTS


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Several row groups, so the reader's batching is exercised.
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "a.parquet", row_group_size=5)
    assert read(tmp_path, path="a.parquet") == TEXTS


def test_csv(tmp_path: Path) -> None:
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(RECORDS[0]))
        writer.writeheader()
        writer.writerows(RECORDS)
    assert read(tmp_path, path="a.csv") == TEXTS
    assert read(tmp_path, path="a.csv", template="Q: {question} A: {answer}")[3] == \
        "Q: What is 3 + 3? A: It is 6."


def test_arrow_written_by_datasets_save_to_disk(tmp_path: Path) -> None:
    import datasets

    columns = {key: [r[key] for r in RECORDS] for key in RECORDS[0]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "saved"))
    assert read(tmp_path, path="saved/*.arrow") == TEXTS
    # The folder itself: its state.json and dataset_info.json are metadata, not records.
    assert read(tmp_path, path="saved") == TEXTS


def test_arrow_stream_and_arrow_file(tmp_path: Path) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(RECORDS)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=5):
            writer.write_batch(batch)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert read(tmp_path, path="stream.arrow") == TEXTS
    assert read(tmp_path, path="file.arrow") == TEXTS


def test_plain_files_one_document_each(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "b.md").write_text("# Title\n\nSome *markdown*.\n")
    (notes / "a.txt").write_text("plain text\n")
    # text_field names a record field; plain files have none, so it does not apply to them.
    assert read(tmp_path, path="notes/*", text_field="content") == \
        ["plain text\n", "# Title\n\nSome *markdown*.\n"]
    assert read(tmp_path, path="notes/*.md", template="{path}\n{text}") == \
        ["notes/b.md\n# Title\n\nSome *markdown*.\n"]


def test_source_code_tree(tmp_path: Path) -> None:
    tree = tmp_path / "repo"
    (tree / "pkg" / "sub").mkdir(parents=True)
    files = {"pkg/__init__.py": "VERSION = 1\n", "pkg/core.py": "def f():\n    return 1\n",
             "pkg/sub/util.rs": "fn main() {}\n", "README.md": "# repo\n"}
    for rel, text in files.items():
        (tree / rel).write_text(text)
    (tree / ".hidden").write_text("secret")  # dot files are not matched by a folder or ** glob
    assert read(tmp_path, path="repo") == [files[k] for k in sorted(files)]
    assert read(tmp_path, path="repo/**/*.py") == [files["pkg/__init__.py"], files["pkg/core.py"]]


def test_binary_file_in_a_tree_is_an_error_or_skipped(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.py").write_text("x = 1\n")
    (tmp_path / "t" / "b.pyc").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DataError, match=r"b\.pyc: binary file"):
        read(tmp_path, path="t")
    stats = ReadStats()
    docs = list(read_documents(SourceConfig(name="s", path="t", on_error="skip"), tmp_path,
                               stats))
    assert docs == ["x = 1\n"]
    assert stats.skipped == {"binary file": 1}


def test_text_field_template_and_min_chars(tmp_path: Path) -> None:
    records = [{"body": "short", "title": "A"}, {"body": "a much longer body text", "title": "B"},
               {"body": "   ", "title": "C"}]
    write_jsonl(tmp_path / "a.jsonl", records)
    assert read(tmp_path, path="a.jsonl", text_field="body") == ["short",
                                                                "a much longer body text"]
    stats = ReadStats()
    docs = list(read_documents(SourceConfig(name="s", path="a.jsonl", text_field="body",
                                            min_chars=10), tmp_path, stats))
    assert docs == ["a much longer body text"]
    assert stats.documents == 1
    assert stats.skipped == {"shorter than min_chars": 1, "empty": 1}
    assert read(tmp_path, path="a.jsonl", template="{title}: {body}") == \
        ["A: short", "B: a much longer body text", "C:    "]


def test_missing_field_names_the_file_line_and_fields(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: field 'text' is missing; the record has "
                                        r"body"):
        read(tmp_path, path="a.jsonl")
    with pytest.raises(DataError, match=r"template field 'answer' is missing"):
        read(tmp_path, path="a.jsonl", template="{text} {answer}")


BOM = b"\xef\xbb\xbf"


def _csv_bytes() -> bytes:
    out = io.StringIO(newline="")
    # "text" first: a byte-order mark would become part of the first column's name.
    writer = csv.DictWriter(out, fieldnames=["text", "id", "question", "answer"])
    writer.writeheader()
    writer.writerows(RECORDS)
    return out.getvalue().encode("utf-8")


# Each format as a Windows editor or Excel saves it: a UTF-8 byte-order mark first. (Parquet and
# Arrow are binary formats with typed strings: no byte-order mark can occur.)
JSONL_BYTES = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
BOM_FILES = {
    "jsonl": ("a.jsonl", JSONL_BYTES, TEXTS),
    "json": ("a.json", json.dumps(RECORDS).encode(), TEXTS),
    "jsonl-named-json": ("b.json", JSONL_BYTES, TEXTS),
    "csv": ("a.csv", _csv_bytes(), TEXTS),
    "txt": ("a.txt", b"plain text\n", ["plain text\n"]),
    "md": ("a.md", b"# Title\n", ["# Title\n"]),
    "txt.gz": ("a.txt.gz", b"zipped text\n", ["zipped text\n"]),
}


@pytest.mark.parametrize("fmt", list(BOM_FILES))
def test_a_byte_order_mark_is_stripped(fmt: str, tmp_path: Path) -> None:
    name, content, expected = BOM_FILES[fmt]
    raw = BOM + content
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    docs = read(tmp_path, path=name)
    assert docs == expected
    assert not any(d.startswith("\ufeff") for d in docs)


def test_a_null_text_is_an_error_or_skipped_as_not_text(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, {"text": None}, {"text": "also fine"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: field 'text' is null, not text.*"
                                        r"on_error: skip"):
        read(tmp_path, path="a.jsonl")
    stats = ReadStats()
    docs = list(read_documents(SourceConfig(name="s", path="a.jsonl", on_error="skip"),
                               tmp_path, stats))
    assert docs == ["fine", "also fine"]
    assert stats.skipped == {"not text": 1}


def test_glob_that_matches_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"path 'nothing/\*\.jsonl' matches no file"):
        read(tmp_path, path="nothing/*.jsonl")


def write_hf_folder(folder: Path) -> Path:
    """A dataset folder the way the Hub lays one out: data files per split."""
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-00000.jsonl", RECORDS[:6])
    write_jsonl(folder / "data" / "train-00001.jsonl", RECORDS[6:])
    write_jsonl(folder / "data" / "test-00000.jsonl", [{"text": "a test record", "id": 99,
                                                        "question": "", "answer": ""}])
    return folder


def test_hf_dataset_from_a_local_folder(tmp_path: Path) -> None:
    write_hf_folder(tmp_path / "ds")
    docs = read(tmp_path, hf=HFSource(path="ds", split="train"))
    assert docs == TEXTS
    assert read(tmp_path, hf=HFSource(path="ds", split="test")) == ["a test record"]
    # data_files narrows the files, and the template works on Hub records as on local ones.
    one = read(tmp_path, hf=HFSource(path="ds", data_files="data/train-00001.jsonl"),
               template="{question}")
    assert one == [r["question"] for r in RECORDS[6:]]


def test_hf_streaming_with_max_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    import datasets

    write_hf_folder(tmp_path / "ds")
    assert read(tmp_path, hf=HFSource(path="ds", streaming=True, max_documents=4)) == TEXTS[:4]
    # Streaming reads through an IterableDataset: prove that is the path taken.
    calls: list[bool] = []
    original = datasets.load_dataset

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("streaming")))
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert read(tmp_path, hf=HFSource(path="ds", streaming=True, max_documents=20)) == TEXTS
    assert calls == [True]


def test_hf_folder_written_by_save_to_disk(tmp_path: Path) -> None:
    import datasets

    columns = {key: [r[key] for r in RECORDS] for key in RECORDS[0]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(
        str(tmp_path / "saved"))
    assert read(tmp_path, hf=HFSource(path="saved", split="train")) == TEXTS


def test_hf_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"could not load Hugging Face dataset 'no/such-dataset'"):
        read(tmp_path, hf=HFSource(path="no/such-dataset"))


def write_shards(folder: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records[:6]), folder / "shards" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(records[6:]), folder / "shards" / "b.parquet")


def test_hf_builder_name_reads_files_relative_to_the_recipe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf: {path: parquet, data_files: ...}`: the files are found from the recipe's folder, not
    the working directory, and their content is in the fingerprint (as a path source's is)."""
    project = tmp_path / "project"
    write_shards(project, RECORDS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    source = SourceConfig(name="s", hf=HFSource(path="parquet", data_files="shards/*.parquet"))
    assert list(read_documents(source, project)) == TEXTS
    fp = fingerprint_source(source, project, None)
    write_shards(project, RECORDS[:9])  # b.parquet shrinks from 6 records to 3
    assert fingerprint_source(source, project, None) != fp
    assert list(read_documents(source, project)) == TEXTS[:9]


def test_hf_builder_name_with_a_glob_that_matches_nothing(tmp_path: Path) -> None:
    source = SourceConfig(name="s", hf=HFSource(path="parquet", data_files="shards/*.parquet"))
    for call in (lambda: fingerprint_source(source, tmp_path, None),
                 lambda: list(read_documents(source, tmp_path))):
        with pytest.raises(DataError, match=r"hf.data_files 'shards/\*\.parquet' matches no "
                                            r"file \(looked for .*recipe's folder") as err:
            call()
        assert "HF_HUB_OFFLINE" not in str(err.value)
    with pytest.raises(DataError, match=r"set hf.data_files"):
        list(read_documents(SourceConfig(name="s", hf=HFSource(path="json")), tmp_path))


def test_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "data").mkdir(parents=True)
        write_jsonl(folder / "data" / "x.jsonl", RECORDS)
    source = SourceConfig(name="s", path="data/*.jsonl")
    # The same files under another project folder: the same fingerprint (the cache is reused).
    assert fingerprint_source(source, a, None) == fingerprint_source(source, b, None)
    write_jsonl(b / "data" / "x.jsonl", RECORDS[:-1])
    assert fingerprint_source(source, a, None) != fingerprint_source(source, b, None)
    hf_a = write_hf_folder(tmp_path / "hf")
    fp = fingerprint_source(SourceConfig(name="s", hf=HFSource(path="hf")), tmp_path, None)
    write_jsonl(hf_a / "data" / "train-00001.jsonl", RECORDS[6:8])
    assert fingerprint_source(SourceConfig(name="s", hf=HFSource(path="hf")), tmp_path, None) != fp
