"""Two processes on CPU: `cpt train --num-processes 2` re-launches itself under `accelerate launch
--multi_gpu` (a gloo group through Accelerator(cpu=True)), and its loss curve matches the
1-process run with the same global batch: the loader gives each process disjoint sequences of the
same global batch, and the loss is normalized by the global target count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import read_metrics, recipe_file, weights, write_sources

from cpt_cli.config import load_recipe
from cpt_cli.errors import UsageError
from cpt_cli.launch import accelerate_command, launch_result
from cpt_cli.process import finish_worker, register_worker
from cpt_cli.training.loop import train


def test_accelerate_command_for_cpu_processes() -> None:
    cmd = accelerate_command(2, None, ["train", "r.yaml", "--num-processes", "2"])
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    # --cpu would start one process silently; --multi_gpu starts two, and the trainer's
    # Accelerator(cpu=True) makes them a gloo group.
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-6:] == ["-m", "cpt_cli", "train", "r.yaml", "--num-processes", "2"]
    with_config = accelerate_command(4, "fsdp.yaml", ["train", "r.yaml"])
    assert with_config[with_config.index("--config_file") + 1] == "fsdp.yaml"


def test_launched_run_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """The parent returns the main worker's status; a worker failing after every worker has
    finished (gloo's threads aborting at interpreter exit) does not turn a finished run into a
    failed one, but a worker that never finished does."""
    monkeypatch.setenv("CPT_LAUNCH_CONTROL", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")

    def worker(rank: int, code: int | None) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setattr(os, "getpid", lambda: 1000 + rank)
        register_worker()
        if code is not None:
            assert finish_worker(code) == 0  # torch's launcher sees success

    worker(0, 130)
    worker(1, None)  # started, never finished
    assert launch_result(tmp_path, 0) == 130
    assert launch_result(tmp_path, 1) == 1
    assert capsys.readouterr().err == ""
    worker(1, 0)
    assert launch_result(tmp_path, -6) == 130
    assert "failed while exiting" in capsys.readouterr().err
    (tmp_path / "status").unlink()  # the main worker died before its status
    assert launch_result(tmp_path, 1) == 1
    assert launch_result(tmp_path, 0) == 0


def test_a_worker_ends_with_its_status_and_its_output(tmp_path: Path) -> None:
    """A process of a multi-process run leaves without the interpreter's teardown, its output
    flushed and its status kept; one process alone exits as usual (atexit handlers run)."""
    program = ("import atexit, sys; from cpt_cli.process import end_worker; "
               "atexit.register(lambda: print('teardown')); print('done', end=''); "
               "sys.stderr.write('note'); end_worker(7); print(' returned')")
    for world, code, out in [("2", 7, "done"), ("1", 0, "done returned\nteardown\n"),
                             ("", 0, "done returned\nteardown\n")]:
        proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                              env=dict(os.environ, WORLD_SIZE=world), timeout=120)
        assert (proc.returncode, proc.stdout, proc.stderr) == (code, out, "note"), world


def test_launch_refuses_what_every_process_would_refuse(tmp_path: Path) -> None:
    """Before `accelerate launch`: a DeepSpeed setup cpt cannot train under, or an unreadable
    accelerate config, is one message with exit status 2 from the parent, not one traceback per
    process from the launcher (exit 1); nothing is written."""
    import json as json_module

    import yaml

    paths = write_sources(tmp_path / "data")
    cases = {
        "zero3.yaml": ({"distributed_type": "DEEPSPEED", "num_processes": 2,
                        "deepspeed_config": {"zero_stage": 3}}, "zero_stage 3"),
        "zero-json.yaml": ({"distributed_type": "DEEPSPEED", "num_processes": 2,
                            "deepspeed_config": {"deepspeed_config_file": "ds.json"}},
                           "zero_stage 0"),
        "broken.yaml": ("distributed_type: [", "cannot read"),
        "nonsense.yaml": ({"distributed_type": "NONSENSE", "num_processes": 2},
                          "distributed_type 'NONSENSE' is not one of"),
        "count.yaml": ({"distributed_type": "MULTI_GPU", "num_processes": "two"},
                       "num_processes 'two' must be a positive whole number"),
        "multi-cpu.yaml": ({"distributed_type": "MULTI_CPU", "num_processes": 2},
                           "MULTI_CPU on one machine starts a single process, not 2"),
    }
    (tmp_path / "ds.json").write_text(json_module.dumps({"zero_optimization": {"stage": 0}}))
    for name, (content, expect) in cases.items():
        config = tmp_path / name
        config.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        recipe = recipe_file(tmp_path, f"launch-{name[:-5]}", [{"name": "prose",
                                                                 "path": paths["prose"]}],
                             launch={"accelerate_config": str(config)})
        proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                               "--output-dir", str(tmp_path / "run")], capture_output=True,
                              text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert expect in out and "Traceback" not in out, out
        assert not (tmp_path / "run").exists()

    # train.compile on a CPU without a C++ compiler: refused before the launch as well.
    (tmp_path / "no-compilers").mkdir()
    recipe = recipe_file(tmp_path, "launch-compile", [{"name": "prose", "path": paths["prose"]}],
                         train={"compile": True})
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                           "--num-processes", "2", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(env, HF_HUB_OFFLINE="1", PATH=str(tmp_path / "no-compilers")))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "C++ compiler" in out and "Traceback" not in out, out
    assert not (tmp_path / "run").exists()

    # The mixture plan for 2 processes, and the run directory: refused before the launch too.
    recipe = recipe_file(tmp_path, "launch-plan", [{"name": "prose", "path": paths["prose"]}],
                         train={"global_batch_size": 6, "micro_batch_size": 2})
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for args, expect in [([], "not a multiple of micro_batch_size (2) x processes (2)"),
                         (["train.global_batch_size=8", "--output-dir", str(existing)],
                          "already exists"),
                         (["train.global_batch_size=8", "--output-dir", str(existing),
                           "--resume", "nowhere"], "not a complete cpt checkpoint")]:
        proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                               "--num-processes", "2", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and expect in out and "Traceback" not in out, out
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    paths = write_sources(tmp_path / "data")
    recipe = recipe_file(tmp_path, "dist", [{"name": "prose", "path": paths["prose"]},
                                            {"name": "code", "path": paths["code"]}],
                         train={"steps": 6, "global_batch_size": 8, "micro_batch_size": 2,
                                "checkpoint": {"every_steps": 3, "keep": 2}},
                         eval={"every_steps": 3})
    one = train(load_recipe(recipe), output_dir=str(tmp_path / "one"))
    two_dir = tmp_path / "two"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                           "--num-processes", "2", "--output-dir", str(two_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr

    def curve(run_dir: Path) -> list[tuple[str, int, Any]]:
        return [(e["event"], e["step"], e.get("loss") or e["domains"])
                for e in read_metrics(run_dir)]

    a, b = curve(one.run_dir), curve(two_dir)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[:2] for x in a if x[0] == "train"] == [("train", s) for s in range(1, 7)]
    for (kind, step, x), (_, _, y) in zip(a, b, strict=True):
        if kind == "train":
            assert y == pytest.approx(x, rel=1e-4), step
        else:
            for name in x:
                assert y[name]["bpb"] == pytest.approx(x[name]["bpb"], rel=1e-4), (step, name)
    # The processes really were two: both wrote their RNG state, and the manifest says so.
    ckpt = two_dir / "checkpoints" / "step-000003"
    assert (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()
    manifest = json.loads((two_dir / "final" / "manifest.json").read_text())
    assert manifest["stages"][-1]["environment"]["num_processes"] == 2
    # Same weights up to float reduction order.
    wa, wb = weights(one.final_dir), weights(two_dir / "final")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-5)
    # A 2-process checkpoint resumes only with 2 processes.
    (two_dir / "final" / "eval" / "report.json").unlink()
    with pytest.raises(UsageError, match="written by 2 processes.*same --num-processes"):
        train(load_recipe(recipe), output_dir=str(two_dir), resume="auto")
    # And it does resume with 2 processes: the optimizer state gathered under names (torch's
    # distributed state-dict API) restores on both ranks, ending where the straight run ended.
    straight = weights(two_dir / "final")
    shutil.rmtree(two_dir / "final")
    proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                           "--num-processes", "2", "--output-dir", str(two_dir),
                           "--resume", "auto"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming at step 3" in proc.stderr
    resumed = weights(two_dir / "final")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
