"""Downstream tasks beside the per-domain figures: EleutherAI lm-evaluation-harness, optional.

    pip install 'cpt[lm-eval]'
    cpt eval runs/my-run/final --lm-eval hellaswag,arc_easy
    cpt eval runs/my-run/final --lm-eval my_task --lm-eval-include tasks/   # local task YAMLs

Runs through lm-eval's Python API (`simple_evaluate` with an `HFLM` over the loaded model) on the
model and on its start model, and reports each task's metrics start vs now.
"""

from __future__ import annotations

from typing import Any

from cpt_cli.errors import UsageError


def check_available() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError("--lm-eval needs lm-evaluation-harness: pip install 'cpt[lm-eval]' "
                         "(or lm-eval)") from None


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], *, include_path: str | None = None,
              limit: int | None = None, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for an already loaded model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--lm-eval: unknown task(s) {', '.join(unknown)}; list them with "
                         "`lm-eval ls tasks`, or add local task YAMLs with --lm-eval-include")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(next(model.parameters()).device))
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                          bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float))
                         and not k.startswith(("alias", "sample_len")) and "_stderr" not in k}
    return results


def compare(now: dict[str, dict[str, float]], start: dict[str, dict[str, float]] | None
            ) -> list[dict[str, Any]]:
    rows = []
    for task, metrics in now.items():
        for metric, value in metrics.items():
            before = (start or {}).get(task, {}).get(metric)
            rows.append({"task": task, "metric": metric, "now": value, "start": before,
                         "delta": None if before is None else value - before})
    return rows
