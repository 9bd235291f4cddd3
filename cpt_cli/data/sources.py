"""Reading documents from a source: local files of several formats, or a Hugging Face dataset.

The first stage of the data flow (source -> tokenize -> plan -> pack -> loader). A source yields
plain `str` documents; every bad record either raises a `DataError` naming the file and line, or,
with `on_error: skip`, is skipped and counted in `ReadStats`: never silently.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import string
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt_cli.config import SourceConfig
from cpt_cli.data.records import (
    ChatRenderer,
    Segments,
    chat_segments,
    prompt_completion_segments,
)
from cpt_cli.errors import DataError, offline_note

RECORD_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".arrow"}
# The `datasets` builders that read text records from data files (`hf: {path: parquet,
# data_files: ...}`): their data files are on this machine, so they are resolved and hashed.
FILE_BUILDERS = {"json", "csv", "parquet", "arrow", "text", "pandas", "xml", "webdataset"}
# Files `datasets.Dataset.save_to_disk` writes next to its .arrow shards: metadata, not records.
_SAVED_DATASET_META = {"state.json", "dataset_info.json", "dataset_dict.json"}
# A plain-text file with a NUL byte in its first 8 KiB is binary (git uses the same rule).
_BINARY_PROBE = 8192


@dataclass
class ReadStats:
    """What was read and what was skipped, by reason."""

    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)
    """Where each reason first skipped a record (`file:line`)."""
    bytes_total: int = 0
    """Size of the source's local files (0 for a Hub dataset: unknown)."""
    bytes_read: int = 0
    """How far into them reading is: whole files read, plus the characters of the file being
    read (an estimate by one character a byte, never past the file's size)."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, where)

    def as_dict(self) -> dict[str, Any]:
        return {"documents": self.documents, "skipped": dict(self.skipped)}


def expand_paths(source: SourceConfig, base_dir: str | Path) -> list[Path]:
    """The files a `path` source names, sorted; an error when a glob matches nothing."""
    patterns = [source.path] if isinstance(source.path, str) else list(source.path or [])
    files: list[Path] = []
    for pattern in patterns:
        files.extend(_recipe_glob(source.name, "path", pattern, base_dir))
    return sorted(set(files))


def _recipe_glob(name: str, key: str, pattern: str, base_dir: str | Path) -> list[Path]:
    """The files a recipe's glob matches, relative to the recipe's folder; a DataError naming
    the source, the key and where it looked when none does."""
    expanded = os.path.expanduser(pattern)
    full = expanded if os.path.isabs(expanded) else os.path.join(str(base_dir), expanded)
    matches = match_files(full)
    if not matches:
        raise DataError(f"source {name!r}: {key} {pattern!r} matches no file (looked for "
                        f"{full}). Check the glob; relative paths start at the recipe's folder.")
    return matches


def match_files(pattern: str) -> list[Path]:
    """The files a path names, sorted: a folder's files (recursively), or a glob's matches;
    without the metadata of a `save_to_disk` folder."""
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                  if os.path.isfile(p) and not is_saved_dataset_meta(Path(p)))


def is_saved_dataset_meta(path: Path) -> bool:
    """The metadata of a folder written by `save_to_disk`: its .arrow shards hold the records."""
    return path.name in _SAVED_DATASET_META and (
        (path.parent / "state.json").is_file() or (path.parent / "dataset_dict.json").is_file())


@dataclass(frozen=True)
class PlainFile:
    """A plain file read as one document: `text_field` does not apply; a template may use
    `{text}` and `{path}` (the file's path as found by the glob)."""

    path: str
    text: str


def _text_of(source: SourceConfig, record: Any, where: str) -> str:
    if isinstance(record, PlainFile):
        if source.template is None:
            return record.text
        record = {"text": record.text, "path": record.path}
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if source.template is not None:
        try:
            return source.template.format_map(record)
        except KeyError as err:
            raise ValueError(f"{where}: template field {err} is missing; the record has "
                             f"{', '.join(sorted(record)) or 'no fields'}") from None
    if source.text_field not in record:
        raise ValueError(f"{where}: field {source.text_field!r} is missing; the record has "
                         f"{', '.join(sorted(map(str, record))) or 'no fields'}. Set text_field "
                         "or template for this source.")
    text = record[source.text_field]
    if text is None:
        # A null is a missing value, like a number or a list in its place: an error, or counted
        # under "not text" with on_error: skip; never dropped unseen as an empty document.
        raise ValueError(f"{where}: field {source.text_field!r} is null, not text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {source.text_field!r} holds a value of type "
                         f"{type(text).__name__}, not text")
    return text


def _open_binary(path: Path) -> Any:
    """The file's bytes, gunzipped for `.gz` (corpora often ship as .jsonl.gz)."""
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _records_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                # A byte-order mark on the first line is common in files saved on Windows.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield where, ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte "
                                        f"{err.start})")
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, ValueError(f"{where}: invalid JSON ({err.msg}, column {err.colno})")


