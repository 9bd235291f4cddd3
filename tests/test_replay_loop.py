"""Closed-loop replay in the trainer (`data.replay.ratio: auto`): decisions at every evaluation
become plan revisions the loader reads from the next step, recorded in metrics.jsonl, the
checkpoints and the manifest; a run stopped or crashed after a decision and resumed is bit for
bit the straight run; a 2-process run decides as a 1-process run; the plot and the final table
show the share and the budget.

The tiny model trains from scratch, so every domain improves on its random start: forgetting is
negative and the controller lowers the share each evaluation (by its rate limit, 0.05) toward
`min`. That is enough to change the plan at every evaluation, which is what these tests need.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import read_metrics, recipe_file, tiny_recipe, weights, write_sources

from cpt_cli.config import load_recipe
from cpt_cli.data.loader import PackedLoader
from cpt_cli.errors import TrainingStopped
from cpt_cli.evaluation.report import judge_replay_budget, replay_budget_line
from cpt_cli.runs.layout import complete_checkpoints
from cpt_cli.training import loop
from cpt_cli.training.loop import train

STEPS = 9
EVERY = 2   # decisions after steps 2, 4, 6 and 8; none at 9, which final/ evaluates


def _sections(tmp: Path, paths: dict[str, str]) -> dict[str, Any]:
    return {"data": {"replay": {"ratio": "auto", "max_forgetting_bpb": 0.01, "start": 0.4,
                                "min": 0.1, "max": 0.6,
                                "sources": [{"name": "prose", "path": paths["prose"]},
                                            {"name": "notes", "path": paths["notes"],
                                             "weight": 0.5}]}},
            "train": {"steps": STEPS, "checkpoint": {"every_steps": 3, "keep": 10}},
            "eval": {"every_steps": EVERY}}


def _recipe(tmp: Path, paths: dict[str, str]) -> Any:
    return tiny_recipe(tmp, "auto", [{"name": "code", "path": paths["code"]}],
                       **_sections(tmp, paths))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The auto run never interrupted, counting the sequences the loader served per source."""
    tmp = tmp_path_factory.mktemp("replay-loop")
    paths = write_sources(tmp / "data")
    recipe = _recipe(tmp, paths)
    served: dict[int, int] = {}
    original = PackedLoader.micro_batch

    def counting(self: PackedLoader, step: int, micro_step: int, rank: int | None = None) -> Any:
        batch = original(self, step, micro_step, rank)
        for k in batch.sources.tolist():
            served[k] = served.get(k, 0) + 1
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PackedLoader, "micro_batch", counting)
        result = train(recipe, output_dir=str(tmp / "straight"))
    return {"tmp": tmp, "paths": paths, "recipe": recipe, "result": result, "served": served}


def _replay_events(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_metrics(run_dir) if e["event"] == "replay"]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a / "final"), weights(b / "final")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name

    def curve(run: Path) -> list[tuple[Any, ...]]:
        return [(e["event"], e["step"], e.get("loss"), e.get("grad_norm"), e.get("share"),
                 str(e.get("weights")), str(e.get("domains"))) for e in read_metrics(run)]
    assert curve(a) == curve(b)
    ma = json.loads((a / "manifest.json").read_text())["stages"][-1]
    mb = json.loads((b / "manifest.json").read_text())["stages"][-1]
    assert ma["replay_control"] == mb["replay_control"] and ma["sources"] == mb["sources"]


def test_each_evaluation_decides_and_the_loader_reads_the_revised_plan(
        straight: dict[str, Any]) -> None:
    run_dir = straight["result"].run_dir
    events = _replay_events(run_dir)
    assert [e["step"] for e in events] == list(range(EVERY, STEPS, EVERY))
    evals = {e["step"]: e for e in read_metrics(run_dir) if e["event"] == "eval"}
    shares = [0.4] + [e["share"] for e in events]
    for before, event in zip(shares, events, strict=False):
        assert event["previous_share"] == before
        # Every domain improved on the random start: far below the budget, the share falls
        # by the rate limit, never below min.
        assert event["share"] == pytest.approx(max(0.1, before - 0.05))
        worst = max(d["delta_bpb"] for d in evals[event["step"]]["domains"].values()
                    if d["role"] == "retained")
        assert event["worst_forgetting_bpb"] == pytest.approx(worst)
        assert sum(event["weights"].values()) == pytest.approx(1.0)
        assert event["within_budget"] is True and event["budget_bpb"] == 0.01
    # The manifest lists the decisions as metrics.jsonl has them.
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"][-1]
    control = stage["replay_control"]
    assert (control["budget_bpb"], control["min"], control["max"]) == (0.01, 0.1, 0.6)
    keys = ("step", "share", "weights", "worst_domain", "limited")
    assert [{k: d[k] for k in keys} for d in control["decisions"]] == \
        [{k: e[k] for k in keys} for e in events]
    # What the loader served is what the revised plan (the manifest's counts) says: it read
    # each revision from its step on. 4 sequences per step, 9 steps.
    trained = {s["name"]: s["sequences_trained"] for s in stage["sources"]}
    assert {name: straight["served"].get(k, 0) for k, name in
            enumerate(["code", "prose", "notes"])} == trained
    replayed = trained["prose"] + trained["notes"]
    assert replayed < 0.4 * 4 * STEPS  # less than the start share would have trained


def test_the_checkpoint_keeps_the_decisions_and_the_controller(straight: dict[str, Any]) -> None:
    ckpt = straight["result"].run_dir / "checkpoints" / "step-000006"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    decisions = [h for h in state["plan_history"] if "decision" in h]
    assert [h["step"] for h in decisions] == [2, 4, 6]  # 6's decision precedes 6's checkpoint
    assert state["replay_control"]["share"] == decisions[-1]["decision"]["share"]
    assert state["replay_control"]["evaluations"] == 3


