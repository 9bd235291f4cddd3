"""Kills: `cpt train` SIGKILLed at random moments, ten times in a row, resumed each time with
`--resume auto`, always resumes from the newest complete checkpoint and ends with the weights of a
run never interrupted, bit for bit. A checkpoint is written every step, so many kills land while
one is being written.

Each launch pays Python's start and the imports of torch and transformers (about 5 s on 2 cores),
so the whole test takes about a minute.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import recipe_file, weights, write_sources

from cpt_cli.config import load_recipe
from cpt_cli.runs.layout import complete_checkpoints
from cpt_cli.training.loop import train

pytestmark = pytest.mark.slow

KILLS = 10
STEPS = 50
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt",
                    "scheduler.pt", "rng-0.pt", "trainer_state.json", "manifest.json")


def _launch(recipe: Path, run_dir: Path, log: Path,
            *overrides: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                                 *overrides, "--output-dir", str(run_dir), "--resume", "auto"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until `pattern` appears in the log (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"no {pattern!r} in {timeout} s:\n{log.read_text()}")


def _newest_step(run_dir: Path) -> int | None:
    ckpts = complete_checkpoints(run_dir)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else None


def _assert_complete(ckpt: Path) -> None:
    """Every file present and readable: a step-N folder is never a partial write."""
    for name in CHECKPOINT_FILES:
        assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
    load_file(str(ckpt / "model.safetensors"))
    torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.load(ckpt / "scheduler.pt", weights_only=True)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert ckpt.name == f"step-{state['step']:06d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The recipe, and its run never interrupted (in this process; it also fills the
    tokenization cache the launches below read)."""
    tmp = tmp_path_factory.mktemp("kill")
    paths = write_sources(tmp / "data")
    recipe = recipe_file(tmp, "killed", [{"name": "prose", "path": paths["prose"]},
                                         {"name": "code", "path": paths["code"]}],
                         train={"steps": STEPS, "checkpoint": {"every_steps": 1, "keep": 2},
                                "schedule": {"name": "cosine", "warmup": 5}},
                         eval={"every_steps": None})
    # Checkpoints do not change the weights; without them this run takes a third of the time.
    result = train(load_recipe(recipe, ["train.checkpoint.every_steps=null"]),
                   output_dir=str(tmp / "straight"))
    return {"recipe": recipe, "final": result.final_dir}