def _records_json(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_binary(path) as fh:
        raw = fh.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark is not part of the JSON
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            # Many corpora name JSON Lines files .json (the Hub's own loader accepts both).
            yield from _records_jsonl(path)
            return
        raise DataError(f"{path}: not a valid JSON file ({err}). A .json source holds a list of "
                        "records; use .jsonl for one record per line.") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records")
    for i, record in enumerate(data):
        yield f"{path}[{i}]", record


def _records_csv(path: Path) -> Iterator[tuple[str, Any]]:
    # utf-8-sig: a byte-order mark (Excel writes one) would otherwise be part of the first
    # column's name, "\ufefftext", and text_field: text would not find it.
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="strict",
                          newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid UTF-8 near line {reader.line_num} "
                            f"({err.reason})") from None


def _records_arrow_table(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    else:
        # datasets writes Arrow *stream* files; plain Arrow IPC files are accepted too.
        try:
            reader: Any = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path)))
            except pa.ArrowInvalid as err:
                raise DataError(f"{path}: not an Arrow file ({err})") from None
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
            if hasattr(reader, "num_record_batches") else iter(reader)
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield f"{path} row {row}", record
            row += 1


def _records_plain(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    with _open_binary(path) as fh:
        raw = fh.read()
    if b"\x00" in raw[:_BINARY_PROBE]:
        yield str(path), ValueError(f"{path}: binary file (NUL bytes) inside a text source; "
                                    "narrow the glob")
        return
    try:
        # utf-8-sig: a byte-order mark is an encoding mark, not the document's first character.
        yield str(path), PlainFile(shown, raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        yield str(path), ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})")


