"""DeepSpeed ZeRO 1 and 2 under accelerate: what a recipe needs to train under it, the engine's
batch geometry and clipping, and its checkpoint and optimizer state.

Under DeepSpeed a checkpoint also holds the engine's own checkpoint in deepspeed/<tag>/: the
module's weights (mp_rank_00_model_states.pt) and one optimizer partition per process
(zero_pp_rank_R_mp_rank_00_optim_states.pt, with the fp32 master weights and the moments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cpt_cli.config import Recipe
from cpt_cli.errors import UsageError
from cpt_cli.training.optim import param_groups

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_problems(stage: Any, recipe: Recipe) -> list[str]:
    """What keeps this recipe from training under DeepSpeed ZeRO `stage`; checked before an
    `accelerate launch` (cpt_cli.launch) and again in each launched process."""
    problems = []
    if stage not in (1, 2):
        # Stage 3 partitions the weights too: cpt's checkpoint and final/ code reads and writes
        # whole weights, and only stages 1 and 2 are tested (tests/test_deepspeed.py).
        problems.append(f"deepspeed_config zero_stage {stage}: cpt supports DeepSpeed ZeRO "
                        "stages 1 and 2; for sharded weights use FSDP (docs/distributed.md), "
                        "for plain data parallel leave DeepSpeed out of the accelerate config")
    if recipe.train.optimizer.load_from_parent:
        # DeepSpeed builds its partitions from the parameters in prepare(): a state loaded into
        # the optimizer before would not reach them.
        problems.append("train.optimizer.load_from_parent does not work under DeepSpeed yet "
                        "(DeepSpeed rebuilds the optimizer's state when it partitions it); set "
                        "load_from_parent: false (the stage re-warms a fresh optimizer, the "
                        "default) or launch with FSDP or plain data parallel "
                        "(docs/distributed.md)")
    return problems


def configure_deepspeed(accelerator: Any, recipe: Recipe, accum: int) -> None:
    """Give DeepSpeed's config the recipe's batch geometry and clipping: cpt passes no
    DataLoader to `prepare`, so accelerate cannot infer the micro batch, and the engine (which
    accumulates, clips and steps by itself) must agree with cpt's loop. "auto" or absent values
    are filled; a value that contradicts the recipe is refused (exit 2), since the effective
    batch or clipping would silently differ from the recipe's."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    problems = deepspeed_problems(config.get("zero_optimization", {}).get("stage"), recipe)
    if problems:
        raise UsageError("this recipe cannot train under the accelerate config's DeepSpeed:",
                         problems)
    t = recipe.train
    wanted = {"train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
              "gradient_accumulation_steps": (accum, "global batch / (micro batch x processes)"),
              # DeepSpeed reads 0 as no clipping.
              "gradient_clipping": (t.grad_clip or 0.0, "train.grad_clip")}
    problems = []
    for key, (value, source) in wanted.items():
        have = config.get(key, "auto")
        if have in ("auto", None):
            config[key] = value
        elif float(have) != float(value):
            problems.append(f"deepspeed_config {key}: {have}, but cpt's is {value} ({source}); "
                            f"set it to {value} or to auto")
    train_batch = t.micro_batch_size * accum * accelerator.num_processes
    if config.get("train_batch_size", "auto") not in ("auto", None, train_batch):
        problems.append(f"deepspeed_config train_batch_size: {config['train_batch_size']}, but "
                        f"the recipe's global batch is {train_batch}; set it to auto")
    config["train_batch_size"] = train_batch
    if problems:
        raise UsageError("the accelerate config's DeepSpeed settings disagree with the recipe:",
                         problems)
    accelerator.gradient_accumulation_steps = accum


def save_deepspeed_state(folder: Path, engine: Any) -> None:
    """Every process writes its own partition through the engine's public save_checkpoint (a
    collective). No `latest` file: cpt's step-N folder names the checkpoint, and the tag is
    fixed. The scheduler is cpt's own (scheduler.pt), not the engine's."""
    engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)


