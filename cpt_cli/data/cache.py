"""The tokenization cache: each source tokenized once into flat token files, reused everywhere.

Layout of one entry, `<cache>/tokens/<source>-<key>/` (key = hash of the source's content, how text
is extracted, and the tokenizer):

    tokens.bin     every document's tokens back to back (uint16 when the vocabulary fits, else
                   uint32), no separators: EOS is added when packing
    offsets.npy    int64, documents + 1 entries: document i is tokens[offsets[i]:offsets[i+1]]
    hashes.npy     uint64 hash of each document's whitespace-normalized text (holdout, dedup)
    records.npy    uint64 hash of each document's record before templating (the fields its text
                   is made of): what identifies a held-out record under another template
    nbytes.npy     UTF-8 bytes of each document
    pool.jsonl     the documents with the smallest hashes, with their text: the held-out
                   candidates (`holdout_pool_tokens` of them), so holding out never re-reads
    spans.npy      int64 [spans, 2], only for a source with `loss_on: completion|assistant`: the
                   trained tokens as sorted, disjoint [start, end) ranges of positions in
                   tokens.bin, one per completion or assistant turn. 16 bytes a span: for a
                   prompt/completion source of 300-token records, 0.05 bytes a token, under
                   half the 0.125 of a bitmask, and a count of the trained tokens in any
                   range of the stream is two binary searches
    meta.json      counts, skipped records, fingerprints: written last, so its presence means the
                   entry is complete

Entries are built in a temporary folder and renamed into place, so a crash never leaves a
half-written entry that a later run would trust; the builder holds a lock on the folder's
`.owner` file, so the folder of a killed build is known as such and removed by the next prepare.
As in nanoGPT, training reads `tokens.bin` with `np.memmap`: the corpus never has to fit in
memory.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerBase

from cpt_cli.config import SourceConfig
from cpt_cli.data.records import ChatRenderer, Segments, renderer_of
from cpt_cli.data.sources import ReadStats, fingerprint_source, read_segmented, source_bytes
from cpt_cli.errors import DataError

CACHE_VERSION = "cpt-cache-1"
# Text per tokenizer call: large enough that the Rust side keeps every core busy (it splits a
# batch across threads), small enough that memory stays flat (about 4 MB of text in flight).
_BATCH_CHARS = 4_000_000
_FIRST_BATCH_CHARS = 250_000
_BATCH_DOCS = 4096
DEFAULT_POOL_TOKENS = 1_000_000
# The held-out pool's text, at most: 1M tokens of about 4 bytes each.
_POOL_BYTES = 4 * DEFAULT_POOL_TOKENS
_HAS_FLOCK = importlib.util.find_spec("fcntl") is not None  # POSIX; elsewhere no clean-up


def default_cache_dir() -> Path:
    return Path(os.environ.get("CPT_CACHE") or Path.home() / ".cache" / "cpt")  # "" is unset


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 while every id fits (65,536 ids: GPT-2's 50k, Llama 2's 32k), else uint32 (Llama 3's
    128k): half the disk and page cache for most tokenizers."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def document_hash(text: str) -> int:
    """64-bit hash of the text with runs of whitespace collapsed: the identity used for holdout
    selection (stable when documents are added) and for exact-duplicate checks."""
    normalized = " ".join(text.split()).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(normalized, digest_size=8).digest(), "little")


@dataclass
class TokenizedSource:
    """A source in the cache, memory-mapped."""

    name: str
    key: str
    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray
    offsets: np.ndarray
    hashes: np.ndarray
    nbytes: np.ndarray
    records: np.ndarray
    spans: np.ndarray | None = None
    """Trained token ranges [start, end) (loss_on: completion|assistant); None: all trained."""

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def pool(self) -> list[dict[str, Any]]:
        """Held-out candidates: {index, hash, tokens, text}, smallest hash first."""
        with open(self.path / "pool.jsonl", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]


def entry_key(source: SourceConfig, content_fp: str, tokenizer_fp: str,
              chat_template: str | None = None) -> str:
    """The entry's name: what is read, how it becomes documents, and the tokenizer. A task
    source's key also holds its format, fields, loss_on and the chat template that renders it
    (the recipe's or the tokenizer's: the tokenizer fingerprint does not cover its template);
    a text source's key is the one it had before task formats existed."""
    how_fields: dict[str, Any] = {"text_field": source.text_field, "template": source.template,
                                  "min_chars": source.min_chars, "max_chars": source.max_chars,
                                  "on_error": source.on_error}
    if source.format != "text":
        how_fields.update(format=source.format, loss_on=source.loss_on,
                          prompt_field=source.prompt_field,
                          completion_field=source.completion_field,
                          messages_field=source.messages_field, chat_template=chat_template)
    how = json.dumps(how_fields, sort_keys=True)
    return hashlib.sha256(f"{CACHE_VERSION}|{content_fp}|{how}|{tokenizer_fp}".encode()
                          ).hexdigest()[:20]


