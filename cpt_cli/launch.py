"""Multi-process launch through `accelerate launch`, never a home-made launcher.

`cpt train --num-processes N` (or `launch.num_processes` / `launch.accelerate_config` in the
recipe) re-runs the same command under `accelerate launch -m cpt_cli train ...`. The arguments are
passed as a list, never through a shell, so no recipe value can reach one. On a machine without
GPUs, accelerate's `--cpu` path silently starts one process; `--multi_gpu` with
`Accelerator(cpu=True)` gives a real gloo group (see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cpt_cli.process import CONTROL_ENV, LAUNCHED_ENV


def accelerate_command(num_processes: int, config_file: str | None, argv: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
        if num_processes > 1:
            cmd += ["--num_processes", str(num_processes)]
    else:
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            cmd += ["--multi_gpu"]
        import torch  # here, not at the top: the parent process needs nothing else from it

        if not torch.cuda.is_available():
            # gloo on CPU: pick a free port so parallel test runs do not collide.
            cmd += ["--main_process_port", str(_free_port())]
    return cmd + ["-m", "cpt_cli"] + argv


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_before_launch(recipe: Any, config_file: Path | None, num_processes: int,
                        output_dir: str | None, resume: str | None, overwrite: bool, *,
                        replan: bool = False) -> None:
    """Refuse here, once, with exit status 2, what every launched process would refuse: the
    launcher would wrap each process's message in its own traceback and exit 1. Checks the run
    directory (free, or resumable as asked), train.compile's C++ compiler on CPU, the model
    location, the accelerate config (readable; DeepSpeed settings this recipe can train under),
    the data, which it also tokenizes into the cache the processes then read, and the mixture
    plan for the number of processes launched."""
    import torch  # here, not at the top: only a launching parent needs it

    from cpt_cli.data.prepare import plan_data, prepare_data
    from cpt_cli.errors import UsageError
    from cpt_cli.model import check_compiler, check_model_path
    from cpt_cli.runs.layout import check_overwrite_keeps_model, resume_point, run_dir_for
    from cpt_cli.runs.lock import RunBusy, busy_message, check_free
    from cpt_cli.training.checkpoint import plan_resumed
    from cpt_cli.training.deepspeed import deepspeed_problems

    run_dir = run_dir_for(recipe, output_dir)
    resume_from = resume_point(run_dir, resume, overwrite)
    check_overwrite_keeps_model(recipe, run_dir, overwrite and resume_from is None)
    try:
        check_free(run_dir)
    except RunBusy as busy:
        raise UsageError(busy_message(run_dir, busy.holder)) from None
    check_compiler(recipe, torch.cuda.is_available(), os.environ)
    problems = check_model_path(recipe)
    if problems:
        raise UsageError("the recipe's model cannot be used:", problems)
    if config_file is not None:
        config = _read_config(config_file)
        if num_processes <= 1:  # accelerate launch takes the config's own count
            count = config.get("num_processes", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise UsageError(f"launch.accelerate_config: {config_file}: num_processes "
                                 f"{count!r} must be a positive whole number")
            num_processes = count
        if config.get("distributed_type") == "MULTI_CPU" and num_processes > 1 and \
                int(config.get("num_machines") or 1) == 1:
            # accelerate's CPU path starts one process on one machine, silently.
            raise UsageError(f"launch.accelerate_config: {config_file}: distributed_type "
                             f"MULTI_CPU on one machine starts a single process, not "
                             f"{num_processes}; set distributed_type: MULTI_GPU (cpt runs it "
                             "over gloo on a CPU), or drop the config and use --num-processes")
        stage = _deepspeed_stage(config_file, config)
        if stage is not _NOT_DEEPSPEED:
            problems = deepspeed_problems(stage, recipe)
            if problems:
                raise UsageError(f"this recipe cannot train under {config_file}'s DeepSpeed:",
                                 problems)
    if resume_from is not None:
        plan_resumed(resume_from, recipe, prepare_data(recipe), num_processes, replan=replan)
    else:
        plan_data(recipe, prepare_data(recipe), num_processes)


_NOT_DEEPSPEED = object()


def _read(path: Path) -> Any:
    import json

    import yaml

    from cpt_cli.errors import UsageError

    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UsageError(f"launch.accelerate_config: cannot read {path} ({err}); write it "
                         "with `accelerate config` or fix the path") from None


def _read_config(config_file: Path) -> dict[str, Any]:
    """An accelerate config file, as a mapping."""
    from cpt_cli.errors import UsageError

    config = _read(config_file)
    if not isinstance(config, dict):
        raise UsageError(f"launch.accelerate_config: {config_file} is not an accelerate config "
                         "(a YAML mapping); write it with `accelerate config`")
    from accelerate.utils import DistributedType

    kind = config.get("distributed_type")
    known = [t.value for t in DistributedType]
    if kind is not None and str(kind) not in known:
        raise UsageError(f"launch.accelerate_config: {config_file}: distributed_type {kind!r} is "
                         f"not one of {', '.join(known)}; write it with `accelerate config`")
    return config


def _deepspeed_stage(config_file: Path, config: dict[str, Any]) -> Any:
    """The ZeRO stage an accelerate config asks for, or _NOT_DEEPSPEED."""
    if config.get("distributed_type") != "DEEPSPEED":  # checked exactly by _read_config
        return _NOT_DEEPSPEED
    deepspeed = config.get("deepspeed_config") or {}
    if deepspeed.get("deepspeed_config_file"):  # a DeepSpeed JSON, beside the accelerate file
        path = Path(deepspeed["deepspeed_config_file"]).expanduser()
        if not path.is_absolute() and not path.exists():  # accelerate reads it from the cwd
            path = config_file.parent / path
        return (_read(path).get("zero_optimization") or {}).get("stage")
    return deepspeed.get("zero_stage")


def relaunch(num_processes: int, config_file: str | None, argv: list[str]) -> int:
    """Run the command under `accelerate launch` and return the main worker's exit status.

    The launcher runs in a process group of its own, so Ctrl-C reaches only this process, which
    passes it (and SIGTERM) to the workers directly: torch's launcher, signalled itself, would
    print a traceback, exit 1, and kill workers still writing their checkpoint after 30 s. A
    worker that stops on purpose (a signal, a mistake, a forgetting budget) exits 0 for the
    launcher and leaves its status here (`finish_worker`). The launcher stops with this process
    (and its workers with the launcher: see runs/lock.py)."""
    import signal
    import tempfile

    from cpt_cli.runs.lock import stop_with_parent

    parent = os.getpid()
    with tempfile.TemporaryDirectory(prefix="cpt-launch-") as control:
        env = dict(os.environ, **{LAUNCHED_ENV: "1", CONTROL_ENV: control})
        proc = subprocess.Popen(accelerate_command(num_processes, config_file, argv), env=env,
                                process_group=0,
                                preexec_fn=lambda: stop_with_parent(signal.SIGTERM, parent))

        def forward(signum: int, _: Any) -> None:
            pids = (p.read_text().strip() for p in Path(control).glob("worker-*.pid"))
            workers = [int(pid) for pid in pids if pid.isdigit()]
            for pid in workers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)
            if not workers:  # still starting: the launcher passes it on
                proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return launch_result(Path(control), code)


def launch_result(control: Path, launcher_code: int) -> int:
    """The exit status of a launched run: the main worker's (see finish_worker), or the
    launcher's when a worker did not finish. A worker that fails after every worker has
    finished (a process-group thread aborting at interpreter exit) does not undo a finished run:
    torch's launcher reports it as a failure, cpt keeps the run's own status and says so."""
    status = control / "status"
    if not status.is_file():
        return launcher_code
    if launcher_code != 0:
        started = {p.name.removesuffix(".pid") for p in control.glob("worker-*.pid")}
        finished = {p.name.removesuffix(".done") for p in control.glob("worker-*.done")}
        if not started or started - finished:
            return launcher_code
        print(f"note: a worker process failed while exiting (reported above by torch's launcher, "
              f"exit status {launcher_code}) after every worker had finished; the run's own exit "
              f"status stands.", file=sys.stderr)
    return int(status.read_text())