def file_records(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs of one file by its format: a dict per JSON/CSV/Parquet/Arrow record,
    a `PlainFile` for any other file; a bad record comes as a `ValueError` in its place."""
    suffixes = [x.lower() for x in path.suffixes]
    # data.jsonl.gz reads as data.jsonl; the plain-file reader gunzips notes.txt.gz too.
    suffix = suffixes[-2] if len(suffixes) > 1 and suffixes[-1] == ".gz" else path.suffix.lower()
    if suffix in (".parquet", ".arrow") and path.suffix.lower() == ".gz":
        raise DataError(f"{path}: compressed {suffix} files are not read; {suffix} compresses "
                        "internally, store it uncompressed")
    if suffix == ".jsonl":
        return _records_jsonl(path)
    if suffix == ".json":
        return _records_json(path)
    if suffix == ".csv":
        return _records_csv(path)
    if suffix in (".parquet", ".arrow"):
        return _records_arrow_table(path)
    return _records_plain(path, shown)


def builder_data_files(source: SourceConfig, base_dir: str | Path) -> list[str] | None:
    """For a builder name as `hf.path` (`hf: {path: parquet, data_files: shards/*.parquet}`):
    the files `data_files` names, resolved against the recipe's folder, sorted, remote URLs kept
    as given; None for any other `hf` source. `datasets` would resolve them against the working
    directory, so the same recipe would read other files (or none) from elsewhere; and a glob
    that matches nothing is this error, not a dataset that "failed to load" offline."""
    spec = source.hf
    assert spec is not None
    if spec.path not in FILE_BUILDERS or (Path(base_dir) / spec.path).exists():
        return None
    if spec.data_files is None:
        raise DataError(f"source {source.name!r}: hf.path {spec.path!r} is the `datasets` "
                        "builder for local files: set hf.data_files to the files to read "
                        "(globs relative to the recipe's folder)")
    patterns = [spec.data_files] if isinstance(spec.data_files, str) else list(spec.data_files)
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:  # hf://, https://: read by datasets, fingerprinted by the spec
            files.append(pattern)
            continue
        files.extend(str(m) for m in _recipe_glob(source.name, "hf.data_files", pattern,
                                                  base_dir))
    return sorted(set(files))


def _hf_records(source: SourceConfig, base_dir: str | Path) -> Iterator[tuple[str, Any]]:
    import datasets

    spec = source.hf
    assert spec is not None
    path = spec.path
    local = Path(base_dir) / path if not os.path.isabs(path) else Path(path)
    if local.exists():
        path = str(local)
    data_files = builder_data_files(source, base_dir)
    try:
        if local.is_dir() and ((local / "state.json").is_file() or
                               (local / "dataset_dict.json").is_file()):
            # A folder written by save_to_disk: load_dataset refuses it, load_from_disk reads it.
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(path, spec.name, split=spec.split,
                                       revision=spec.revision,
                                       data_files=data_files or spec.data_files,
                                       streaming=spec.streaming)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds, all user-facing here
        raise DataError(f"source {source.name!r}: could not load Hugging Face dataset "
                        f"{spec.path!r}{offline_note(path, 'datasets')}: {type(err).__name__}: "
                        f"{err}") from None
    for i, record in enumerate(ds):
        if spec.max_documents is not None and i >= spec.max_documents:
            break
        yield f"{spec.path}[{spec.split}][{i}]", record


def identity_fields(source: SourceConfig) -> list[str]:
    """The record fields a source's text is made of: its template's fields, else `text_field`
    (`text` for a plain file)."""
    if source.format == "chat":
        return [source.messages_field]
    if source.format == "prompt_completion" and source.template is None:
        return [source.prompt_field, source.completion_field]
    if source.template is None:
        return [source.text_field]
    return sorted({name for _, name, _, _ in string.Formatter().parse(source.template)
                   if name})


def record_identity(fields: list[str], record: Any) -> int:
    """64-bit hash of a record's `fields` (names and whitespace-normalized values), before any
    template: the same question-and-answer pair under "Question: {question}" and "Q:
    {question}" is one record, so a later stage that renders it anew still knows it as
    held out."""
    if isinstance(record, PlainFile):
        record = {"text": record.text, "path": record.path}
    values = []
    for name in fields:
        value = record.get(name) if isinstance(record, dict) else None
        values.append([name, " ".join(value.split()) if isinstance(value, str) else value])
    payload = json.dumps(values, ensure_ascii=False, default=str).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def read_documents(source: SourceConfig, base_dir: str | Path,
                   stats: ReadStats | None = None,
                   identities: list[int] | None = None,
                   chat: ChatRenderer | None = None) -> Iterator[str]:
    """Every document of `source` in a fixed order, as text, filtered by `min_chars`. With
    `identities`, each yielded document's `record_identity` is appended to it. A chat source
    needs `chat`, the renderer of its template."""
    for document in read_segmented(source, base_dir, stats, identities, chat):
        yield document if isinstance(document, str) else "".join(t for t, _ in document)


def _document_of(source: SourceConfig, record: Any, where: str,
                 chat: ChatRenderer | None) -> str | Segments:
    if source.format == "prompt_completion":
        return prompt_completion_segments(source, record, where)
    if source.format == "chat":
        return chat_segments(source, record, where, chat)
    return _text_of(source, record, where)


def read_segmented(source: SourceConfig, base_dir: str | Path,
                   stats: ReadStats | None = None,
                   identities: list[int] | None = None,
                   chat: ChatRenderer | None = None) -> Iterator[str | Segments]:
    """`read_documents`, but a task record (format prompt_completion or chat) comes as its
    `(text, trained)` segments (cpt_cli/data/records.py); a text record as its text."""
    stats = stats if stats is not None else ReadStats()
    fields = identity_fields(source)
    sizes: list[int] = []
    if source.hf is not None:
        streams = [_hf_records(source, base_dir)]
    else:
        paths = expand_paths(source, base_dir)
        sizes = [p.stat().st_size for p in paths]
        stats.bytes_total = sum(sizes)
        streams = [_readable(source.name, p, file_records(p, _relative(p, base_dir)))
                   for p in paths]
    for i, records in enumerate(streams):
        read_before = sum(sizes[:i])
        for where, record in records:
            try:
                if isinstance(record, Exception):
                    raise record
                document = _document_of(source, record, where, chat)
                text = document if isinstance(document, str) else \
                    "".join(t for t, _ in document)
                if len(text) > source.max_chars:
                    raise ValueError(f"{where}: a document of {len(text):,} characters, above "
                                     f"max_chars ({source.max_chars:,}); split it, or raise "
                                     "max_chars on this source")
            except ValueError as err:
                if source.on_error == "skip":
                    stats.skip(_reason(str(err)), where)
                    continue
                raise DataError(f"source {source.name!r}: {str(err).rstrip('.')}. To skip bad "
                                "records instead, set on_error: skip on this source.") from None
            if sizes:
                stats.bytes_read = min(stats.bytes_read + len(text), read_before + sizes[i])
            if len(text) < max(source.min_chars, 1) or not text.strip():
                stats.skip("empty" if not text.strip() else "shorter than min_chars", where)
                continue
            stats.documents += 1
            if identities is not None:
                identities.append(record_identity(fields, record))
            yield document
        if sizes:
            stats.bytes_read = read_before + sizes[i]


def _readable(name: str, path: Path, records: Iterator[tuple[str, Any]]
              ) -> Iterator[tuple[str, Any]]:
    """A file that fails while being read (a damaged .gz, a permission, an I/O error) is a
    DataError naming it: the whole file is unreadable, so on_error: skip does not apply."""
    try:
        yield from records
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"source {name!r}: {path} could not be read ({type(err).__name__}: "
                        f"{err}). Fix or remove the file, or narrow the source's path.") from None


def _relative(path: Path, base_dir: str | Path) -> str:
    """The path as the recipe names it (relative to its folder when inside it): what a template's
    `{path}` shows and what the fingerprint hashes, so moving the whole project keeps the cache."""
    try:
        return str(path.resolve().relative_to(Path(base_dir).resolve()))
    except ValueError:
        return str(path)


def _reason(message: str) -> str:
    for reason in ("invalid JSON", "not valid UTF-8", "binary file", "is missing",
                   "expected a JSON object", "not text", "above max_chars", "empty completion",
                   "unknown role", "has no role", "has no content", "chat template",
                   "no assistant message"):
        if reason in message:
            return reason
    return "bad record"


def fingerprint_source(source: SourceConfig, base_dir: str | Path, memo_dir: Path | None) -> str:
    """A hash of what the source reads: file contents (memoized by size and mtime; for `hf`, those
    of a local dataset folder or of a builder's data files) and the dataset spec (pin
    `hf.revision` to make a Hub source's fingerprint mean its content)."""
    h = hashlib.sha256()
    if source.hf is not None:
        h.update(json.dumps(dataclasses.asdict(source.hf), sort_keys=True).encode())
        for name in builder_data_files(source, base_dir) or []:
            # The files a builder reads, like a path source's: a shard that changes or shrinks
            # makes a new entry instead of the cache serving its old tokens.
            if "://" not in name:
                h.update(_relative(Path(name), base_dir).encode())
                h.update(_file_digest(Path(name), memo_dir).encode())
        local = Path(base_dir) / source.hf.path
        if local.is_dir():
            for p in sorted(q for q in local.rglob("*") if q.is_file()):
                h.update(str(p.relative_to(local)).encode())
                h.update(_file_digest(p, memo_dir).encode())
        return h.hexdigest()
    for p in expand_paths(source, base_dir):
        h.update(_relative(p, base_dir).encode())
        h.update(_file_digest(p, memo_dir).encode())
    return h.hexdigest()


def source_bytes(source: SourceConfig, base_dir: str | Path) -> int | None:
    """The size on disk of what the source reads, or None when it is not on this machine (a Hub
    dataset): the estimate behind a full cache disk's message."""
    try:
        if source.hf is None:
            return sum(p.stat().st_size for p in expand_paths(source, base_dir))
        files = builder_data_files(source, base_dir)
        if files is not None:
            return sum(Path(f).stat().st_size for f in files if "://" not in f)
        local = Path(base_dir) / source.hf.path
        if local.is_dir():
            return sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    except (OSError, DataError):
        pass
    return None


def _file_digest(path: Path, memo_dir: Path | None) -> str:
    """sha256 of a file's bytes; remembered by (path, size, mtime) so a 100 GB corpus is hashed
    once, not on every run."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / "digests" / key[:2] / key if memo_dir is not None else None
    if memo is not None and memo.exists():
        return memo.read_text()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(digest)
            os.replace(tmp, memo)
        except OSError:
            pass  # the memo only saves time; a read-only cache still works
    return digest
