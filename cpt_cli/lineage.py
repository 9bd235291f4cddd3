"""Lineage: the manifest a cpt run leaves in its run directory and in `final/`.

`manifest.json` lists every stage so far (start model, sources with their fingerprints, tokens
trained per source, held-out sets, schedule, where it ran) and every source ever trained on, with
the definition needed to read it again and the file of its held-out documents. A later stage whose
`model.path` is this `final/` reads it to replay that data (`inherit: true`) and to evaluate every
earlier domain on exactly the same held-out text.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    def stages(self) -> list[dict[str, Any]]:
        return self.manifest["stages"]


def read_lineage(model_dir: str | Path) -> Lineage | None:
    """The lineage of a cpt-trained model folder, or None for any other model."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return Lineage(root=Path(model_dir), manifest=manifest)


def read_heldout(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


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


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
