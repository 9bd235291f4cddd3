"""Build the three-domain quickstart corpus from the running Python installation.

The quickstart demo shows that continued pre-training with replay forgets less than
plain fine-tuning. That needs several domains of *real* text, and it must run offline on
a laptop with nothing to download. Every CPython installation already carries enough:

* ``code``  -- standard-library source files, chunked at top-level ``def``/``class``
  boundaries (or blank lines) into documents of at most ~4,000 characters;
* ``prose`` -- English docstrings of stdlib modules, classes and functions (read with
  :mod:`ast`, never imported) plus the language-reference topics in
  :mod:`pydoc_data.topics`;
* ``qa``    -- question/answer pairs made from public function signatures and the first
  paragraph of their docstrings (at least ``MIN_ANSWER_CHARS`` characters: never an empty
  completion, which the quickstart's ``format: prompt_completion`` source would refuse).

The output depends only on the Python version, so it is byte-identical on every build and
is stamped in ``corpus.json``; a later build with a matching stamp is skipped.

Usage::

    python -m cpt_cli.data.corpus data/quickstart
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import random
import re
import sysconfig
import tempfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

__all__ = ["BUILDER_VERSION", "DOMAINS", "build_quickstart_corpus", "main"]

# Bump whenever the output for a given Python version changes, so stale corpora rebuild.
BUILDER_VERSION = 1
DOMAINS = ("code", "prose", "qa")
STAMP_FILE = "corpus.json"
_T = TypeVar("_T")

MAX_CHUNK_CHARS = 4_000
MIN_CHUNK_CHARS = 200
MIN_DOCSTRING_CHARS = 200
MIN_ANSWER_CHARS = 40
# The stdlib holds ~12 MB of eligible source; more code than this would only dwarf the
# other domains and slow the demo down.
MAX_CODE_CHARS = 6_000_000
SHUFFLE_SEED = 0

# Tests, vendored wheels, demos and the deprecated lib2to3 grammar are not representative
# library code (test suites in particular are huge and repetitive).
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "lib2to3",
        "site-packages",
        "__pycache__",
        "ensurepip",
        "turtledemo",
    }
)
_TOP_LEVEL_DEF = re.compile(r"(?:async\s+def|def|class)\s")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")

_QUESTION_TEMPLATES = (
    "What does `{}` do?",
    "Explain the purpose of `{}`.",
    "How is `{}` used?",
    "What is `{}` for?",
    "Describe what `{}` does.",
)


@dataclass
class _Pools:
    """Candidate documents per domain, deduplicated, in discovery order."""

    code: list[str] = field(default_factory=list)
    prose: list[str] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)
    code_chars: int = 0
    _seen: set[str] = field(default_factory=set)

    def add_text(self, pool: list[str], text: str) -> bool:
        # Identical chunks occur (copied helpers, boilerplate headers); keeping one avoids
        # training on exact duplicates, and checking across domains keeps them disjoint.
        if text in self._seen:
            return False
        self._seen.add(text)
        pool.append(text)
        return True

    def add_qa(self, question: str, answer: str) -> None:
        key = "\0qa\0" + question
        if key not in self._seen:
            self._seen.add(key)
            self.qa.append((question, answer))


# --------------------------------------------------------------------------- chunking


def _hard_split(text: str, limit: int) -> list[str]:
    """Split at line ends, falling back to fixed-size slices for overlong lines."""
    pieces: list[str] = []
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            pieces.append(line[:limit])
            line = line[limit:]
        pieces.append(line)
    return pieces


def _split_blank_lines(text: str, limit: int) -> list[str]:
    """Split ``text`` at blank lines into pieces of at most ``limit`` characters."""
    pieces: list[str] = []
    start = 0
    for match in _BLANK_LINES.finditer(text):
        pieces.append(text[start : match.start() + 1])
        start = match.start() + 1
    pieces.append(text[start:])
    out: list[str] = []
    for piece in pieces:
        out.extend(_hard_split(piece, limit) if len(piece) > limit else [piece])
    return out


def _pack(pieces: Iterable[str], limit: int) -> list[str]:
    """Greedily join consecutive pieces into chunks of at most ``limit`` characters."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(piece) > limit:
            chunks.append(current)
            current = ""
        current += piece
    if current:
        chunks.append(current)
    return chunks


def _keep(chunks: Iterable[str], min_chars: int) -> list[str]:
    """Trim surrounding blank lines and drop chunks too short to be useful documents."""
    kept = []
    for chunk in chunks:
        chunk = chunk.strip("\n").rstrip()
        if len(chunk.strip()) >= min_chars:
            kept.append(chunk)
    return kept


