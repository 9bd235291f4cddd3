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
