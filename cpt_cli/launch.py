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
from pathlib import Path
from typing import Any

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


def check_before_launch(recipe: Any, config_file: Path | None) -> None:
    """Refuse here, once, with exit status 2, what every launched process would refuse: the
    launcher would wrap each process's message in its own traceback and exit 1. Checks
    train.compile's C++ compiler on CPU, the model location, the accelerate config (readable;
    DeepSpeed settings this recipe can train under) and the data, which it also tokenizes into
    the cache the processes then read."""
    import torch  # here, not at the top: only a launching parent needs it

    from cpt_cli.errors import UsageError
    from cpt_cli.modeling import check_model_path
    from cpt_cli.prepare import prepare_data
    from cpt_cli.trainer import check_compiler, deepspeed_problems

    check_compiler(recipe, torch.cuda.is_available(), os.environ)
    problems = check_model_path(recipe)
    if problems:
        raise UsageError("the recipe's model cannot be used:", problems)
    if config_file is not None:
        stage = _deepspeed_stage(config_file)
        if stage is not _NOT_DEEPSPEED:
            problems = deepspeed_problems(stage, recipe)
            if problems:
                raise UsageError(f"this recipe cannot train under {config_file}'s DeepSpeed:",
                                 problems)
    prepare_data(recipe)


_NOT_DEEPSPEED = object()


def _deepspeed_stage(config_file: Path) -> Any:
    """The ZeRO stage an accelerate config file asks for, or _NOT_DEEPSPEED."""
    import json

    import yaml

    from cpt_cli.errors import UsageError

    def read(path: Path) -> Any:
        try:
            text = path.read_text()
            return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise UsageError(f"launch.accelerate_config: cannot read {path} ({err}); write it "
                             "with `accelerate config` or fix the path") from None

    config = read(config_file)
    if not isinstance(config, dict):
        raise UsageError(f"launch.accelerate_config: {config_file} is not an accelerate config "
                         "(a YAML mapping); write it with `accelerate config`")
    if str(config.get("distributed_type", "")).upper() != "DEEPSPEED":
        return _NOT_DEEPSPEED
    deepspeed = config.get("deepspeed_config") or {}
    if deepspeed.get("deepspeed_config_file"):  # a DeepSpeed JSON, beside the accelerate file
        path = Path(deepspeed["deepspeed_config_file"]).expanduser()
        if not path.is_absolute() and not path.exists():  # accelerate reads it from the cwd
            path = config_file.parent / path
        return (read(path).get("zero_optimization") or {}).get("stage")
    return deepspeed.get("zero_stage")


def relaunch(num_processes: int, config_file: str | None, argv: list[str]) -> int:
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    return subprocess.call(accelerate_command(num_processes, config_file, argv), env=env)
