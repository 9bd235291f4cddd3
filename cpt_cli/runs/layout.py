"""The run directory: where a run lives, its checkpoints, what a resume starts from, and what
`--overwrite` may replace.

    runs/<name>/recipe.yaml  manifest.json  metrics.jsonl  checkpoints/step-000100/  final/
"""

from __future__ import annotations

import re
from pathlib import Path

from cpt_cli.config import Recipe, model_location
from cpt_cli.errors import UsageError
from cpt_cli.runs.lock import LOCK_NAME

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


def run_dir_for(recipe: Recipe, output_dir: str | None) -> Path:
    if output_dir:
        return Path(output_dir)
    if recipe.output_dir:
        return Path(recipe.output_dir) if Path(recipe.output_dir).is_absolute() else \
            Path(recipe.base_dir) / recipe.output_dir
    return Path("runs") / recipe.name


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in step order. A checkpoint is written under a temporary name and renamed
    when complete, so every `step-N` folder is whole."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def is_run_dir(path: Path) -> bool:
    """A folder cpt trained into: what `--overwrite` may replace (never a folder of data, of other
    runs, or the current directory holding the recipe)."""
    return (path / "recipe.yaml").is_file() and (path / CHECKPOINTS).is_dir()


def check_overwrite_keeps_model(recipe: Recipe, run_dir: Path, replacing: bool) -> None:
    """Replacing a run directory that holds the model this recipe starts from would delete it
    before training on it."""
    location = model_location(recipe) if replacing and recipe.model.path else None
    if location and Path(location).exists() and run_dir.exists() and \
            Path(location).resolve().is_relative_to(run_dir.resolve()):
        raise UsageError(f"--overwrite would delete {run_dir}, which holds this recipe's "
                         f"model.path ({location}); train into another --output-dir")


def resume_point(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), or a UsageError when the run
    directory does not allow what was asked (exists without --resume/--overwrite, finished).
    Reads only."""
    if resume not in (None, "auto", "never"):
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise UsageError(f"--resume {resume}: not a complete cpt checkpoint (no "
                             "trainer_state.json); pass a checkpoints/step-N folder or 'auto'")
        return path
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file, not a run directory; pick another --output-dir "
                         "(or output_dir in the recipe)")
    exists = run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir())
    if exists and overwrite and not is_run_dir(run_dir):
        raise UsageError(f"{run_dir} is not a cpt run directory (no recipe.yaml and checkpoints/), "
                         "so --overwrite will not delete it; pick an --output-dir that is new or "
                         "a run directory")
    if resume == "auto":
        # final/eval/report.json is the last file a run writes: with it the run is finished.
        # Without it (killed during the final evaluation) the newest checkpoint is trained on
        # to the end again, which rewrites the same final/.
        if (run_dir / "final" / "eval" / "report.json").is_file() and not overwrite:
            raise UsageError(f"{run_dir} holds a finished run (final/ exists); nothing to "
                             "resume. Use --overwrite to train it again, or another --output-dir.")
        ckpts = complete_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    if exists and not overwrite:
        raise UsageError(f"{run_dir} already exists. Use --resume auto to continue it, "
                         "--overwrite to replace it, or --output-dir for a new one.")
    return None
