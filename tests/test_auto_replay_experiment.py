"""experiments/auto_replay.py (`make experiment-replay`): the parts that decide what the page
reports, on made-up results (the full run trains six models; docs/experiments/auto-replay.md
records it): which fixed ratio the auto arm is paired against, and the table's verdicts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import auto_replay  # noqa: E402


def arm(prose: float, qa: float, code: float, share: float) -> dict[str, Any]:
    def domain(role: str, delta: float) -> dict[str, Any]:
        return {"role": role, "delta_bpb": delta, "ci": [delta - 0.01, delta + 0.01],
                "peak": delta + 0.05 if role == "retained" else None}

    return {"domains": {"code": domain("target", code), "prose": domain("retained", prose),
                        "qa": domain("retained", qa)},
            "replay_share_trained": share, "seconds": 1.0}


RESULTS = {
    "fixed 0%": arm(0.11, 0.12, -0.613, 0.0),     # the largest gain, over the budget
    "fixed 25%": arm(0.0099, -0.036, -0.597, 0.25),
    "fixed 50%": arm(-0.051, -0.085, -0.581, 0.5),
    "auto (budget 0.03)": arm(-0.008, -0.045, -0.593, 0.289),
}


def test_auto_is_paired_with_the_best_fixed_ratio_that_kept_the_budget() -> None:
    assert auto_replay.best_within_budget(RESULTS, 0.03) == "fixed 25%"
    # A tighter budget leaves only 50% within it; the auto arm itself is never a candidate.
    assert auto_replay.best_within_budget(RESULTS, 0.005) == "fixed 50%"
    assert auto_replay.best_within_budget(RESULTS, -0.1) is None


def test_the_table_says_which_arms_kept_the_budget() -> None:
    rows = auto_replay.table(RESULTS, 0.03).splitlines()
    assert rows[0].startswith("| arm | replay trained | prose final (95% CI) | qa final")
    verdicts = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[-2] for row in rows[2:]}
    assert verdicts == {"fixed 0%": "no", "fixed 25%": "yes", "fixed 50%": "yes",
                        "auto (budget 0.03)": "yes"}
    # The gain is printed as a gain (the target's delta negated), with its interval flipped.
    assert "+0.5970 (+0.5870, +0.6070)" in rows[3]