class DamagedEntry(Exception):
    """A cache entry whose files are unreadable or disagree with each other."""


def open_entry(path: Path, name: str) -> TokenizedSource:
    try:
        meta = json.loads((path / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        n = int(meta["tokens"])
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype=dtype)
        entry = TokenizedSource(name=name, key=path.name, path=path, meta=meta, tokens=tokens,
                                offsets=np.load(path / "offsets.npy"),
                                hashes=np.load(path / "hashes.npy"),
                                nbytes=np.load(path / "nbytes.npy"),
                                # An entry from before records.npy is rebuilt, with the same key.
                                records=np.load(path / "records.npy"),
                                spans=np.load(path / "spans.npy") if meta.get("masked") else None)
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        raise DamagedEntry(f"{path}: {err}") from None
    docs = len(entry.hashes)
    if len(entry.offsets) != docs + 1 or len(entry.nbytes) != docs or \
            len(entry.records) != docs or \
            (docs and int(entry.offsets[-1]) != n):
        raise DamagedEntry(f"{path}: its files disagree on the number of documents")
    if entry.spans is not None and (entry.spans.ndim != 2 or
                                    (len(entry.spans) and int(entry.spans[-1, 1]) > n)):
        raise DamagedEntry(f"{path}: its trained spans lie outside its tokens")
    return entry


def prepare_source(source: SourceConfig, base_dir: str | Path, tokenizer: PreTrainedTokenizerBase,
                   tokenizer_fp: str, cache_dir: Path, *, pool_tokens: int = DEFAULT_POOL_TOKENS,
                   progress: Callable[[int, int, ReadStats], None] | None = None
                   ) -> TokenizedSource:
    """Tokenize `source` into the cache unless an entry with the same key (and a large enough
    held-out pool) is there already. `progress(documents, tokens, read stats)` is called per
    batch."""
    content_fp = fingerprint_source(source, base_dir, cache_dir)
    chat = chat_renderer(source, tokenizer)
    key = entry_key(source, content_fp, tokenizer_fp, chat.template if chat else None)
    target = cache_dir / "tokens" / f"{source.name}-{key}"
    if (target / "meta.json").exists():
        try:
            entry = open_entry(target, source.name)
            if entry.meta["pool_tokens"] >= pool_tokens or entry.meta["pool_complete"]:
                return entry
        except DamagedEntry:
            pass  # a file damaged or removed by hand: the entry is derived data, made again
        shutil.rmtree(target, ignore_errors=True)  # rebuilt below (or with a larger pool)
    elif target.exists():
        # Entries appear by rename with meta.json inside, so a folder without it is debris (a
        # removal cut short, a copy by hand): never trusted, and in the way of the rename.
        shutil.rmtree(target, ignore_errors=True)
    try:
        _build_entry(target, source, base_dir, tokenizer, pool_tokens, progress,
                     content_fp=content_fp, tokenizer_fp=tokenizer_fp, chat=chat)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(_full_disk_message(source, base_dir, cache_dir, err)) from None
    return open_entry(target, source.name)


def _build_entry(target: Path, source: SourceConfig, base_dir: str | Path,
                 tokenizer: PreTrainedTokenizerBase, pool_tokens: int,
                 progress: Callable[[int, int], None] | None, *, content_fp: str,
                 tokenizer_fp: str, chat: ChatRenderer | None = None) -> None:
    """Tokenize into a temporary folder beside `target`, renamed into place when complete: a
    failure (a full disk, a kill) never leaves a half-written entry that a later run trusts."""
    key = target.name.removeprefix(f"{source.name}-")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{source.name}-{key}."))
    owner = None
    try:
        owner = _own(tmp)
        meta = _tokenize_into(tmp, source, base_dir, tokenizer, pool_tokens, progress, chat)
        meta.update(source=source.name, key=key, content_fingerprint=content_fp,
                    tokenizer_fingerprint=tokenizer_fp, version=CACHE_VERSION)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / OWNER).unlink(missing_ok=True)  # not part of the entry; the lock stays held
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (a second node, say) finished the same entry first: use theirs.
            if not (target / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if owner is not None:
            os.close(owner)


def _full_disk_message(source: SourceConfig, base_dir: str | Path, cache_dir: Path,
                       err: OSError) -> str:
    """What a full cache disk needs: the entry's size, estimated from the source's. Token files
    take 0.5 to 1 byte per byte of text (2 or 4 bytes a token, about 4 characters a token), and
    the held-out pool holds up to 4 MB of the text itself: about the source's size, plus the
    pool. (More for a compressed source, whose text is larger than its files.)"""
    size = source_bytes(source, base_dir)
    need = f"about {_bytes(size + min(size, _POOL_BYTES))}" if size is not None else \
        "about as much as the dataset's text (0.5 to 1 byte per byte, plus 4 MB)"
    try:
        free = f"{_bytes(shutil.disk_usage(cache_dir).free)} free"
    except OSError:
        free = "free space unknown"
    return (f"the tokenization cache {cache_dir} is full ({err.strerror or err}) while "
            f"tokenizing source {source.name!r}: its entry needs {need} ({free}); nothing was "
            "kept of it. Free space there, or point data.cache_dir (or $CPT_CACHE) at a disk "
            "with room.")


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.0f} kB"