def test_the_final_report_says_whether_the_budget_held(straight: dict[str, Any]) -> None:
    report = straight["result"].report
    summary = report["summary"]
    assert summary["replay_budget_bpb"] == 0.01
    assert summary["replay_budget_held"] is (summary["max_forgetting_bpb"] <= 0.01)
    line = replay_budget_line(report)
    assert line is not None and "replay budget 0.0100" in line and "held" in line
    over = {"summary": {"max_forgetting_bpb": 0.03, "worst_forgetting_domain": "web",
                        "peak_forgetting_bpb": 0.04, "peak_forgetting_from": "training"}}
    judge_replay_budget(over, 0.02)
    assert over["summary"]["replay_budget_held"] is False
    assert "EXCEEDED: worst retained web +0.0300, peak during training +0.0400" in \
        replay_budget_line(over)
    fixed = {"summary": {"max_forgetting_bpb": 0.03}}
    judge_replay_budget(fixed, None)
    assert replay_budget_line(fixed) is None and "replay_budget_held" not in fixed["summary"]


def test_a_run_signalled_after_a_decision_resumes_bit_exact(straight: dict[str, Any]) -> None:
    """SIGTERM at step 5: checkpoint 5 holds the decisions of steps 2 and 4 and the controller
    after them; the resumed run decides at 6 and 8 as the straight one did."""
    run_dir = straight["tmp"] / "signalled"

    def interrupt(event: dict[str, Any]) -> None:
        if event["event"] == "train" and event["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped, match="SIGTERM at step 5"):
        train(straight["recipe"], output_dir=str(run_dir), on_event=interrupt)
    assert complete_checkpoints(run_dir)[-1].name == "step-000005"
    train(straight["recipe"], output_dir=str(run_dir), resume="auto")
    _assert_same_run(straight["result"].run_dir, run_dir)


def test_a_signal_that_skips_an_evaluation_is_decided_on_resume(
        straight: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal during step 4 (index 3) skips the evaluation due after it: checkpoint 4 has no
    decision at 4. The resumed run evaluates and decides at 4 before training step 5, as the
    straight run did."""
    run_dir = straight["tmp"] / "skipped"
    original = loop.train_step

    def signalled(run: Any, step: int, micro_batches: Any, signals: Any) -> Any:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(run, step, micro_batches, signals)

    monkeypatch.setattr(loop, "train_step", signalled)
    with pytest.raises(TrainingStopped, match="SIGTERM at step 4"):
        train(straight["recipe"], output_dir=str(run_dir))
    monkeypatch.setattr(loop, "train_step", original)
    state = json.loads((run_dir / "checkpoints" / "step-000004" / "trainer_state.json")
                       .read_text())
    assert [h["step"] for h in state["plan_history"] if "decision" in h] == [2]
    assert 4 not in [e["step"] for e in _replay_events(run_dir)]
    train(straight["recipe"], output_dir=str(run_dir), resume="auto")
    _assert_same_run(straight["result"].run_dir, run_dir)


def test_a_crash_after_a_decision_resumes_bit_exact(straight: dict[str, Any]) -> None:
    """A crash at step 8, after the decision at 8 and past checkpoint 6 (what a SIGKILL
    leaves): the resume from 6 repeats steps 7 and 8 and the decision at 8, once."""
    run_dir = straight["tmp"] / "crashed"

    def crash(event: dict[str, Any]) -> None:
        if event["event"] == "replay" and event["step"] == 8:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(straight["recipe"], output_dir=str(run_dir), on_event=crash)
    assert complete_checkpoints(run_dir)[-1].name == "step-000006"
    train(straight["recipe"], output_dir=str(run_dir), resume="auto")
    _assert_same_run(straight["result"].run_dir, run_dir)


def test_eval_plot_draws_the_replay_share(straight: dict[str, Any], cli: Any) -> None:
    from cpt_cli.evaluation.plotting import read_replay

    run_dir = straight["result"].run_dir
    assert read_replay(run_dir) == [(0, 0.4)] + [(e["step"], e["share"])
                                                 for e in _replay_events(run_dir)]
    png = straight["tmp"] / "curves.png"
    result = cli("eval", str(run_dir / "final"), "--plot", str(png), "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "replay budget 0.0100 bpb (ratio: auto) held" in result.stdout


@pytest.mark.slow
def test_two_processes_decide_as_one(straight: dict[str, Any],
                                     train_two_processes: Callable[..., Any]) -> None:
    tmp, paths = straight["tmp"], straight["paths"]
    recipe = recipe_file(tmp, "auto", [{"name": "code", "path": paths["code"]}],
                         **_sections(tmp, paths))
    two_dir = tmp / "two"
    proc = train_two_processes(recipe, two_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = _replay_events(straight["result"].run_dir), _replay_events(two_dir)
    keys = ("step", "share", "weights", "worst_domain", "limited")
    assert [{k: e[k] for k in keys} for e in two] == [{k: e[k] for k in keys} for e in one]
    for a, b in zip(one, two, strict=True):
        assert b["worst_forgetting_bpb"] == pytest.approx(a["worst_forgetting_bpb"], rel=1e-4)
    stage = json.loads((two_dir / "manifest.json").read_text())["stages"][-1]
    assert stage["environment"]["num_processes"] == 2
    assert stage["sources"] == json.loads((straight["result"].run_dir / "manifest.json")
                                          .read_text())["stages"][-1]["sources"]
    assert load_recipe(recipe).data.replay.is_auto
