"""The accelerator: device, precision, trackers and the checks that the launch gave a real
process group (training/setup.py builds it first, before any data or model)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cpt_cli.config import Recipe
from cpt_cli.errors import UsageError
from cpt_cli.model import check_compiler
from cpt_cli.process import worker_rank


def make_accelerator(recipe: Recipe, run_dir: Path) -> Any:
    """The Accelerator for this run, once the compiler and the launch are known to work."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if not cuda:
        # Where DeepSpeed is installed, accelerate imports it (unwrapping a model for a
        # checkpoint), and DeepSpeed's accelerator detection then logs a warning into the live
        # view; its documented override names the CPU it would settle on anyway.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    check_compiler(recipe, cuda, os.environ)
    accelerator = Accelerator(**accelerator_device(cuda, os.environ),
                              mixed_precision=mixed_precision(recipe, cuda),
                              log_with=trackers(recipe) or None,
                              project_dir=str(run_dir))
    check_world(accelerator.num_processes, os.environ)
    return accelerator


def mixed_precision(recipe: Recipe, cuda: bool) -> str:
    """accelerate's mixed_precision for train.precision: autocast over fp32 master weights."""
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if p == "fp32" or not cuda:
        return "no"  # CPU trains in fp32: bf16 autocast there is slower and less exact
    if p == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"train.precision: bf16 is not supported by this GPU "
                         f"({torch.cuda.get_device_name()}); use fp16, fp32 or auto")
    return p


def accelerator_device(cuda: bool, env: Mapping[str, str]) -> dict[str, Any]:
    """Accelerator arguments that give a real process group on this machine.

    Without a GPU, `cpu=True` makes the launched processes a gloo group (MULTI_CPU), but
    accelerate then ignores a DeepSpeed config altogether (`ACCELERATE_USE_DEEPSPEED`, set by
    `accelerate launch` for `distributed_type: DEEPSPEED`, is honoured only when cpu is False):
    the run would silently be plain data parallel. Under DeepSpeed on CPU, cpu=False with an
    explicit gloo backend gives DeepSpeed's engine on a 2-process gloo group; without the
    backend each process would report `num_processes == 1` (checked with accelerate 1.15,
    deepspeed 0.19.8)."""
    if cuda:
        return {"cpu": False}
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def check_world(num_processes: int, env: Mapping[str, str]) -> None:
    """Refuse a launch where the launcher started several processes but accelerate sees one
    each (`accelerate launch --cpu`, or torchrun without a process group): each would train
    alone into the same run directory."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes == 1:
        raise UsageError(f"launched as {world} processes (WORLD_SIZE={world}) but accelerate "
                         "sees one: each would train alone into the same run directory. Launch "
                         "with `cpt train --num-processes N`, or `accelerate launch --multi_gpu "
                         "--num_processes N -m cpt_cli train RECIPE`.")


def trackers(recipe: Recipe) -> list[str]:
    """The recipe's train.trackers that are installed; a missing one is said once, not by
    every process."""
    available = []
    for name in recipe.train.trackers:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
        if importlib.util.find_spec(module) is not None:
            available.append(name)
        elif worker_rank() == "0":
            print(f"cpt: tracker {name!r} is not installed; logging to metrics.jsonl only",
                  file=sys.stderr)
    return available


def end(accelerator: Any, metrics: Any) -> None:
    """Close the metrics file, wait for every process, finish the trackers and destroy the
    process group (accelerate's documented end of a run; see also process.end_worker)."""
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