# How a temporary entry says who builds it: a file inside it, exclusively flock'ed by the
# building process for as long as it writes. The kernel drops the lock when that process dies
# (SIGKILL included), so a lock that can be taken means the builder is gone: unlike a recorded
# pid, it cannot be confused with a later process given the same number.
OWNER = ".owner"


def _own(tmp: Path) -> int | None:
    """Lock `tmp/.owner` (holding this process's id, for a person looking); the descriptor to
    close when done, or None where flock does not exist."""
    if not _HAS_FLOCK:
        return None
    import fcntl

    fd = os.open(tmp / OWNER, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a folder just made: no one else has it
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def remove_stale_temporaries(tokens_dir: Path) -> list[Path]:
    """Remove the temporary folders (`.NAME-KEY.xxxx`) of builds whose process died (a SIGKILL
    during `cpt data prepare` leaves one, as large as the entry was when killed); leave those of
    a live process, and those without an owner file (just made, or by an older cpt). Returns
    what was removed."""
    removed: list[Path] = []
    if not _HAS_FLOCK:
        return removed
    import fcntl

    for folder in tokens_dir.glob(".*"):
        try:
            fd = os.open(folder / OWNER, os.O_RDONLY)
        except OSError:
            continue  # no owner file: being set up, finished, or not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its builder is alive
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def chat_renderer(source: SourceConfig, tokenizer: PreTrainedTokenizerBase
                  ) -> ChatRenderer | None:
    """The renderer of a chat source: its recipe `chat_template`, else the tokenizer's; a
    DataError naming both ways out when there is neither. None for other formats."""
    if source.format != "chat":
        return None
    renderer = renderer_of(tokenizer, source.chat_template)
    if renderer is None:
        raise DataError(f"source {source.name!r}: chat records need a chat template, and the "
                        "tokenizer has none. Give the source one (chat_template: a Jinja "
                        "template over `messages`), or use a tokenizer that has one "
                        "(model.tokenizer).")
    return renderer


def _chars(document: str | Segments) -> int:
    return len(document) if isinstance(document, str) else sum(len(t) for t, _ in document)


def _batches(docs: Iterator[str | Segments]) -> Iterator[list[str | Segments]]:
    """Batches of documents growing 4x from _FIRST_BATCH_CHARS to _BATCH_CHARS: the encoder
    starts after 250k characters are read instead of 4M, so reading the first batch (a serial
    tenth of a second per source) overlaps encoding like every later batch does."""
    batch: list[str | Segments] = []
    chars = 0
    target = min(_FIRST_BATCH_CHARS, _BATCH_CHARS)
    for document in docs:
        batch.append(document)
        chars += _chars(document)
        if chars >= target or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
            target = min(target * 4, _BATCH_CHARS)
    if batch:
        yield batch


class _Encoded(NamedTuple):
    """One batch, tokenized: each document's text, ids, and (masked sources) its trained token
    ranges relative to its first token and its segments (kept for held-out candidates)."""

    texts: list[str]
    ids: list[list[int]]
    spans: list[list[tuple[int, int]]] | None
    segments: list[Segments] | None


def _encode(backend: Any, batch: list[str | Segments], masked: bool) -> _Encoded:
    """Tokenize a batch. encode_batch_fast skips offset tracking; the Rust side releases the
    GIL, so the next batch is read and hashed on the calling thread meanwhile. A task document's
    segments are encoded one by one and their ids joined, so its trained tokens are exactly
    those of its trained segments (cpt_cli/data/records.py)."""
    if all(isinstance(d, str) for d in batch):
        encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
        return _Encoded(batch, [e.ids for e in encodings], None, None)  # type: ignore[arg-type]
    docs: list[Segments] = [[(d, True)] if isinstance(d, str) else d for d in batch]
    flat = backend.encode_batch_fast([t for d in docs for t, _ in d], add_special_tokens=False)
    texts, ids, spans = [], [], []
    k = 0
    for doc in docs:
        doc_ids: list[int] = []
        doc_spans: list[tuple[int, int]] = []
        for _, trained in doc:
            piece = flat[k].ids
            k += 1
            if trained and piece:
                start = len(doc_ids)
                if doc_spans and doc_spans[-1][1] == start:  # adjacent trained segments: one
                    start = doc_spans.pop()[0]
                doc_spans.append((start, len(doc_ids) + len(piece)))
            doc_ids.extend(piece)
        texts.append("".join(t for t, _ in doc))
        ids.append(doc_ids)
        spans.append(doc_spans)
    return _Encoded(texts, ids, spans if masked else None, docs if masked else None)


def _tokenize_into(folder: Path, source: SourceConfig, base_dir: str | Path,
                   tokenizer: PreTrainedTokenizerBase, pool_tokens: int,
                   progress: Callable[[int, int, ReadStats], None] | None,
                   chat: ChatRenderer | None = None) -> dict[str, Any]:
    backend = tokenizer.backend_tokenizer
    dtype = token_dtype(len(tokenizer))
    masked = source.loss_on != "all"
    stats = ReadStats()
    offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    hashes: list[np.ndarray] = []
    nbytes: list[np.ndarray] = []
    records: list[np.ndarray] = []
    spans: list[np.ndarray] = [np.zeros((0, 2), dtype=np.int64)]
    identities: list[int] = []  # read ahead of the batch being written: this one's come first
    # Max-heap (by hash, negated) of the smallest-hash documents: the held-out candidates.
    pool: list[tuple[int, int, int, str, Segments | None]] = []
    pool_total = 0
    total_tokens = 0
    n_docs = 0

    with open(folder / "tokens.bin", "wb") as out, ThreadPoolExecutor(max_workers=1) as pool_ex:
        pending = None
        batches = _batches(read_segmented(source, base_dir, stats, identities, chat))
        while True:
            nxt = next(batches, None)
            future = pool_ex.submit(_encode, backend, nxt, masked) if nxt is not None else None
            if pending is not None:
                batch = pending.result()
                texts, ids = batch.texts, batch.ids
                lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                # chain.from_iterable: 25 ns a token, 40% less than a nested generator; the
                # whole Python side stays under a tenth of the encoder's time (bench/README.md).
                flat = np.fromiter(chain.from_iterable(ids), dtype=dtype,
                                   count=int(lengths.sum()))
                out.write(flat.tobytes())
                starts = total_tokens + np.cumsum(lengths) - lengths
                offsets.append(starts + lengths)
                if batch.spans is not None:
                    spans.append(np.asarray([(int(s) + a, int(s) + b) for s, doc in
                                             zip(starts, batch.spans, strict=True)
                                             for a, b in doc], dtype=np.int64).reshape(-1, 2))
                batch_hashes = np.fromiter((document_hash(t) for t in texts), dtype=np.uint64,
                                           count=len(texts))
                hashes.append(batch_hashes)
                nbytes.append(np.fromiter((len(t.encode("utf-8")) for t in texts),
                                          dtype=np.int64, count=len(texts)))
                records.append(np.asarray(identities[:len(texts)], dtype=np.uint64))
                del identities[:len(texts)]
                for j, text in enumerate(texts):
                    h = int(batch_hashes[j])
                    if pool_total >= pool_tokens and -pool[0][0] < h:
                        continue  # the pool is full and this hash is above all it keeps
                    heapq.heappush(pool, (-h, n_docs + j, int(lengths[j]), text,
                                          batch.segments[j] if batch.segments else None))
                    pool_total += int(lengths[j])
                    while pool and pool_total - pool[0][2] >= pool_tokens:
                        pool_total -= heapq.heappop(pool)[2]
                total_tokens += int(lengths.sum())
                n_docs += len(texts)
                if progress is not None:
                    progress(n_docs, total_tokens, stats)
            if future is None:
                break
            pending = future
    if n_docs == 0:
        skipped = ", ".join(f"{v} {k}" for k, v in stats.skipped.items()) or "none"
        raise DataError(f"source {source.name!r} has no documents (skipped: {skipped}). Check "
                        "its path, text_field and min_chars.")
    np.save(folder / "offsets.npy", np.concatenate(offsets))
    np.save(folder / "hashes.npy", np.concatenate(hashes))
    np.save(folder / "nbytes.npy", np.concatenate(nbytes))
    np.save(folder / "records.npy", np.concatenate(records))
    trained = total_tokens
    if masked:
        all_spans = np.concatenate(spans)
        np.save(folder / "spans.npy", all_spans)
        trained = int((all_spans[:, 1] - all_spans[:, 0]).sum())
    _write_pool(folder / "pool.jsonl", pool)
    return {"documents": n_docs, "tokens": total_tokens, "dtype": np.dtype(dtype).name,
            "skipped": dict(stats.skipped), "first_skipped": stats.first_skipped,
            "pool_tokens": pool_tokens, "masked": masked, "trained_tokens": trained,
            "pool_complete": pool_total >= total_tokens}


def _write_pool(path: Path, pool: list[tuple[int, int, int, str, Segments | None]]) -> None:
    """The held-out candidates, smallest hash first; a masked source's with its segments as
    `[[characters, trained], ...]` (a prompt and its completion, or a conversation's turns:
    lengths into `text`, not a second copy of it), which held-out sets keep as text so that
    scoring knows which part is the answer."""
    with open(path, "w", encoding="utf-8") as fh:
        for neg_h, index, length, text, segments in sorted(pool, key=lambda e: (-e[0], e[1])):
            line: dict[str, Any] = {"index": index, "hash": -neg_h, "tokens": length,
                                    "text": text}
            if segments is not None:
                line["segments"] = [[len(t), trained] for t, trained in segments]
            fh.write(json.dumps(line) + "\n")
