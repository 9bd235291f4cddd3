"""Exact resume: on CPU with a fixed seed, a run interrupted and resumed with `resume="auto"` ends
with the same weights, bit for bit, as one trained straight through; resuming reads no data
before the resume point; a changed data section is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import read_metrics, tiny_recipe, weights, write_sources

from cpt_cli.data.packing import ConcatStream
from cpt_cli.errors import TrainingStopped, UsageError
from cpt_cli.runs.layout import complete_checkpoints
from cpt_cli.training.loop import train

STEPS = 8


def _recipe(tmp: Path, paths: dict[str, str], **sections: Any) -> Any:
    sources = [{"name": "prose", "path": paths["prose"]},
               {"name": "code", "path": paths["code"], "weight": 0.5}]
    return tiny_recipe(tmp, "resume", sources, **{
        "train": {"steps": STEPS, "checkpoint": {"every_steps": 3, "keep": 10},
                  "schedule": {"name": "wsd", "warmup": 2, "decay": 0.5}},
        "eval": {"every_steps": 4}, **sections})


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("resume")
    paths = write_sources(tmp / "data")
    recipe = _recipe(tmp, paths)
    result = train(recipe, output_dir=str(tmp / "straight"))
    return {"tmp": tmp, "paths": paths, "recipe": recipe, "result": result}


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa = torch.load(a / "final" / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "final" / "optimizer.pt", weights_only=True)["state"]
    for k in oa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[k][key], ob[k][key]), (k, key)
    # The same losses, learning rates and gradient norms at every step, and the same evaluations.
    def curve(run: Path) -> list[tuple[Any, ...]]:
        return [(e["event"], e["step"], e.get("loss"), e.get("lr"), e.get("grad_norm"),
                 str(e.get("domains"))) for e in read_metrics(run)]
    assert curve(a) == curve(b)


def test_interrupted_by_a_signal_then_resumed_is_bit_exact(straight: dict[str, Any]) -> None:
    run_dir = straight["tmp"] / "signalled"

    def interrupt(event: dict[str, Any]) -> None:
        if event["event"] == "train" and event["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped, match="SIGTERM at step 5.*--resume auto"):
        train(straight["recipe"], output_dir=str(run_dir), on_event=interrupt)
    # The signal's checkpoint is the newest; the run stopped before its end.
    assert complete_checkpoints(run_dir)[-1].name == "step-000005"
    assert not (run_dir / "final").exists()
    result = train(straight["recipe"], output_dir=str(run_dir), resume="auto")
    assert result.steps == STEPS
    _assert_same_run(straight["result"].run_dir, run_dir)


def test_crash_between_checkpoints_then_resumed_is_bit_exact(straight: dict[str, Any]) -> None:
    """A crash at step 7 loses steps 7 (no checkpoint since 6): they are trained again."""
    run_dir = straight["tmp"] / "crashed"

    def crash(event: dict[str, Any]) -> None:
        if event["event"] == "train" and event["step"] == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(straight["recipe"], output_dir=str(run_dir), on_event=crash)
    # every 3 steps, plus step 4: the wsd cooldown starts after it (warmup 2, decay half of 8).
    assert [p.name for p in complete_checkpoints(run_dir)] == \
        ["step-000003", "step-000004", "step-000006"]
    with open(run_dir / "metrics.jsonl", "a") as fh:  # a line cut short by a kill
        fh.write('{"event": "train", "step": 7, "lo')
    train(straight["recipe"], output_dir=str(run_dir), resume="auto")
    _assert_same_run(straight["result"].run_dir, run_dir)


def test_crash_before_the_first_checkpoint_then_resumed_starts_over(
        straight: dict[str, Any]) -> None:
    """No checkpoint yet: --resume auto trains from step 0 again, and metrics.jsonl holds each
    step once (the start evaluation, cached, is not repeated)."""
    run_dir = straight["tmp"] / "crashed-early"

    def crash(event: dict[str, Any]) -> None:
        if event["event"] == "train" and event["step"] == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(straight["recipe"], output_dir=str(run_dir), on_event=crash)
    assert complete_checkpoints(run_dir) == []
    train(straight["recipe"], output_dir=str(run_dir), resume="auto")
    _assert_same_run(straight["result"].run_dir, run_dir)


def test_resume_from_an_older_checkpoint_is_bit_exact(straight: dict[str, Any]) -> None:
    run_dir = straight["tmp"] / "rewound"
    shutil.copytree(straight["result"].run_dir, run_dir)
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    train(straight["recipe"], output_dir=str(run_dir),
          resume=str(run_dir / "checkpoints" / "step-000003"))
    _assert_same_run(straight["result"].run_dir, run_dir)


def test_resume_reads_no_data_before_the_resume_point(straight: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Time to the first step after resuming must not grow with the step count: the loader
    jumps to the resume point without packing a single earlier sequence."""
    run_dir = straight["tmp"] / "counted"
    shutil.copytree(straight["result"].run_dir, run_dir)
    shutil.rmtree(run_dir / "final")
    read: list[int] = []
    original = ConcatStream.sequence

    def counting(self: ConcatStream, index: int) -> Any:
        read.append(index)
        return original(self, index)

    monkeypatch.setattr(ConcatStream, "sequence", counting)
    train(straight["recipe"], output_dir=str(run_dir), resume="auto")
    # Resumed at step 6 of 8 with 4 sequences per step: exactly 8 sequences packed.
    assert len(read) == (STEPS - 6) * 4


