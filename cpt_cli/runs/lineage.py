"""Lineage: the manifest a cpt run leaves in its run directory and in `final/`.

`manifest.json` lists every stage so far (start model, sources with their fingerprints, tokens
trained per source, held-out sets, schedule, where it ran) and every source ever trained on, with
the definition needed to read it again and the file of its held-out documents. A later stage whose
`model.path` is this `final/` reads it to replay that data (`inherit: true`) and to evaluate every
earlier domain on exactly the same held-out text.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_cli.errors import UsageError

FORMAT = "cpt-manifest/1"
MANIFEST = "manifest.json"
HELDOUT_DIR = "heldout"


@dataclass(frozen=True)
class LineageSource:
    """A source of an earlier stage: how to read it and where its held-out texts are."""

    name: str
    config: dict[str, Any]
    base_dir: str
    heldout_file: Path
    stage: int


@dataclass(frozen=True)
class Lineage:
    root: Path                 # the final/ (or checkpoint) folder the manifest was read from
    manifest: dict[str, Any]

    @property
    def sources(self) -> list[LineageSource]:
        return [LineageSource(name=name, config=info["config"], base_dir=info["base_dir"],
                              heldout_file=self.root / info["heldout"]["file"],
                              stage=info["stage"])
                for name, info in self.manifest["sources"].items()]

    @property
    def earlier_definitions(self) -> list[LineageSource]:
        """Sources of earlier stages that a later stage redefined under the same name (other
        files, another text field): no longer read for replay, but trained on all the same."""
        return [LineageSource(name=name, config=old["config"], base_dir=old["base_dir"],
                              heldout_file=self.root / info["heldout"]["file"],
                              stage=old["stage"])
                for name, info in self.manifest["sources"].items()
                for old in info.get("earlier", [])]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.manifest["stages"]


def read_lineage(model_dir: str | Path) -> Lineage | None:
    """The lineage of a cpt-trained model folder, or None for any other model."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT:  # another tool's manifest.json
        return None
    return Lineage(root=Path(model_dir), manifest=manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest.json, or a UsageError saying it is damaged: a model whose lineage cannot be
    read would silently lose its earlier domains (no replay, no forgetting figures)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = str(err)
    else:
        ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT
        if isinstance(manifest, dict) and (not ours or isinstance(manifest.get("stages"), list)):
            return manifest
        problem = "not a complete cpt manifest"
    raise UsageError(f"{path} is damaged ({problem}); restore it from its run directory "
                     "(final/manifest.json, or the copy in each checkpoint)")


def read_heldout(path: Path) -> list[dict[str, Any]]:
    """A held-out set (JSON Lines: text, hash, tokens and record per document; `record`, the
    identity of the record before templating, is absent from sets written before it;
    `segments`, `[[text, answer], ...]`, only in the sets of sources trained on answers)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"held-out set {path} is missing or damaged ({err}); restore the model "
                         "folder's heldout/ from its run directory") from None


def write_heldout(path: Path, docs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def copy_heldout(src_run: Path, dst: Path) -> None:
    """Copy a run's held-out folder into a model folder so that it is self-contained."""
    if (src_run / HELDOUT_DIR).is_dir():
        shutil.copytree(src_run / HELDOUT_DIR, dst / HELDOUT_DIR, dirs_exist_ok=True)


def environment(num_processes: int, device: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from cpt_cli import __version__

    def installed(name: str) -> str | None:
        # From the package metadata: importing `datasets` only for its version cost 0.8 s at
        # every checkpoint-writing start.
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"num_processes": num_processes, "device": device, "python": platform.python_version(),
            "versions": {"cpt": __version__, **{name: installed(name) for name in (
                "torch", "transformers", "accelerate", "datasets", "tokenizers")}}}


def json_safe(value: Any) -> Any:
    """`value` with every float that is not finite as None: JSON has no NaN or Infinity
    (Python would write them, and strict parsers refuse the file)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(payload), indent=2, default=str))
    os.replace(tmp, path)


@dataclass
class DomainText:
    """A domain's held-out texts to score: this stage's sources and every lineage domain."""

    name: str
    role: str              # "target" or "retained"
    texts: list[Any]
    """Each document's text, or a task document's `[text, answer]` segments (scored on its
    answers: a held-out set of a `loss_on: completion|assistant` source)."""

    @property
    def scored_on_answers(self) -> bool:
        return any(not isinstance(t, str) for t in self.texts)


def scored_text(heldout_document: dict[str, Any]) -> Any:
    """What a held-out document is scored on: its segments when it has them (prompt and
    completion, or a conversation's turns, recorded by a masked source), else its text."""
    return heldout_document.get("segments") or heldout_document["text"]
