"""DeepSpeed ZeRO on CPU: `cpt train` with an accelerate config of `distributed_type: DEEPSPEED`
and 2 processes (gloo) trains, and a run resumed from a checkpoint with `--resume auto` ends bit
for bit where the straight run ends: every process's optimizer partition is restored through the
engine's own save_checkpoint / load_checkpoint. Needs `deepspeed` (in the dev extra)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import recipe_file, tiny_config, weights, write_sources


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_config(path: Path, stage: int) -> Path:
    path.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
        # Batch size, accumulation and clipping are left to cpt, which fills them from the recipe.
        "deepspeed_config": {"zero_stage": stage, "offload_optimizer_device": "none",
                             "offload_param_device": "none", "zero3_init_flag": False},
        "mixed_precision": "no", "num_machines": 1, "num_processes": 2, "machine_rank": 0,
        # A free port: parallel test runs must not meet on accelerate's default 29500.
        "main_process_port": _free_port(), "rdzv_backend": "static", "same_network": True,
        "use_cpu": False}))
    return path


def _train(recipe: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                           "--num-processes", "2", "--output-dir", str(run_dir), *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 1])
def test_zero_resume_is_bit_exact(tmp_path: Path, stage: int) -> None:
    import deepspeed  # noqa: F401 - a dev dependency: missing, the test fails (not skips)

    paths = write_sources(tmp_path / "data")
    config = _accelerate_config(tmp_path / "accelerate-zero.yaml", stage)
    # global 16 = micro 4 x 2 processes x 2 accumulation steps: the engine must accumulate
    # (and not divide the already normalized loss again) to match cpt's loop.
    recipe = recipe_file(tmp_path, "zero", [{"name": "prose", "path": paths["prose"]},
                                            {"name": "code", "path": paths["code"]}],
                         train={"steps": 6, "global_batch_size": 16, "micro_batch_size": 4,
                                "checkpoint": {"every_steps": 3, "keep": 2}},
                         eval={"every_steps": 3}, launch={"accelerate_config": str(config)})
    run_dir = tmp_path / "run"
    _train(recipe, run_dir)
    ckpt = run_dir / "checkpoints" / "step-000003"
    # Every process wrote its own optimizer partition, inside the atomically renamed folder.
    for rank in (0, 1):
        assert (ckpt / "deepspeed" / "state" /
                f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    straight = weights(run_dir / "final")
    straight_optimizer = torch.load(run_dir / "final" / "optimizer.pt", weights_only=True)
    # final/optimizer.pt is the whole state under parameter names (both partitions gathered),
    # the layout a next stage's optimizer.load_from_parent reads.
    assert set(straight_optimizer["state"]) == set(straight)
    for name, moments in straight_optimizer["state"].items():
        assert moments["exp_avg"].shape == straight[name].shape, name
        assert moments["step"].item() == 6

    # Interrupted after the step-3 checkpoint (final/ removed: the run is unfinished), resumed.
    shutil.rmtree(run_dir / "final")
    proc = _train(recipe, run_dir, "--resume", "auto")
    assert "resuming at step 3" in proc.stderr
    resumed = weights(run_dir / "final")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    resumed_optimizer = torch.load(run_dir / "final" / "optimizer.pt", weights_only=True)
    for name, moments in straight_optimizer["state"].items():
        for key, value in moments.items():
            assert torch.equal(resumed_optimizer["state"][name][key], value), (name, key)
    if stage != 2:
        return
    # A next stage that asks for the parent's optimizer state under DeepSpeed is refused up
    # front (DeepSpeed would rebuild the state when it partitions), not silently re-warmed.
    child_config = tiny_config(tmp_path, "zero-child", [{"name": "prose", "path": paths["prose"]}],
                               train={"steps": 2, "global_batch_size": 16, "micro_batch_size": 4,
                                      "optimizer": {"load_from_parent": True}},
                               launch={"accelerate_config": str(config)})
    child_config["model"] = {"path": str(run_dir / "final")}
    child = tmp_path / "zero-child.yaml"
    child.write_text(yaml.safe_dump(child_config))
    proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(child), "--num-processes",
                           "2", "--output-dir", str(tmp_path / "child")], capture_output=True,
                          text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "load_from_parent does not work under DeepSpeed" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "child").exists()