def _assert_same_final(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_sigkill_ten_times_then_resume_is_bit_exact(straight: dict[str, Any],
                                                    tmp_path: Path) -> None:
    recipe = straight["recipe"]
    rng = random.Random(20261126)
    run_dir = tmp_path / "run"
    history: list[dict[str, Any]] = []
    mid_write, first_step_after = 0, 0.0
    for attempt in range(KILLS):
        expected = _newest_step(run_dir)
        log = tmp_path / f"launch-{attempt}.log"
        proc, launched = _launch(recipe, run_dir, log), time.monotonic()
        if attempt % 4 == 3:
            # Anywhere from the imports to the first steps: up to 0.7 of the time the first
            # launch took to its first step (imports, data, start evaluation).
            time.sleep(rng.uniform(0.1, 0.7) * first_step_after)
        else:
            # Somewhere in training: 2 to 5 steps after the resume point (so every such kill
            # makes progress however loaded the machine is), then up to 1.2 times the last
            # step's duration more; a step includes its checkpoint, so this often lands inside
            # the next checkpoint's write.
            target = (expected or 0) + rng.randint(2, 5)
            assert _wait_for(log, rf"^step {target - 1}\b", proc, timeout=120), log.read_text()
            before = time.monotonic()
            if attempt == 0:
                first_step_after = before - launched
            assert _wait_for(log, rf"^step {target}\b", proc, timeout=120), log.read_text()
            time.sleep(rng.uniform(0.0, 1.2) * (time.monotonic() - before))
        assert proc.poll() is None, f"launch {attempt} finished before its kill:\n" \
                                    f"{log.read_text()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        text = log.read_text(errors="replace")
        resumed = re.search(r"resuming at step (\d+)", text)
        trained = [int(s) for s in re.findall(r"^step (\d+)", text, re.MULTILINE)]
        if trained:  # it got as far as training: it must have started from the newest
            assert (int(resumed.group(1)) if resumed else None) == expected, text
        for ckpt in complete_checkpoints(run_dir):
            _assert_complete(ckpt)
        debris = list((run_dir / "checkpoints").glob(".tmp-*")) if run_dir.exists() else []
        mid_write += bool(debris)
        history.append({"resumed_from": expected, "last_step": max(trained, default=None),
                        "newest_after": _newest_step(run_dir), "mid_write": bool(debris)})

    last = tmp_path / "final.log"
    proc = _launch(recipe, run_dir, last)
    assert proc.wait(timeout=300) == 0, last.read_text()
    assert re.search(rf"resuming at step {history[-1]['newest_after']}\b", last.read_text())
    print(f"kills: {KILLS}, of which {mid_write} during a checkpoint write; {history}")

    _assert_same_final(straight["final"], run_dir / "final")
    assert not list(run_dir.rglob(".tmp-*")) and not list(run_dir.rglob(".del-*"))


def test_sigint_then_double_sigterm_then_resume(straight: dict[str, Any], tmp_path: Path) -> None:
    """SIGINT finishes the step, checkpoints it and exits 130 saying how to resume; a second
    signal exits at once (143) without damaging a checkpoint; the run then resumes and ends
    identical to the uninterrupted one."""
    recipe, run_dir = straight["recipe"], tmp_path / "run"
    log = tmp_path / "sigint.log"
    proc = _launch(recipe, run_dir, log)
    assert _wait_for(log, r"^step 3\b", proc, timeout=120), log.read_text()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    stopped = re.search(r"received SIGINT at step (\d+) of 50: checkpoint saved", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert step == max(int(s) for s in re.findall(r"^step (\d+)", text, re.MULTILINE))
    assert _newest_step(run_dir) == step
    assert re.search(r"resume: cpt train \S+killed.yaml --output-dir \S+ --resume auto", text)

    log = tmp_path / "sigterm.log"
    proc = _launch(recipe, run_dir, log)
    assert _wait_for(log, rf"^step {step + 2}\b", proc, timeout=120), log.read_text()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    assert "second signal (SIGTERM): exiting now" in text or "received SIGTERM" in text, text
    for ckpt in complete_checkpoints(run_dir):
        _assert_complete(ckpt)

    log = tmp_path / "resumed.log"
    proc = _launch(recipe, run_dir, log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    _assert_same_final(straight["final"], run_dir / "final")


def test_a_second_train_of_a_run_in_progress_is_refused(straight: dict[str, Any],
                                                        tmp_path: Path) -> None:
    """Two trainings never write one run directory: a resume started while the run still trains
    exits 2 naming the process that holds it, and writes nothing. The first run rotates a
    checkpoint every step (keep 2), so the second must hold the directory before it reads the
    checkpoint it resumes from (it once read one half deleted)."""
    recipe, run_dir = straight["recipe"], tmp_path / "run"
    log = tmp_path / "first.log"
    # Long enough that the first run is still training however fast the machine: it is killed.
    longer = ("train.steps=100000", "data.max_epochs=100000")
    proc = _launch(recipe, run_dir, log, *longer)
    try:
        assert _wait_for(log, r"^step 2\b", proc, timeout=120), log.read_text()
        second = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe), *longer,
                                 "--output-dir", str(run_dir), "--resume", "auto"],
                                capture_output=True, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
        assert proc.poll() is None, "the first run ended before the second was refused"
    finally:
        proc.kill()
        proc.wait()
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"is being trained by another cpt train (process {proc.pid})" in second.stderr
    assert "Traceback" not in second.stdout + second.stderr


def test_ctrl_c_stops_a_two_process_run_with_a_checkpoint_and_no_traceback(
        straight: dict[str, Any], tmp_path: Path) -> None:
    """Ctrl-C reaches cpt's own process (the launcher runs in a process group of its own), which
    passes it to the workers: they checkpoint, and cpt exits 130 with the one message, as with
    one process; a second `cpt train` of the run meanwhile is refused by the parent."""
    recipe, run_dir = straight["recipe"], tmp_path / "run"
    log = tmp_path / "launched.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "cpt_cli", "train", str(recipe), "train.steps=1000",
            "data.max_epochs=1000", "--output-dir", str(run_dir), "--resume", "auto",
            "--num-processes", "2"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        assert _wait_for(log, r"^step 3\b", proc, timeout=180), log.read_text()
        second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is being trained by another cpt train" in second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        proc.send_signal(signal.SIGINT)  # what the terminal sends to cpt's process group
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    stopped = re.search(r"received SIGINT at step (\d+) of 1000: checkpoint saved", text)
    assert stopped, text
    assert _newest_step(run_dir) == int(stopped.group(1))


def test_killing_the_launcher_stops_its_workers_with_a_checkpoint(straight: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    """`accelerate launch` starts each worker in a session of its own. SIGKILL to the launching
    process group (cpt and accelerate) must not leave them training unsupervised: they get
    SIGTERM, checkpoint and exit, releasing the run directory, and the run resumes."""
    from cpt_cli.runs.lock import RunBusy, lock_run_dir

    recipe, run_dir = straight["recipe"], tmp_path / "run"
    log = tmp_path / "launched.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "cpt_cli", "train", str(recipe), "--output-dir", str(run_dir),
            "--resume", "auto", "--num-processes", "2"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    assert _wait_for(log, r"^step 3\b", proc, timeout=180), log.read_text()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while True:  # the lock is free once the main worker has exited
        try:
            os.close(lock_run_dir(run_dir))
            break
        except RunBusy:
            assert time.monotonic() < deadline, f"workers still running:\n{log.read_text()}"
            time.sleep(0.2)
    text = log.read_text(errors="replace")
    # The launcher gets SIGTERM when cpt dies and passes it on; a worker whose launcher died
    # first gets SIGUSR1. Either way: finish the step, checkpoint, exit.
    stopped = re.search(r"received SIG(?:TERM|USR1) at step (\d+) of 50: checkpoint saved", text)
    assert stopped, text
    assert _newest_step(run_dir) == int(stopped.group(1))
    assert not (run_dir / "final").exists()
    with open(tmp_path / "resumed.log", "wb") as fh:
        assert subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                              timeout=600).returncode == 0, (tmp_path / "resumed.log").read_text()
    resumed = (tmp_path / "resumed.log").read_text()
    assert f"resuming at step {stopped.group(1)}" in resumed, resumed
