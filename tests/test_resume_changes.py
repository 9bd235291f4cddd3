"""A resumed run applies what it records (issue: integrity): every recipe key changed since the
checkpoint is applied from its step and recorded, re-planned with --replan, or refused by name;
recipe.yaml and the manifest say only what was applied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_resume import STEPS, _recipe
from test_trainer import read_metrics, write_sources

from cpt_cli.errors import UsageError
from cpt_cli.runs.layout import complete_checkpoints
from cpt_cli.training.loop import train


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("changes")
    paths = write_sources(tmp / "data")
    recipe = _recipe(tmp, paths)
    result = train(recipe, output_dir=str(tmp / "straight"))
    return {"tmp": tmp, "paths": paths, "result": result}


def stopped_at_6(straight: dict[str, Any], name: str) -> Path:
    """A copy of the straight run as if it had stopped after its step-6 checkpoint."""
    run_dir = straight["tmp"] / name
    shutil.copytree(straight["result"].run_dir, run_dir)
    shutil.rmtree(run_dir / "final")
    for ckpt in complete_checkpoints(run_dir):
        if int(ckpt.name.split("-")[1]) > 6:
            shutil.rmtree(ckpt)
    assert complete_checkpoints(run_dir)[-1].name == "step-000006"
    (run_dir / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("step", 0) <= 6))
    return run_dir


def lrs(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["lr"] for e in read_metrics(run_dir) if e["event"] == "train"}


def test_a_lowered_learning_rate_is_applied_from_the_checkpoint_and_recorded(
        straight: dict[str, Any]) -> None:
    run_dir = stopped_at_6(straight, "lower-lr")
    recipe = _recipe(straight["tmp"], straight["paths"],
                     train={"steps": STEPS, "checkpoint": {"every_steps": 3, "keep": 10},
                            "schedule": {"name": "wsd", "warmup": 2, "decay": 0.5},
                            "optimizer": {"lr": 1.5e-3}})
    train(recipe, output_dir=str(run_dir), resume="auto")
    before, after = lrs(straight["result"].run_dir), lrs(run_dir)
    for step in range(1, 7):  # the steps already trained keep their rate
        assert after[step] == before[step]
    for step in (7, 8):       # the same schedule from the new peak: half the rate (3e-3 -> 1.5e-3)
        assert after[step] == pytest.approx(before[step] / 2, rel=1e-9)
    (revision,) = [e for e in read_metrics(run_dir) if e["event"] == "revision"]
    assert revision["step"] == 6
    assert revision["changes"] == [{"key": "train.optimizer.lr", "old": 3e-3, "new": 1.5e-3,
                                    "action": "apply"}]
    stage = json.loads((run_dir / "final" / "manifest.json").read_text())["stages"][-1]
    assert stage["revisions"] == [{"step": 6, "changes": revision["changes"]}]
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["optimizer"]["lr"] \
        == 1.5e-3


def test_keys_that_would_change_the_past_are_refused_by_name(straight: dict[str, Any]) -> None:
    run_dir = stopped_at_6(straight, "refused")
    recipe_yaml = (run_dir / "recipe.yaml").read_text()
    recipe = _recipe(straight["tmp"], straight["paths"], seed=7,
                     data={"seq_len": 32, "holdout": {"tokens": 2000}})
    with pytest.raises(UsageError) as err:
        train(recipe, output_dir=str(run_dir), resume="auto")
    message = str(err.value)
    assert "seed: 11 -> 7" in message
    assert "data.seq_len: 64 -> 32" in message
    assert "data.holdout.tokens" in message
    assert "new stage" in message
    assert (run_dir / "recipe.yaml").read_text() == recipe_yaml
    assert not (run_dir / "final").exists()


def test_a_changed_mixture_needs_replan_and_then_keeps_the_past(
        straight: dict[str, Any]) -> None:
    run_dir = stopped_at_6(straight, "replan")
    sources = [{"name": "prose", "path": straight["paths"]["prose"]},
               {"name": "code", "path": straight["paths"]["code"], "weight": 2.0}]
    recipe = _recipe(straight["tmp"], straight["paths"], data={"sources": sources})
    with pytest.raises(UsageError, match=r"data.sources.code.weight: 0.5 -> 2.0.*--replan"):
        train(recipe, output_dir=str(run_dir), resume="auto")
    train(recipe, output_dir=str(run_dir), resume="auto", replan=True)
    ckpt6 = json.loads((run_dir / "checkpoints" / "step-000006" / "manifest.json").read_text())
    final = json.loads((run_dir / "final" / "manifest.json").read_text())
    old = {s["name"]: s["sequences_trained"] for s in ckpt6["stages"][-1]["sources"]}
    straight_final = json.loads(
        (straight["result"].run_dir / "final" / "manifest.json").read_text())
    plain = {s["name"]: s["sequences_trained"] for s in straight_final["stages"][-1]["sources"]}
    new = {s["name"]: s["sequences_trained"] for s in final["stages"][-1]["sources"]}
    assert sum(new.values()) == sum(plain.values())  # the same run length
    # Steps 7 and 8 follow the new mixture: code gets more than it would have.
    assert new["code"] - old["code"] > plain["code"] - old["code"]
    stage = final["stages"][-1]
    assert stage["plan_revisions"][0]["step"] == 6
    assert stage["revisions"][0]["changes"][0]["key"] == "data.sources.code.weight"
    assert [e for e in read_metrics(run_dir) if e["event"] == "revision"][0]["step"] == 6


def test_a_ramped_run_stopped_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    """A mixture schedule (a ramp between two points) survives a stop and a resume: the same
    weights, optimizer state and curve as a run trained straight through."""
    import os
    import signal

    from test_resume import _assert_same_run

    from cpt_cli.errors import TrainingStopped

    paths = write_sources(tmp_path / "data")
    sources = [{"name": "prose", "path": paths["prose"], "weight": {"0%": 0.9, "100%": 0.2}},
               {"name": "code", "path": paths["code"], "weight": {"0%": 0.1, "100%": 0.8}}]
    recipe = _recipe(tmp_path, paths, data={"sources": sources})
    straight_run = train(recipe, output_dir=str(tmp_path / "straight"))

    def interrupt(event: dict[str, Any]) -> None:
        if event["event"] == "train" and event["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    run_dir = tmp_path / "stopped"
    with pytest.raises(TrainingStopped):
        train(recipe, output_dir=str(run_dir), on_event=interrupt)
    train(recipe, output_dir=str(run_dir), resume="auto")
    _assert_same_run(straight_run.run_dir, run_dir)
    manifest = json.loads((run_dir / "final" / "manifest.json").read_text())
    trained = {s["name"]: s["sequences_trained"] for s in manifest["stages"][-1]["sources"]}
    assert trained["code"] > 0 and trained["prose"] > 0
    weights = {s["name"]: s["weight"] for s in manifest["stages"][-1]["sources"]}
    assert weights["code"] == {"0%": 0.1, "100%": 0.8}  # the run was scheduled
