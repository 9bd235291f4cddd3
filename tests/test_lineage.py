"""Stages: a run started from an earlier cpt run's final/ re-warms, starts a fresh optimizer (or
continues the parent's with `optimizer.load_from_parent`), replays the parent's data, and appends
itself to the manifest, so a third stage replays both earlier ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import merge, read_metrics, tiny_recipe, weights, write_sources

from cpt_cli.errors import UsageError
from cpt_cli.inspection import inspect_mix
from cpt_cli.training.loop import train

STAGE_STEPS = 4


def _stage(tmp: Path, name: str, parent: Path, source: str, paths: dict[str, str],
           **sections: Any) -> Any:
    return tiny_recipe(
        tmp, name, [{"name": source, "path": paths[source]}],
        model={"path": str(parent), "init": None, "train_tokenizer": None},
        data={"replay": {"ratio": 0.25, "inherit": True}},
        **merge({"train": {"steps": STAGE_STEPS, "checkpoint": {"every_steps": None}},
                 "eval": {"every_steps": None}}, sections))


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("lineage")
    paths = write_sources(tmp / "data")
    r1 = train(tiny_recipe(tmp, "stage1", [{"name": "prose", "path": paths["prose"]}],
                           eval={"every_steps": None}),
               output_dir=str(tmp / "runs" / "stage1"))
    rec2 = _stage(tmp, "stage2", r1.final_dir, "code", paths)
    r2 = train(rec2, output_dir=str(tmp / "runs" / "stage2"))
    rec3 = _stage(tmp, "stage3", r2.final_dir, "notes", paths)
    r3 = train(rec3, output_dir=str(tmp / "runs" / "stage3"))
    return {"tmp": tmp, "paths": paths, "r1": r1, "r2": r2, "r3": r3, "rec2": rec2,
            "rec3": rec3}


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def test_stage_two_replays_the_first(stages: dict[str, Any]) -> None:
    manifest = _manifest(stages["r2"].final_dir)
    assert [s["name"] for s in manifest["stages"]] == ["stage1", "stage2"]
    assert set(manifest["sources"]) == {"prose", "code"}
    stage = manifest["stages"][1]
    assert stage["start_model"] == str(stages["r1"].final_dir)
    rows = {s["name"]: s for s in stage["sources"]}
    assert rows["code"]["role"] == "new" and not rows["code"]["inherited"]
    assert rows["prose"]["role"] == "replay" and rows["prose"]["inherited"]
    # 25% of 16 sequences are replay.
    assert rows["prose"]["sequences_trained"] == 4 and rows["code"]["sequences_trained"] == 12
    plan = inspect_mix(stages["rec2"])
    inherited = {s["name"]: s["inherited"] for s in plan["sources"]}
    assert inherited == {"code": False, "prose": True}


def test_stage_three_replays_stages_one_and_two(stages: dict[str, Any]) -> None:
    manifest = _manifest(stages["r3"].final_dir)
    assert [s["name"] for s in manifest["stages"]] == ["stage1", "stage2", "stage3"]
    assert {n: s["stage"] for n, s in manifest["sources"].items()} == \
        {"prose": 0, "code": 1, "notes": 2}
    rows = {s["name"]: s for s in manifest["stages"][2]["sources"]}
    assert {n for n, r in rows.items() if r["inherited"]} == {"prose", "code"}
    assert all(r["sequences_trained"] > 0 for r in rows.values())
    plan = inspect_mix(stages["rec3"])
    assert {s["name"] for s in plan["sources"] if s["inherited"]} == {"prose", "code"}
    # The forgetting curves cover every domain of the lineage.
    last = [e for e in read_metrics(stages["r3"].run_dir) if e["event"] == "eval"][-1]
    assert {n: d["role"] for n, d in last["domains"].items()} == \
        {"notes": "target", "prose": "retained", "code": "retained"}


def test_a_new_stage_rewarms(stages: dict[str, Any]) -> None:
    for run in (stages["r2"], stages["r3"]):
        first = next(e for e in read_metrics(run.run_dir) if e["event"] == "train")
        # warmup 2 steps: the first update uses a third of the peak, not the parent's last lr.
        assert first["step"] == 1 and first["lr"] == pytest.approx(3e-3 / 3)


def _optimizer_steps(folder: Path) -> set[int]:
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    return {int(s["step"]) for s in state["state"].values()}


def test_fresh_optimizer_by_default(stages: dict[str, Any]) -> None:
    assert _optimizer_steps(stages["r1"].final_dir) == {6}
    assert _optimizer_steps(stages["r2"].final_dir) == {STAGE_STEPS}


def test_load_from_parent_continues_the_optimizer(stages: dict[str, Any]) -> None:
    tmp = stages["tmp"]
    recipe = _stage(tmp, "stage2-opt", stages["r1"].final_dir, "code", stages["paths"],
                    train={"optimizer": {"load_from_parent": True, "weight_decay": 0.03,
                                         "lr": 1e-3}})
    run = train(recipe, output_dir=str(tmp / "runs" / "stage2-opt"))
    # Adam's step counts and moments continue from the parent's 6 steps ...
    assert _optimizer_steps(run.final_dir) == {6 + STAGE_STEPS}
    state = torch.load(run.final_dir / "optimizer.pt", weights_only=True)
    # ... while this stage's hyperparameters and schedule apply, not the parent's.
    assert {g["weight_decay"] for g in state["param_groups"]} == {0.0, 0.03}
    assert {g["initial_lr"] for g in state["param_groups"]} == {1e-3}
    first = next(e for e in read_metrics(run.run_dir) if e["event"] == "train")
    assert first["lr"] == pytest.approx(1e-3 / 3)
    fresh = _stage(tmp, "stage2-fresh", stages["r1"].final_dir, "code", stages["paths"],
                   train={"optimizer": {"weight_decay": 0.03, "lr": 1e-3}})
    fresh_run = train(fresh, output_dir=str(tmp / "runs" / "stage2-fresh"))
    a, b = weights(run.final_dir), weights(fresh_run.final_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_load_from_parent_needs_the_parent_optimizer(stages: dict[str, Any]) -> None:
    tmp = stages["tmp"]
    bare = tmp / "bare-final"
    shutil.copytree(stages["r1"].final_dir, bare)
    (bare / "optimizer.pt").unlink()
    recipe = _stage(tmp, "no-opt", bare, "code", stages["paths"],
                    train={"optimizer": {"load_from_parent": True}})
    with pytest.raises(UsageError, match="load_from_parent.*optimizer.pt not found"):
        train(recipe, output_dir=str(tmp / "runs" / "no-opt"))
    assert not (tmp / "runs" / "no-opt").exists()  # refused before anything was written
    # `cpt mix inspect` finds it as well, before any compute is spent.
    with pytest.raises(UsageError, match="load_from_parent.*optimizer.pt not found"):
        inspect_mix(recipe)


def test_freezing_keeps_weights_unchanged(stages: dict[str, Any]) -> None:
    tmp = stages["tmp"]
    recipe = _stage(tmp, "frozen", stages["r1"].final_dir, "code", stages["paths"],
                    train={"freeze": ["embed_tokens", r"layers\.1\.mlp"]})
    run = train(recipe, output_dir=str(tmp / "runs" / "frozen"))
    before, after = weights(stages["r1"].final_dir), weights(run.final_dir)
    for name, tensor in after.items():
        frozen = "embed_tokens" in name or "layers.1.mlp" in name
        assert torch.equal(tensor, before[name]) == frozen, name


def test_wsd_keeps_its_pre_decay_checkpoint_to_branch_from(stages: dict[str, Any]) -> None:
    """keep: 1 rotates every other checkpoint away, but not the last one before the cooldown:
    a later stage can start from the stable-phase weights (and replays the lineage)."""
    tmp, paths = stages["tmp"], stages["paths"]
    recipe = tiny_recipe(tmp, "wsd", [{"name": "prose", "path": paths["prose"]}],
                         train={"steps": 8, "schedule": {"name": "wsd", "warmup": 2,
                                                         "decay": 0.5},
                                "checkpoint": {"every_steps": 1, "keep": 1}},
                         eval={"every_steps": None})
    run = train(recipe, output_dir=str(tmp / "runs" / "wsd"))
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == \
        ["step-000004", "step-000007"]
    branch = run.run_dir / "checkpoints" / "step-000004"
    events = {e["step"]: e["lr"] for e in read_metrics(run.run_dir) if e["event"] == "train"}
    assert events[4] == pytest.approx(3e-3) and events[5] < 3e-3  # step 5 starts the cooldown
    child = train(_stage(tmp, "from-wsd", branch, "code", paths),
                  output_dir=str(tmp / "runs" / "from-wsd"))
    manifest = _manifest(child.final_dir)
    assert [(s["name"], s["steps"]) for s in manifest["stages"]] == [("wsd", 4), ("from-wsd", 4)]
    rows = {s["name"]: s for s in manifest["stages"][1]["sources"]}
    assert rows["prose"]["inherited"] and rows["prose"]["sequences_trained"] > 0


def test_forgetting_budget_stops_after_a_checkpoint(stages: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.max_forgetting_bpb: the evaluation that finds a retained domain over budget writes a
    checkpoint, then stops (exit status 1) naming the domain and the figure. The forgetting is
    forced (a 4-step tiny model forgets too little to rely on): the real report, with the worst
    retained domain's figure raised to 0.5."""
    from cpt_cli.errors import TrainingStopped
    from cpt_cli.training import loop as trainer

    real = trainer.forgetting_table

    def forgetting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        report = real(*args, **kwargs)
        if args[1] is not None:  # against the start: a report of forgetting
            report["summary"].update(max_forgetting_bpb=0.5, worst_forgetting_domain="prose")
        return report

    monkeypatch.setattr(trainer, "forgetting_table", forgetting)
    tmp = stages["tmp"]
    recipe = _stage(tmp, "budget", stages["r1"].final_dir, "code", stages["paths"],
                    eval={"every_steps": 2, "max_forgetting_bpb": 0.1})
    run_dir = tmp / "runs" / "budget"
    with pytest.raises(TrainingStopped, match=r"domain 'prose' forgot 0\.5000 bits per byte at "
                                              r"step 2, above eval.max_forgetting_bpb 0.1") as stop:
        train(recipe, output_dir=str(run_dir))
    assert stop.value.exit_code == 1
    assert (run_dir / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    assert not (run_dir / "final").exists()
    evals = [e for e in read_metrics(run_dir) if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2]