def test_changed_data_section_is_refused(straight: dict[str, Any]) -> None:
    run_dir = straight["tmp"] / "changed"
    shutil.copytree(straight["result"].run_dir, run_dir)
    shutil.rmtree(run_dir / "final")
    paths = straight["paths"]
    changed = tiny_recipe(straight["tmp"], "resume",
                          [{"name": "prose", "path": paths["prose"]},
                           {"name": "code", "path": paths["code"], "weight": 2.0}],
                          train={"steps": STEPS, "checkpoint": {"every_steps": 3, "keep": 10},
                                 "schedule": {"name": "wsd", "warmup": 2, "decay": 0.5}},
                          eval={"every_steps": 4})
    recipe_yaml = (run_dir / "recipe.yaml").read_text()
    # The key is named with both values (a weight is the mixture: --replan applies it).
    with pytest.raises(UsageError, match=r"data.sources.code.weight: 0.5 -> 2.0.*--replan"):
        train(changed, output_dir=str(run_dir), resume="auto")
    assert (run_dir / "recipe.yaml").read_text() == recipe_yaml
    # The refusal touched nothing: the newest checkpoint is still the one to resume.
    assert complete_checkpoints(run_dir)[-1].name == "step-000006"
    assert not (run_dir / "final").exists()


def test_debris_of_a_killed_run_is_cleared_and_complete_checkpoints_kept(tmp_path: Path) -> None:
    from cpt_cli.runs.atomic import remove_debris

    root = tmp_path / "checkpoints"

    def folder(name: str, complete: bool = True) -> None:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")

    folder("step-000002")
    folder(".tmp-step-000004", complete=False)   # killed while writing
    folder(".old-step-000004")                   # killed between the two renames of a rewrite
    folder(".old-step-000002")                   # killed before deleting a replaced folder
    folder(".del-step-000001", complete=False)   # killed while deleting a rotated checkpoint
    (tmp_path / ".tmp-final").mkdir()
    remove_debris(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    assert not (tmp_path / ".tmp-final").exists()


@pytest.mark.slow
def test_compiled_run_resumed_in_a_new_process_is_bit_exact(tmp_path: Path) -> None:
    """train.compile (the quickstart recipes use it): a resumed process compiles the layers
    again, and its kernels must give the bits the straight run's did."""
    import subprocess
    import sys

    import yaml
    from test_trainer import tiny_config

    paths = write_sources(tmp_path / "data")
    config = tiny_config(tmp_path, "compiled", [
        {"name": "prose", "path": paths["prose"]}, {"name": "code", "path": paths["code"]}],
        train={"steps": 7, "compile": True, "checkpoint": {"every_steps": 3, "keep": 10}},
        eval={"every_steps": 3})
    recipe = tmp_path / "compiled.yaml"
    recipe.write_text(yaml.safe_dump(config))

    def cpt_train(run_dir: Path, *extra: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                               "--output-dir", str(run_dir), *extra], capture_output=True,
                              text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # DeepSpeed (a dev dependency) is imported when a checkpoint unwraps the model; its
        # accelerator detection must not log into cpt's output.
        assert "Setting accelerator" not in proc.stdout + proc.stderr

    cpt_train(tmp_path / "straight")
    rewound = tmp_path / "rewound"
    shutil.copytree(tmp_path / "straight", rewound)
    shutil.rmtree(rewound / "final")
    shutil.rmtree(rewound / "checkpoints" / "step-000006")
    cpt_train(rewound, "--resume", "auto")
    _assert_same_run(tmp_path / "straight", rewound)


@pytest.mark.parametrize("damage", ["truncated-weights", "model-changed",
                                    "model-changed-unrecorded"])
def test_a_checkpoint_that_cannot_load_is_refused_before_anything_changes(
        damage: str, straight: dict[str, Any]) -> None:
    run_dir = straight["tmp"] / f"refused-{damage}"
    shutil.copytree(straight["result"].run_dir, run_dir)
    shutil.rmtree(run_dir / "final")  # not finished: --resume auto takes the newest checkpoint
    newest = complete_checkpoints(run_dir)[-1]
    recipe = straight["recipe"]
    if damage == "truncated-weights":
        with open(newest / "model.safetensors", "r+b") as fh:
            fh.truncate(50)
        expect = re.escape("model.safetensors is damaged")
    elif damage == "model-changed":  # the checkpoint's recipe names the key
        recipe = _recipe(straight["tmp"], straight["paths"], model={"init": {"config": {
            "intermediate_size": 96}}})
        expect = r"model\.init\.config: .*'intermediate_size': 64.* -> .*'intermediate_size': " \
                 r"96.*the architecture the checkpoint's weights belong to"
    else:  # a checkpoint without its recipe (cpt before it saved one): the weights' shapes
        state = json.loads((newest / "trainer_state.json").read_text())
        del state["recipe"]
        (newest / "trainer_state.json").write_text(json.dumps(state))
        recipe = _recipe(straight["tmp"], straight["paths"], model={"init": {"config": {
            "intermediate_size": 96}}})
        expect = r"holds model\.layers\.0\.mlp\.\w+\.weight of shape \[\d+, \d+\], the recipe's " \
                 r"model \[\d+, \d+\]: the model section changed"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=expect):
        train(recipe, output_dir=str(run_dir), resume="auto")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
