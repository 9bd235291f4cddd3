"""Multi-process launch through `accelerate launch`, never a home-made launcher.

`cpt train --num-processes N` (or `launch.num_processes` / `launch.accelerate_config` in the
recipe) re-runs the same command under `accelerate launch -m cpt_cli train ...`. The arguments are
passed as a list, never through a shell, so no recipe value can reach one. On a machine without
GPUs, accelerate's `--cpu` path silently starts one process; `--multi_gpu` with
`Accelerator(cpu=True)` gives a real gloo group (see docs/distributed.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

LAUNCHED_ENV = "CPT_LAUNCHED"


def already_launched() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


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


def relaunch(num_processes: int, config_file: str | None, argv: list[str]) -> int:
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    return subprocess.call(accelerate_command(num_processes, config_file, argv), env=env)