def load_deepspeed_state(path: Path, engine: Any) -> None:
    """Restore weights, fp32 master weights and optimizer partitions through the engine's
    public load_checkpoint: loading model.safetensors alone would leave ZeRO's fp32 master copy
    (from which the next update is computed) at its initial values."""
    if not (path / DEEPSPEED_DIR / DEEPSPEED_TAG).is_dir():
        raise UsageError(f"cannot resume from {path} under DeepSpeed: it has no "
                         f"{DEEPSPEED_DIR}/{DEEPSPEED_TAG}/ folder (it was written without "
                         "DeepSpeed). Resume with the launch that wrote it, or start a new stage "
                         "with model.path pointing at it.")
    loaded, _ = engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                       load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_only=False)
    if loaded is None:
        raise UsageError(f"cannot resume from {path}: DeepSpeed could not load "
                         f"{path / DEEPSPEED_DIR / DEEPSPEED_TAG} (see its log above); resume "
                         "from another checkpoint (--resume checkpoints/step-N).")


def deepspeed_optimizer_state(engine: Any, optimizer: Any, recipe: Recipe) -> dict[str, Any]:
    """Under ZeRO 1/2 every process holds one contiguous slice of each parameter group's
    flattened AdamW moments. Each process cuts its slice into per-parameter fragments with the
    map its optimizer's `state_dict()` publishes (`param_slice_mappings`: name -> start and
    numel), and the main process gathers them (a collective: every process calls it) into the
    layout of `get_optimizer_state_dict(full_state_dict=True)`: moments and step under parameter
    names, groups listing names. So `final/optimizer.pt` serves a next stage's
    `optimizer.load_from_parent` whatever the launch. Resume does not read it: it restores
    DeepSpeed's own per-process files (`save_deepspeed_state`), which are exact.

    (DeepSpeed's `safe_get_full_optimizer_state` would do this per parameter, but in 0.19.8 it
    only knows the first parameter group's moments: the ZeRO optimizer links its fragments after
    stepping group 0 alone, and cpt has up to 3 groups.) Returns {} on the other processes."""
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS

    zero = optimizer.state_dict()
    flat_state = zero[BASE_OPTIMIZER_STATE]["state"]  # group i's flat partition is param i
    mine: dict[str, dict[str, torch.Tensor]] = {}
    for g, mapping in enumerate(zero[PARAM_SLICE_MAPPINGS]):
        flat = flat_state.get(g)
        if not flat:
            continue  # no update yet: torch's state has no entry either
        for name, address in mapping.items():
            mine[name] = {"step": flat["step"].detach().cpu().clone(), **{
                key: flat[key].narrow(0, address.start, address.numel).detach().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq")}}
    main = engine.global_rank == 0
    pieces: list[Any] = [None] * torch.distributed.get_world_size() if main else []
    torch.distributed.gather_object(mine, pieces if main else None, dst=0)
    if not main:
        return {}
    module = engine.module
    names = {id(p): n for n, p in module.named_parameters()}
    shapes = {n: p.shape for n, p in module.named_parameters()}
    state: dict[str, Any] = {}
    for name in shapes:
        # A parameter may span processes: its fragments, in process order, are the whole.
        owned = [piece[name] for piece in pieces if name in piece]
        if not owned:
            continue
        state[name] = {"step": owned[0]["step"], **{
            key: torch.cat([o[key] for o in owned]).view(shapes[name])
            for key in ("exp_avg", "exp_avg_sq")}}
    # The grouping the optimizer was built with (param_groups is deterministic): DeepSpeed
    # replaced each group's parameters by one flat partition, and the names are what is saved.
    groups = param_groups(module, recipe)
    saved_groups = [{**{k: v for k, v in live.items() if k != "params"},
                     "params": [names[id(p)] for p in group["params"]]}
                    for group, live in zip(groups, optimizer.param_groups, strict=True)]
    return {"state": state, "param_groups": saved_groups}
