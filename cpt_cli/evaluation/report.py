"""The forgetting table: per-domain metrics of a model against its starting model.

For each domain: loss (nats per token), ppl, bpb (bits per UTF-8 byte: comparable across
tokenizers, the headline), delta_bpb = bpb(now) - bpb(start), with a paired bootstrap 95% interval
over documents. Target domains (this stage's new sources) report gain = -delta_bpb; retained
domains (replay and every earlier stage) report forgetting = delta_bpb.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpt_cli.errors import RecipeError
from cpt_cli.evaluation.scoring import (
    DocumentScores,
    bootstrap_delta_bpb,
    plain_text,
    score_documents,
)
from cpt_cli.runs.lineage import DomainText


def score_domains(model: Any, tokenizer: Any, domains: Sequence[DomainText], *,
                  batch_tokens: int = 16384, autocast_dtype: Any = None,
                  max_length: int | None = None, stride: int | str | None = None,
                  progress: Callable[[str, int, int], None] | None = None,
                  ) -> dict[str, DocumentScores]:
    """Every domain's per-document scores; ``progress(domain, tokens scored, tokens in all)``
    after each batch."""
    was_training = model.training
    total = 0
    if progress is not None:
        total = sum(len(ids) for d in domains for ids in tokenizer(
            [plain_text(t) for t in d.texts], add_special_tokens=False,
            verbose=False)["input_ids"])
    done = 0

    def step(name: str) -> Callable[[int], None] | None:
        if progress is None:
            return None

        def report(tokens: int) -> None:
            nonlocal done
            done += tokens
            progress(name, done, total)
        return report

    try:
        return {d.name: score_documents(model, tokenizer, d.texts, batch_tokens=batch_tokens,
                                        autocast_dtype=autocast_dtype, max_length=max_length,
                                        stride=stride, progress=step(d.name))
                for d in domains}
    finally:
        model.train(was_training)


def training_window(max_length: int | None, seq_len: int, context: int | None) -> int:
    """The evaluation window of a training run: `eval.max_length`, by default `data.seq_len`,
    the context it trains (longer windows score tokens at positions it never trained)."""
    if max_length is None:
        return seq_len
    if max_length < 1:
        raise RecipeError(f"eval.max_length: {max_length} must be positive (e.g. {seq_len}, "
                          "data.seq_len), or null for data.seq_len")
    if context is not None and max_length > context:
        raise RecipeError(f"eval.max_length: {max_length} is above the model's context of "
                          f"{context} tokens; lower it to at most {context}, or null for "
                          f"data.seq_len ({seq_len})")
    return max_length


def save_scores(path: Path, scores: dict[str, DocumentScores]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, s in scores.items():
        arrays[f"{name}/nll"], arrays[f"{name}/tokens"], arrays[f"{name}/bytes"] = \
            s.nll, s.tokens, s.bytes
        if s.window is not None:
            arrays[f"{name}/window"] = np.asarray(s.window, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_scores(path: Path) -> dict[str, DocumentScores]:
    with np.load(path) as data:
        names = sorted({k.rsplit("/", 1)[0] for k in data.files})
        return {n: DocumentScores(nll=data[f"{n}/nll"], tokens=data[f"{n}/tokens"],
                                  bytes=data[f"{n}/bytes"],
                                  window=tuple(int(x) for x in data[f"{n}/window"])
                                  if f"{n}/window" in data.files else None)  # type: ignore[arg-type]
                for n in names}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def forgetting_table(now: dict[str, DocumentScores], start: dict[str, DocumentScores] | None,
                     roles: dict[str, str], *, bootstrap_samples: int = 1000,
                     peak_forgetting: float | None = None,
                     answers: Collection[str] = ()) -> dict[str, Any]:
    """The report behind `cpt eval --json`: domains (in `roles` order) and a summary. A domain
    in `answers` is scored on its answers (`scored_on: answers`), every other on its whole text
    (`scored_on: text`)."""
    domains: list[dict[str, Any]] = []
    for name, role in roles.items():
        if name not in now:
            continue
        m = now[name].totals()
        row: dict[str, Any] = {"name": name, "role": role, "documents": int(len(now[name].nll)),
                               "tokens": m.tokens, "bytes": m.bytes, "loss": m.loss,
                               "ppl": _finite(m.ppl), "bpb": m.bpb,
                               "scored_on": "answers" if name in answers else "text"}
        if start is not None and name in start:
            s = start[name].totals()
            delta = m.bpb - s.bpb
            row.update(start_loss=s.loss, start_bpb=s.bpb, delta_bpb=delta,
                       relative_change=delta / s.bpb if s.bpb else None)
            if bootstrap_samples > 0 and len(now[name].nll) > 1:
                lo, hi = bootstrap_delta_bpb(now[name], start[name], samples=bootstrap_samples)
                row.update(ci_low=lo, ci_high=hi, significant=not (lo <= 0.0 <= hi))
            else:
                row.update(ci_low=None, ci_high=None, significant=None)
            if role == "target":
                row["gain"] = -delta
            else:
                row["forgetting"] = delta
        domains.append(row)
    gains = [d["gain"] for d in domains if "gain" in d]
    forgets = [d["forgetting"] for d in domains if "forgetting" in d]
    worst = max(forgets) if forgets else None
    summary = {"mean_gain_bpb": float(np.mean(gains)) if gains else None,
               "mean_forgetting_bpb": float(np.mean(forgets)) if forgets else None,
               "max_forgetting_bpb": worst,
               "worst_forgetting_domain": max((d for d in domains if "forgetting" in d),
                                              key=lambda d: d["forgetting"])["name"]
               if forgets else None,
               "peak_forgetting_bpb": max(x for x in (peak_forgetting, worst) if x is not None)
               if (peak_forgetting is not None or worst is not None) else None,
               "peak_forgetting_from": "training" if peak_forgetting is not None
               else "model" if worst is not None else None}
    return {"domains": domains, "summary": summary}


def judge_replay_budget(report: dict[str, Any], budget: float | None) -> None:
    """Under data.replay.ratio: auto, whether the budget held: the final point estimate of every
    retained domain's delta_bpb at most `budget` (docs/replay-control.md; the peak during
    training may pass it for an interval). Adds `replay_budget_bpb` and `replay_budget_held`
    (None without a retained figure) to the summary."""
    if budget is None:
        return
    worst = report["summary"]["max_forgetting_bpb"]
    report["summary"].update(replay_budget_bpb=budget,
                             replay_budget_held=None if worst is None else worst <= budget)


def replay_budget_line(report: dict[str, Any]) -> str | None:
    """The final table's line on closed-loop replay's budget, or None for a fixed ratio."""
    s = report["summary"]
    budget = s.get("replay_budget_bpb")
    if budget is None:
        return None
    if s.get("replay_budget_held") is None:
        return f"replay budget {budget:.4f} bpb (ratio: auto): no retained domain to judge it"
    worst = f"worst retained {s['worst_forgetting_domain']} {s['max_forgetting_bpb']:+.4f}"
    peak = s.get("peak_forgetting_bpb")
    during = f", peak during training {peak:+.4f}" \
        if peak is not None and s.get("peak_forgetting_from") == "training" else ""
    verdict_word = "held" if s["replay_budget_held"] else "EXCEEDED"
    return f"replay budget {budget:.4f} bpb (ratio: auto) {verdict_word}: {worst}{during}"


def verdict(report: dict[str, Any]) -> str:
    """One line under the table. The peak is named for what it was seen in: "during training"
    only when training-time evaluations are part of it; a peak of the one model evaluated is
    its worst forgetting, already said."""
    s = report["summary"]
    parts = []
    if s["mean_gain_bpb"] is not None:
        parts.append(f"mean gain {s['mean_gain_bpb']:+.4f} bpb on target domains")
    if s["mean_forgetting_bpb"] is not None:
        parts.append(f"mean forgetting {s['mean_forgetting_bpb']:+.4f} bpb, worst "
                     f"{s['max_forgetting_bpb']:+.4f} ({s['worst_forgetting_domain']})")
    peak, seen_in = s.get("peak_forgetting_bpb"), s.get("peak_forgetting_from")
    if peak is not None and seen_in == "training":
        parts.append(f"peak forgetting during training {peak:+.4f}")
    elif peak is not None and seen_in == "checkpoints":
        parts.append(f"peak forgetting over the {len(report.get('curve', []))} models "
                     f"evaluated {peak:+.4f}")
    return "; ".join(parts) if parts else "no start model to compare against"
