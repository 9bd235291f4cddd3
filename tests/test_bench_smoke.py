"""The GPU throughput benchmark's CPU smoke test: tiny shapes through cpt's real training path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_throughput_bench_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CPT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), "--tiny",
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["cpt"]
    assert row["model"] == "tiny" and row["tok_s"] > 0
    assert row["flops_per_token"] > 0


@pytest.mark.slow
def test_cpu_train_bench_runs_every_contender_in_lockstep(tmp_path: Path) -> None:
    """bench/cpu_train.py's lock-step of five processes, cut to one timed step each."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_train.py"), "--steps", "1",
                           "--warmup", "1", "--rounds", "1", "--json", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)["results"]
    assert len(results) == 5
    for name, row in results.items():
        assert row["timed_steps"] == 1 and row["tokens_per_s"] > 0, name
    assert results["Hugging Face Trainer"]["ratio"] == 1.0