def chunk_source(source: str, limit: int = MAX_CHUNK_CHARS) -> list[str]:
    """Cut a Python source file into chunks at top-level ``def``/``class`` boundaries.

    A decorator stays with the definition it decorates. Definitions longer than ``limit``
    are cut further at blank lines, then at line ends.
    """
    lines = source.splitlines(keepends=True)
    segments: list[str] = []
    current: list[str] = []
    previous = ""
    for line in lines:
        starts_definition = _TOP_LEVEL_DEF.match(line) is not None or line.startswith("@")
        if starts_definition and current and not previous.startswith("@"):
            segments.append("".join(current))
            current = []
        current.append(line)
        if line.strip():
            previous = line
    if current:
        segments.append("".join(current))

    pieces: list[str] = []
    for segment in segments:
        pieces.extend(_split_blank_lines(segment, limit) if len(segment) > limit else [segment])
    return _keep(_pack(pieces, limit), MIN_CHUNK_CHARS)


def chunk_prose(text: str, limit: int = MAX_CHUNK_CHARS) -> list[str]:
    """Cut prose into groups of whole paragraphs of at most ``limit`` characters."""
    if len(text) <= limit:
        return _keep([text], MIN_CHUNK_CHARS)
    return _keep(_pack(_split_blank_lines(text, limit), limit), MIN_CHUNK_CHARS)


# ------------------------------------------------------------------------ extraction


