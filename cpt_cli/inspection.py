"""`cpt mix inspect`: the mixture plan before any compute is spent.

Per source: role, documents, tokens available, held-out tokens, weight, planned tokens and share,
the share actually achieved in the first 1,000 sequences and overall, epochs; totals, replay
share, packing efficiency and warnings; optionally N packed sequences rendered with their document
boundaries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cpt_cli.config import Recipe
from cpt_cli.data.packing import BestFitStream
from cpt_cli.data.prepare import PreparedData, plan_data, prepare_data

WINDOW = 1000


def inspect_mix(recipe: Recipe, *, samples: int = 0, num_processes: int | None = None,
                data: PreparedData | None = None) -> dict[str, Any]:
    P = num_processes or recipe.launch.num_processes
    data = data or prepare_data(recipe)
    data = plan_data(recipe, data, P)
    plan = data.plan
    assert plan is not None
    order = plan.source_order()
    k = len(plan.sources)
    first = np.bincount(order[:WINDOW], minlength=k) / max(1, min(WINDOW, len(order)))
    overall = np.bincount(order, minlength=k) / max(1, len(order))
    result = plan.as_dict()
    for i, row in enumerate(result["sources"]):
        row["share_achieved_first_1000"] = float(first[i])
        row["share_achieved"] = float(overall[i])
        row["dropped_duplicates"] = data.domains[i].dropped_duplicates
        row["heldout_documents"] = len(data.domains[i].heldout)
        row["skipped"] = data.domains[i].entry.meta["skipped"] if data.domains[i].entry else {}
    padding = 0.0
    if recipe.data.packing == "best_fit":
        fractions = [s.padding_fraction() for s in data.streams]
        weights = [s.sequences for s in plan.sources]
        padding = float(np.average(fractions, weights=weights)) if sum(weights) else 0.0
    result["sequences"] = plan.total_sequences
    result["steps"] = data.steps
    result["global_batch_sequences"] = data.global_batch
    result["packing"] = {"mode": recipe.data.packing, "padding_fraction": padding,
                         "padding_tokens": int(round(padding * plan.total_tokens)),
                         "dropped_tokens": sum(s.dropped_tokens(r.sequences)
                                               for s, r in zip(data.streams, plan.sources,
                                                               strict=True))}
    result["retained_only_domains"] = [d.name for d in data.eval_domains
                                       if d.name not in {x.name for x in data.domains}]
    result["samples"] = [_render(data, i) for i in range(min(samples, plan.total_sequences))]
    return result


def _render(data: PreparedData, index: int) -> dict[str, Any]:
    """One packed sequence: its source and its documents' text, split at boundaries."""
    assert data.plan is not None
    k, j = data.plan.locate(index)
    seq = data.streams[k].sequence(j)
    bounds = sorted(set(seq.doc_starts) | set(seq.continued) | {0})
    used = int((seq.labels != -100).sum()) if isinstance(data.streams[k], BestFitStream) \
        else len(seq.input_ids)
    pieces = []
    for a, b in zip(bounds, bounds[1:] + [used], strict=True):
        if a >= used:
            break
        ids = [int(t) for t in seq.input_ids[a:b]]
        pieces.append({"start": a, "tokens": len(ids), "continued": a in seq.continued,
                       "text": data.tokenizer.decode(ids)})
    padding = int((seq.labels == -100).sum()) if isinstance(data.streams[k], BestFitStream) else 0
    return {"index": index, "source": data.plan.sources[k].name, "documents": pieces,
            "padding": padding}
