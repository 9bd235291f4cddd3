"""One optimizer step: the micro batches with gradient accumulation, backward, clipping, the one
host sync per step, then the update (skipped for a non-finite loss or gradient norm) and the
schedule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpt_cli.training.setup import Run
from cpt_cli.training.signals import Signals


@dataclass(frozen=True)
class StepResult:
    loss: float                 # the global mean loss per label token
    grad_norm: float | None     # before clipping; None without train.grad_clip
    lr: float                   # the peak-group lr this update used
    stop_requested: bool        # a signal arrived on some process during the step
    bad: bool                   # non-finite loss (or gradient norm): the update was skipped
    trained_tokens: dict[str, int]  # per source, the global batch's tokens the loss saw


def train_step(run: Run, step: int, micro_batches: Sequence[Any],
               signals: Signals) -> StepResult:
    """Train on one global batch (`step` counts from 0). Every process calls it."""
    # Per source, from the plan: the same figures on every process, with no reduce.
    trained = run.loader.step_trained_tokens(step)
    step_loss = _accumulate(run, micro_batches, int(trained.sum()))
    norm = None
    if run.recipe.train.grad_clip is not None:
        # Under DeepSpeed the engine has already clipped (gradient_clipping, set from
        # train.grad_clip) and stepped: this only reads the norm it measured.
        norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.recipe.train.grad_clip)
    loss, stop_requested, grad_norm = _host_sync(run, step_loss, norm, signals)
    # The lr this update uses (the scheduler then moves on to the next step's); the first
    # group holds matrices, whose lr_scale is 1.
    lr = run.optimizer.param_groups[0]["lr"] / run.optimizer.param_groups[0]["lr_scale"]
    check_grad_norm = run.accelerator.mixed_precision != "fp16"  # the fp16 scaler skips infs
    bad = not math.isfinite(loss) or (
        check_grad_norm and grad_norm is not None and not math.isfinite(grad_norm))
    if not bad:
        # Under DeepSpeed the engine's update has already landed (it steps inside backward):
        # a bad step is counted and can stop the run, but is not undone.
        run.optimizer.step()
    # A skipped batch still counts as a step: the data, the schedule and the step number stay
    # aligned, so a resumed run and the plan agree on what step N is.
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, stop_requested=stop_requested,
                      bad=bad, trained_tokens={stream.name: int(n) for stream, n in
                                           zip(run.loader.streams, trained, strict=True)})


def _accumulate(run: Run, micro_batches: Sequence[Any], n_targets: int) -> torch.Tensor:
    """Forward and backward over the step's micro batches; the summed loss, on the device.
    `n_targets`: the trained tokens of the whole global batch (all micro batches, all
    processes), which concat packing with loss masks makes fewer than seq_len - 1 a row."""
    recipe, accelerator, device = run.recipe, run.accelerator, run.accelerator.device
    # HF's loss divides the summed token losses by num_items_in_batch; DDP then averages
    # over the P processes, so scale by P to get the exact global mean over trained tokens.
    num_items = torch.tensor(n_targets / accelerator.num_processes, device=device)
    step_loss = torch.zeros((), device=device)
    for a, mb in enumerate(micro_batches):
        sync = a == len(micro_batches) - 1
        # Restarting position_ids are the document masking (transformers builds the
        # block-diagonal mask from them); across documents the model's own positions,
        # computed once per batch rather than per row, are the same thing for less.
        positions = None if recipe.data.cross_document_attention else \
            mb.position_ids.to(device, non_blocking=True)
        if run.deepspeed:
            # DeepSpeed's engine reduces and steps inside backward when told this is the
            # last micro batch; cpt's loss is already the global mean's share, so the
            # engine must not divide it by its accumulation steps again.
            accelerator.sync_gradients = sync
            no_sync: Any = contextlib.nullcontext()
            backward_kwargs = {"scale_wrt_gas": False}
        else:
            no_sync = accelerator.no_sync(run.model) if not sync else contextlib.nullcontext()
            backward_kwargs = {}
        with no_sync:
            out = run.model(input_ids=mb.input_ids.to(device, non_blocking=True),
                            position_ids=positions,
                            labels=mb.labels.to(device, non_blocking=True),
                            num_items_in_batch=num_items, use_cache=False)
            accelerator.backward(out.loss, **backward_kwargs)
        step_loss += out.loss.detach()
    return step_loss


def _host_sync(run: Run, step_loss: torch.Tensor, norm: Any,
               signals: Signals) -> tuple[float, bool, float | None]:
    """One reduce and one host sync per step (a GPU stall each), carrying the loss, every
    process's stop request and the gradient norm: a NaN must stop the update before it lands,
    and all processes must stop after the same step. Returns the mean loss, whether any
    process got a signal, and the gradient norm."""
    accelerator, device = run.accelerator, run.accelerator.device
    P = accelerator.num_processes
    flags = torch.stack([step_loss, torch.tensor(float(signals.received is not None),
                                                 device=device)])
    flags = accelerator.reduce(flags, reduction="sum") if P > 1 else flags
    if norm is not None:
        flags = torch.cat([flags, torch.as_tensor(norm, device=device).float().reshape(1)])
    host = flags.tolist()
    return host[0] / P, host[1] > 0, host[2] if norm is not None else None