def stdlib_sources(stdlib: Path | None = None) -> list[Path]:
    """All eligible ``*.py`` files of the standard library, in sorted order."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; sorting makes the walk stable.
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    return files


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _signature(func: ast.FunctionDef | ast.AsyncFunctionDef, *, is_method: bool) -> str:
    args = func.args
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    rendered: list[str] = []
    for index, arg in enumerate(positional):
        rendered.append(arg.arg + ("=..." if index >= first_default else ""))
        if args.posonlyargs and index == len(args.posonlyargs) - 1:
            rendered.append("/")
    if args.vararg is not None:
        rendered.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        rendered.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        rendered.append(arg.arg + ("=..." if default is not None else ""))
    if args.kwarg is not None:
        rendered.append("**" + args.kwarg.arg)
    # The receiver is implied by the dotted name, and questions read better without it.
    if is_method and rendered and rendered[0].split("=")[0] in {"self", "cls"}:
        rendered.pop(0)
        if rendered and rendered[0] == "/":
            rendered.pop(0)
    return "(" + ", ".join(rendered) + ")"


def _first_paragraph(docstring: str) -> str:
    return " ".join(_BLANK_LINES.split(docstring.strip(), maxsplit=1)[0].split())


def _question(qualname: str) -> str:
    # crc32 rather than hash(): stable across processes and independent of walk order.
    template = _QUESTION_TEMPLATES[zlib.crc32(qualname.encode()) % len(_QUESTION_TEMPLATES)]
    return template.format(qualname)


def _call_signature(node: ast.ClassDef) -> str:
    # A class is called through __init__; without one its signature is inherited and
    # unknown to ast, so the bare class name is asked about instead.
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            return _signature(item, is_method=True)
    return ""


_Documented = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _qa_pairs(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """Question/answer pairs for public top-level functions, classes and methods."""
    # (dotted name with call signature, node whose docstring answers the question)
    targets: list[tuple[str, _Documented]] = []
    for node in tree.body:
        if not isinstance(node, _Documented) or node.name.startswith("_"):
            continue
        if isinstance(node, ast.ClassDef):
            targets.append((f"{module}.{node.name}{_call_signature(node)}", node))
            for item in node.body:
                if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                if not item.name.startswith("_"):
                    signature = _signature(item, is_method=True)
                    targets.append((f"{module}.{node.name}.{item.name}{signature}", item))
        else:
            targets.append((f"{module}.{node.name}{_signature(node, is_method=False)}", node))
    for name, node in targets:
        docstring = ast.get_docstring(node)
        answer = _first_paragraph(docstring) if docstring else ""
        if len(answer) >= MIN_ANSWER_CHARS:
            yield _question(name), answer


def _docstrings(tree: ast.Module) -> Iterator[str]:
    for node in _statements(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
                yield docstring


def _statements(tree: ast.Module) -> Iterator[ast.AST]:
    """`ast.walk`'s breadth-first order without descending into expressions: a docstring's
    owner (module, class, function) is never inside one, so the owners come in the same order,
    at a small fraction of the nodes visited (most of a module's nodes are expressions)."""
    todo = deque([tree])
    while todo:
        node = todo.popleft()
        todo.extend(child for child in ast.iter_child_nodes(node)
                    if not isinstance(child, ast.expr))
        yield node


def _topic_texts() -> list[str]:
    # A plain data module shipped with CPython for pydoc; importing it runs no library code.
    from pydoc_data.topics import topics

    chunks: list[str] = []
    for name in sorted(topics):
        chunks.extend(chunk_prose(topics[name].strip()))
    return chunks


def _spread_order(files: list[Path]) -> list[Path]:
    """A fixed permutation of the sorted files, so any prefix covers the whole stdlib."""
    order = list(files)
    random.Random(SHUFFLE_SEED).shuffle(order)
    return order


def _collect(max_documents: int | None) -> _Pools:
    root = Path(sysconfig.get_paths()["stdlib"])
    pools = _Pools()
    for text in _topic_texts():
        pools.add_text(pools.prose, text)

    def enough() -> bool:
        if max_documents is None:
            return False
        return min(len(pools.code), len(pools.prose), len(pools.qa)) >= max_documents

    files = _spread_order(stdlib_sources(root))
    total_source = sum(path.stat().st_size for path in files)
    # Taking the whole of a fraction of the files keeps modules intact while staying
    # near the code budget; the spread order makes that fraction span the stdlib.
    code_file_budget = math.ceil(len(files) * min(1.0, MAX_CODE_CHARS / max(total_source, 1)))
    for index, path in enumerate(files):
        if enough():
            break
        try:
            source = path.read_bytes().decode("utf-8")
            tree = ast.parse(source, filename=str(path))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if index < code_file_budget or max_documents is not None:
            for chunk in chunk_source(source):
                if pools.code_chars + len(chunk) > MAX_CODE_CHARS:
                    break
                if pools.add_text(pools.code, chunk):
                    pools.code_chars += len(chunk)
        for docstring in _docstrings(tree):
            for chunk in chunk_prose(docstring):
                pools.add_text(pools.prose, chunk)
        for question, answer in _qa_pairs(tree, _module_name(path, root)):
            pools.add_qa(question, answer)
    return pools


# --------------------------------------------------------------------------- writing


def _stamp(max_documents: int | None) -> dict[str, object]:
    return {
        "builder_version": BUILDER_VERSION,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "max_documents": max_documents,
    }


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    # A crash mid-write must never leave a truncated file under the final name.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for line in lines:
                handle.write(line)
                handle.write("\n")
        # mkstemp creates the file private (0600); the corpus is ordinary shared data.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_manifest(out_dir: Path) -> dict[str, object] | None:
    try:
        manifest = json.loads((out_dir / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _shuffled(items: list[_T], max_documents: int | None) -> list[_T]:
    # Shuffling makes any prefix of a file a representative sample of the domain.
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items if max_documents is None else items[:max_documents]


def build_quickstart_corpus(
    out_dir: str | Path, *, max_documents: int | None = None, force: bool = False
) -> dict[str, Path]:
    """Write ``code.jsonl``, ``prose.jsonl`` and ``qa.jsonl`` under ``out_dir``.

    Each line is one JSON object: ``{"text": ...}`` for code and prose, ``{"question": ...,
    "answer": ...}`` for qa. The output is deterministic (byte-identical on the same
    Python), each file is written atomically, and ``corpus.json`` records per-domain
    counts plus a stamp (builder version, Python version, ``max_documents``). When the
    files exist with a matching stamp the build is skipped unless ``force`` is true.

    ``max_documents`` caps each domain's document count and stops scanning the stdlib
    early, which keeps small builds (tests, smoke runs) fast.

    Returns ``{domain: path}``.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive, got {max_documents}")
    out = Path(out_dir)
    paths = {domain: out / f"{domain}.jsonl" for domain in DOMAINS}
    stamp = _stamp(max_documents)
    manifest = _read_manifest(out)
    if (
        not force
        and manifest is not None
        and manifest.get("stamp") == stamp
        and all(path.is_file() for path in paths.values())
    ):
        return paths

    out.mkdir(parents=True, exist_ok=True)
    pools = _collect(max_documents)
    records: dict[str, list[dict[str, str]]] = {
        "code": [{"text": text} for text in _shuffled(pools.code, max_documents)],
        "prose": [{"text": text} for text in _shuffled(pools.prose, max_documents)],
        "qa": [
            {"question": question, "answer": answer}
            for question, answer in _shuffled(pools.qa, max_documents)
        ],
    }
    counts: dict[str, dict[str, int]] = {}
    for domain, rows in records.items():
        _write_atomic(paths[domain], (json.dumps(row, ensure_ascii=False) for row in rows))
        counts[domain] = {
            "documents": len(rows),
            "characters": sum(len(value) for row in rows for value in row.values()),
        }
    # The stamp goes last: its presence certifies that every data file is complete.
    manifest_text = json.dumps({"stamp": stamp, "domains": counts}, indent=2, sort_keys=True)
    _write_atomic(out / STAMP_FILE, [manifest_text])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cpt_cli.data.corpus",
        description="Build the offline quickstart corpus (code, prose, qa) from the stdlib.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the .jsonl files into")
    parser.add_argument("--max-documents", type=int, default=None, help="cap per domain")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    paths = build_quickstart_corpus(
        args.out_dir, max_documents=args.max_documents, force=args.force
    )
    manifest = _read_manifest(args.out_dir) or {}
    domains = manifest.get("domains")
    if not isinstance(domains, dict):
        domains = {}
    for domain, path in paths.items():
        count = domains.get(domain, {})
        print(
            f"{domain}: {count.get('documents', 0):,} documents, "
            f"{count.get('characters', 0):,} characters -> {path}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
