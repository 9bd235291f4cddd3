"""`cpt eval`: the forgetting table of a checkpoint, a final model, or every checkpoint of a run.

Domains come from the lineage in the model's manifest: the last stage's new sources are target
domains, every other source ever trained on is a retained domain, each scored on its recorded
held-out texts. The start model's figures are read from the run's cache (`eval/start.npz`,
written when training began) or computed once from `--base` and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_cli.config import SourceConfig
from cpt_cli.data.records import (
    ChatRenderer,
    chat_segments,
    prompt_completion_segments,
    renderer_of,
)
from cpt_cli.data.sources import PlainFile, file_records, match_files
from cpt_cli.errors import UsageError
from cpt_cli.evaluation.report import (
    DomainText,
    forgetting_table,
    judge_replay_budget,
    load_scores,
    save_scores,
    score_domains,
)
from cpt_cli.evaluation.scoring import (
    DocumentScores,
    ScoredText,
    default_max_length,
    plain_text,
    resolve_window,
)
from cpt_cli.hostmemory import keep_freed_memory
from cpt_cli.runs.events import read_events
from cpt_cli.runs.layout import CHECKPOINTS, complete_checkpoints
from cpt_cli.runs.lineage import (
    HELDOUT_DIR,
    MANIFEST,
    read_heldout,
    read_manifest,
    scored_text,
)


@dataclass
class EvalTarget:
    model_dir: Path
    step: int | None


def _load(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keeps --json output and logs clean
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, SafetensorError) as err:
        raise UsageError(f"could not load a causal LM and tokenizer from {path}: {err}") from None
    return model.to(device).eval(), tokenizer


def read_text_file(name: str, file: str,
                   chat: Callable[[], ChatRenderer] | None = None) -> list[ScoredText]:
    """Documents of `--data NAME=FILE`, read as a recipe source reads its files: JSON Lines, JSON,
    CSV, Parquet and Arrow records by their `text` field, any other file as one document, `.gz`
    included; FILE may be a glob or a folder. Records with `prompt` and `completion` are scored
    on the completion given the prompt; records with `messages` on the assistant turns, rendered
    with the template `chat()` returns (the evaluated model's)."""
    option = f"--data {name}={file}"
    expanded = os.path.expanduser(file)
    paths = match_files(expanded)
    if not paths:
        raise UsageError(f"{option}: " + ("the folder holds no file" if os.path.isdir(expanded)
                                          else "no such file"))
    texts: list[str] = []
    for path in paths:
        try:
            for where, record in file_records(path, str(path)):
                if isinstance(record, Exception):
                    raise UsageError(f"{option}: {record}")
                texts.append(_scored_record(option, name, file, where, record, chat))
        except (OSError, EOFError, zlib.error) as err:
            raise UsageError(f"{option}: {path} could not be read ({type(err).__name__}: "
                             f"{err})") from None
    if not any(plain_text(t).strip() for t in texts):
        raise UsageError(f"{option}: no text to score (the files hold no documents)")
    return texts


def _scored_record(option: str, name: str, file: str, where: str, record: Any,
                   chat: Callable[[], ChatRenderer] | None) -> ScoredText:
    """One record of --data, its format told by its fields: text, prompt and completion, or
    messages."""
    if isinstance(record, PlainFile):
        return record.text
    fields = set(record) if isinstance(record, dict) else set()
    try:
        if "text" in fields and isinstance(record["text"], str):
            return record["text"]
        if {"prompt", "completion"} <= fields:
            source = SourceConfig(name=name, path=file, format="prompt_completion",
                                  loss_on="completion")
            return [list(s) for s in prompt_completion_segments(source, record, where)]
        if "messages" in fields and chat is not None:
            source = SourceConfig(name=name, path=file, format="chat", loss_on="assistant")
            return [list(s) for s in chat_segments(source, record, where, chat())]
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None
    raise UsageError(f"{option}: {where} is not a record with a 'text' field (scored whole), "
                     "'prompt' and 'completion' (scored on the completion), or 'messages' "
                     "(scored on the assistant turns, with the model's chat template); it has "
                     f"{', '.join(sorted(map(str, fields))) or 'no fields'}")


def _chat_renderer(model_dir: Path) -> Callable[[], ChatRenderer]:
    """The chat template of the evaluated model's tokenizer, loaded when a record needs it."""
    renderer: list[ChatRenderer] = []

    def get() -> ChatRenderer:
        if not renderer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
            made = renderer_of(tok)
            if made is None:
                raise UsageError(f"--data: chat records need a chat template, and the tokenizer "
                                 f"of {model_dir} has none; give the records as 'prompt' and "
                                 "'completion', or 'text'")
            renderer.append(made)
        return renderer[0]
    return get


def _find_run_dir(model_dir: Path) -> Path:
    """The run directory of a final/ or checkpoints/step-N folder (or the folder itself)."""
    if model_dir.parent.name == CHECKPOINTS:
        return model_dir.parent.parent
    if (model_dir.parent / MANIFEST).exists() or (model_dir.parent / HELDOUT_DIR).is_dir():
        return model_dir.parent
    return model_dir


def lineage_domains(model_dir: Path) -> tuple[list[DomainText], dict[str, Any]]:
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(f"{model_dir} has no cpt manifest.json, so its domains are unknown. "
                         "Pass --data NAME=FILE (repeatable) to evaluate explicit texts.")
    manifest = read_manifest(manifest_path)
    if "stages" not in manifest:
        raise UsageError(f"{manifest_path} is not a cpt manifest. Pass --data NAME=FILE "
                         "(repeatable) to evaluate explicit texts.")
    last = manifest["stages"][-1]
    targets = {s["name"] for s in last["sources"] if s["role"] == "new"}
    run_dir = _find_run_dir(model_dir)
    domains = []
    for name in manifest["sources"]:
        for folder in (model_dir / HELDOUT_DIR, run_dir / HELDOUT_DIR):
            if (folder / f"{name}.jsonl").is_file():
                texts = [scored_text(d) for d in read_heldout(folder / f"{name}.jsonl")]
                break
        else:
            raise UsageError(f"held-out set of domain {name!r} not found next to {model_dir}")
        if texts:  # empty when all of it was trained on (training warned): nothing to score
            domains.append(DomainText(name, "target" if name in targets else "retained", texts))
    # Targets first, then retained domains, as in every report.
    domains.sort(key=lambda d: d.role != "target")
    return domains, manifest


def _targets(path: Path) -> list[EvalTarget]:
    """The models to score: a model folder, or a run directory's checkpoints then final/."""
    if (path / "config.json").is_file():
        return [EvalTarget(path, None)]
    if not ((path / CHECKPOINTS).is_dir() or (path / "final").is_dir()):
        raise UsageError(f"{path} is neither a model folder (config.json) nor a cpt run "
                         "directory (checkpoints/, final/)")
    targets = [EvalTarget(p, int(p.name.split("-")[1])) for p in complete_checkpoints(path)]
    if (path / "final").is_dir():
        targets.append(EvalTarget(path / "final", None))
    if not targets:
        raise UsageError(f"{path} is a run directory without checkpoints or final/")
    return targets


def _domains(last: Path, data: dict[str, str] | None
             ) -> tuple[list[DomainText], dict[str, Any] | None]:
    """The held-out texts: `--data` files (a domain the run trained on is its target), else
    every domain of the model's lineage; with the model's manifest when it has one."""
    if not data:
        return lineage_domains(last)
    domains = [DomainText(n, "retained", read_text_file(n, f, _chat_renderer(last)))
               for n, f in data.items()]
    manifest = read_manifest(last / MANIFEST) if (last / MANIFEST).is_file() else None
    if manifest and manifest.get("stages"):
        new = {s["name"] for s in manifest["stages"][-1]["sources"] if s["role"] == "new"}
        for d in domains:
            d.role = "target" if d.name in new else "retained"
    return domains, manifest


def _add_peak(report: dict[str, Any], curve: list[dict[str, Any]],
              run_peak: float | None) -> None:
    """The worst retained forgetting over the models scored and training's own evaluations."""
    peak = run_peak
    for point in curve:
        for d in point["domains"].values():
            if d["role"] == "retained" and d["delta_bpb"] is not None:
                peak = d["delta_bpb"] if peak is None else max(peak, d["delta_bpb"])
    if peak is None:
        return
    worst = report["summary"]["max_forgetting_bpb"]
    report["summary"]["peak_forgetting_bpb"] = max(peak, worst) if worst is not None else peak
    # What the peak was seen in: the verdict says "during training" only of training's own
    # evaluations, never of a model scored now on --data or against --base.
    report["summary"]["peak_forgetting_from"] = "training" if run_peak is not None \
        else "checkpoints" if len(curve) > 1 else "model"


def evaluate(path: str | Path, *, data: dict[str, str] | None = None, base: str | None = None,
             batch_tokens: int = 4096, bootstrap_samples: int = 1000,
             device: str | None = None, lm_eval_tasks: list[str] | None = None,
             lm_eval_include: str | None = None, lm_eval_limit: int | None = None,
             max_length: int | None = None, stride: int | str | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The forgetting report of `path` (see `forgetting_table`), plus `curve` for a run dir.

    Documents are scored in windows of `max_length` tokens (default: see `eval_window`) that
    advance by `stride` (default: half a window; "disjoint": a whole one, as lm-eval does).
    `progress(model, tokens scored, tokens in all)` follows each model's scoring."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist: pass a final/ folder, a checkpoint, or a run "
                         "directory")
    keep_freed_memory()  # no page faults on each batch's re-touched logits (see hostmemory)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # On GPU score in bf16 autocast over fp32 weights; log-softmax is taken in fp32 either way.
    autocast = torch.bfloat16 if dev.type == "cuda" else None

    targets = _targets(path)
    last = targets[-1].model_dir
    domains, manifest = _domains(last, data)
    roles = {d.name: d.role for d in domains}

    window = eval_window(last, manifest, max_length, stride)
    scoring = {"batch_tokens": batch_tokens, "autocast_dtype": autocast,
               "max_length": window[0], "stride": window[1]}
    start_scores = _start_scores(last, domains, base, bool(data), dev, scoring, progress)
    curve: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for target in targets:
        model, tokenizer = _load(target.model_dir, dev, torch.float32)
        scores = score_domains(model, tokenizer, domains, **scoring,
                               progress=_named(progress, str(target.model_dir)))
        del model
        is_last = target is targets[-1]
        report = forgetting_table(scores, start_scores, roles,
                                  bootstrap_samples=bootstrap_samples if is_last else 0,
                                  answers={d.name for d in domains if d.scored_on_answers})
        curve.append({"step": target.step, "model": str(target.model_dir),
                      "domains": {d["name"]: {"bpb": d["bpb"], "delta_bpb": d.get("delta_bpb"),
                                              "role": d["role"]} for d in report["domains"]}})
    # The peak the evaluations during training saw, on the same held-out sets and start model
    # (not comparable with --data or --base figures).
    _add_peak(report, curve, _training_peak(last) if not data and base is None else None)
    if not data and base is None and manifest and manifest.get("stages"):
        control = manifest["stages"][-1].get("replay_control")
        judge_replay_budget(report, control["budget_bpb"] if control else None)
    report["model"] = str(last)
    report["window"] = {"max_length": window[0], "stride": window[1]}
    report["start"] = base or (manifest["stages"][-1]["start_model"] if manifest else None)
    if lm_eval_tasks:
        report["downstream"] = _downstream(last, report["start"], lm_eval_tasks,
                                           lm_eval_include, lm_eval_limit, dev)
    if len(targets) > 1:
        report["curve"] = curve
    return report


def _downstream(model_dir: Path, start: str | None, tasks: list[str], include: str | None,
                limit: int | None, dev: torch.device) -> list[dict[str, Any]]:
    """lm-eval tasks on the model and, when it can be loaded, on its start model."""
    from cpt_cli.evaluation import downstream

    downstream.check_available()
    model, tokenizer = _load(model_dir, dev, torch.float32)
    now = downstream.run_tasks(model, tokenizer, tasks, include_path=include, limit=limit)
    before = None
    if start is not None and (Path(start).exists() or not start.startswith((".", "/"))):
        try:
            model, tokenizer = _load(start, dev, torch.float32)
        except UsageError:
            model = None
        if model is not None:
            before = downstream.run_tasks(model, tokenizer, tasks, include_path=include,
                                          limit=limit)
    return downstream.compare(now, before)


def eval_window(model_dir: Path, manifest: dict[str, Any] | None, max_length: int | None,
                stride: int | str | None) -> tuple[int, int]:
    """(max_length, stride) of the scoring windows. The window defaults to what the start
    model's cached figures were scored with (training's `eval.max_length`), else the context the
    model was trained on (the manifest's last `data.seq_len`), else the model's context capped
    at `scoring.DEFAULT_MAX_LENGTH`; a window past the model's context is refused."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        config = None  # loading the model says what is wrong with it
    context = getattr(config, "max_position_embeddings", None)
    if max_length is None:
        cached = _cached_start_window(model_dir)
        if cached is not None and stride is None:
            return cached
        stages = (manifest or {}).get("stages") or [{}]
        max_length = cached[0] if cached else stages[-1].get("seq_len") or \
            default_max_length(config)
    if context is not None and max_length > context:
        raise UsageError(f"--max-length {max_length}: above the model's context of {context} "
                         f"tokens; pass at most {context}")
    try:
        return resolve_window(int(max_length), stride)
    except ValueError as err:
        raise UsageError(f"--stride {stride}: {err}") from None


def _cached_start_window(model_dir: Path) -> tuple[int, int] | None:
    run_dir = _find_run_dir(model_dir)
    for cached in (model_dir / "eval" / "start.npz", run_dir / "eval" / "start.npz"):
        if cached.is_file():
            windows = {s.window for s in load_scores(cached).values()}
            return windows.pop() if len(windows) == 1 else None
    return None


def _named(progress: Callable[[str, int, int], None] | None, name: str
           ) -> Callable[[str, int, int], None] | None:
    """`progress` that names the model being scored rather than the domain."""
    if progress is None:
        return None
    return lambda _domain, done, total: progress(name, done, total)


def _training_peak(model_dir: Path) -> float | None:
    """Peak forgetting seen by the evaluations during training (metrics.jsonl)."""
    metrics = _find_run_dir(model_dir) / "metrics.jsonl"
    if not metrics.is_file():
        # A final/ folder copied without its run: the figure its training wrote.
        written = model_dir / "eval" / "report.json"
        if written.is_file():
            try:
                return json.loads(written.read_text())["summary"].get("peak_forgetting_bpb")
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return None
    peak = None
    for event in read_events(metrics):
        if event.get("event") != "eval":
            continue
        for d in event["domains"].values():
            if d.get("role") == "retained" and d.get("delta_bpb") is not None:
                peak = d["delta_bpb"] if peak is None else max(peak, d["delta_bpb"])
    return peak


def _model_identity(base: str) -> Any:
    """What the cached scores of `--base` belong to: a local folder by its absolute path and its
    weight files' sizes and modification times (a model retrained in place scores anew), a Hub
    id by itself."""
    local = Path(base).expanduser()
    if not local.is_dir():
        return base
    files = sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin"))
    return [str(local.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                   for f in files]]


def _start_scores(model_dir: Path, domains: list[DomainText], base: str | None, explicit: bool,
                  dev: torch.device, scoring: dict[str, Any],
                  progress: Callable[[str, int, int], None] | None,
                  ) -> dict[str, DocumentScores] | None:
    run_dir = _find_run_dir(model_dir)
    window = (scoring["max_length"], scoring["stride"])
    if base is None and not explicit:
        for cached in (model_dir / "eval" / "start.npz", run_dir / "eval" / "start.npz"):
            if cached.is_file():
                scores = load_scores(cached)
                if all(d.name in scores and len(scores[d.name]) == len(d.texts)
                       for d in domains):
                    _check_same_window(scores, window)
                    return scores
        return None
    if base is None:
        return None
    key = hashlib.sha256(json.dumps([_model_identity(base), list(window),
                                     [(d.name, d.texts) for d in domains]]).encode())
    cache = run_dir / "eval" / f"base-{key.hexdigest()[:16]}.npz"
    if cache.is_file():
        return load_scores(cache)
    try:
        model, tokenizer = _load(base, dev, torch.float32)
    except UsageError as err:
        raise UsageError(f"--base {base}: {err}. Pass the start model's folder or Hub id."
                         ) from None
    scores = score_domains(model, tokenizer, domains, **scoring,
                           progress=_named(progress, f"{base} (start)"))
    if run_dir.is_dir() and (run_dir / MANIFEST).exists():
        try:
            save_scores(cache, scores)
        except OSError:
            pass  # a read-only run directory still evaluates
    return scores


def _check_same_window(scores: dict[str, DocumentScores], window: tuple[int, int]) -> None:
    """Figures scored in other windows do not compare: a shorter window gives less context."""
    cached = {s.window for s in scores.values()} - {None}
    if cached and cached != {window}:
        length, stride = cached.pop()
        raise UsageError(f"the start model was scored in windows of {length} tokens (stride "
                         f"{stride}) during training, not {window[0]} (stride {window[1]}): "
                         "leave out --max-length and --stride, or pass --base START_MODEL to "
                         "score the start model again in these windows")
