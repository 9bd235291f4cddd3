"""The training loop: plain PyTorch on accelerate, in one module.

    cpt train recipes/quickstart/cpt.yaml                  # one process (CPU or one GPU)
    accelerate launch -m cpt_cli train RECIPE              # any accelerate setup (FSDP, DeepSpeed)

`train(recipe)` = setup (data, model, optimizer, run directory), evaluate the starting model, then
per step: micro batches with gradient accumulation, clip, step, schedule; every `eval.every_steps`
the per-domain held-out evaluation (forgetting curves in metrics.jsonl); every
`checkpoint.every_steps` an atomic checkpoint that resumes bit for bit; at the end `final/` and the
forgetting table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError

from cpt_cli.config import Recipe, ScheduleConfig, model_location, save_recipe
from cpt_cli.data.loader import PackedLoader
from cpt_cli.data.prepare import PreparedData, batch_geometry, plan_data, prepare_data
from cpt_cli.errors import TrainingStopped, UsageError
from cpt_cli.evaluation.report import (
    forgetting_table,
    load_scores,
    save_scores,
    score_domains,
    training_window,
)
from cpt_cli.hostmemory import keep_freed_memory
from cpt_cli.model import check_model_path, load_model, max_context
from cpt_cli.process import finish_worker, worker_rank
from cpt_cli.runs.layout import (
    CHECKPOINTS,
    check_overwrite_keeps_model,
    complete_checkpoints,
    resume_point,
    run_dir_for,
)
from cpt_cli.runs.lineage import (
    FORMAT,
    HELDOUT_DIR,
    MANIFEST,
    copy_heldout,
    environment,
    json_safe,
    read_heldout,
    write_heldout,
    write_json,
)
from cpt_cli.runs.lock import LAUNCHER_GONE, LOCK_NAME, RunBusy, busy_message, lock_run_dir
from cpt_cli.training.schedule import decay_start, lr_multiplier


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    report: dict[str, Any]
    steps: int
    stopped: str | None = None


@dataclass
class RunState:
    """What a checkpoint stores besides weights and optimizer: enough to continue exactly."""

    step: int = 0
    bad_steps: int = 0
    peak_forgetting: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _StopNow(BaseException):
    """A signal arrived before training started."""


class _Signals:
    """SIGTERM and SIGINT (a preemption notice, Ctrl-C), and SIGUSR1: what a worker of
    `accelerate launch` gets when its launcher dies (see runlock), and what a scheduler such as
    Slurm (`--signal`) can send ahead of a time limit. Linux may send the parent-death signal
    more than once (once per exiting thread of the parent), so a repeated SIGUSR1 is ignored.

    Before training starts the first signal stops at once (nothing trained, nothing to save).
    Once `defer()` is called, the first signal is only recorded: the loop finishes the current
    step, writes a checkpoint and raises TrainingStopped with exit status 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT, as a shell reports a process that signal ended). A second
    signal exits at once with that status: a checkpoint being written is still under its
    temporary name, so every complete checkpoint stays intact.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.exit_code = 128 + signal.SIGTERM
        self.deferred = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGTERM, signal.SIGINT, LAUNCHER_GONE):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a notebook, say): leave signals alone
                pass
        return self

    def defer(self) -> None:
        self.deferred = True

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == LAUNCHER_GONE and self.received is not None:
            return
        if self.received is not None:
            # os.write and os._exit only: nothing here may wait on a lock the interrupted
            # code holds (a print could).
            os.write(2, f"cpt: second signal ({name}): exiting now; complete checkpoints are "
                        "intact, resume with --resume auto\n".encode())
            os._exit(finish_worker(128 + signum))
        self.received, self.exit_code = name, 128 + signum
        if not self.deferred:
            # A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
            # (reading data, say) mistakes it for a failure; train() turns it into a stop.
            raise _StopNow(name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def param_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and embeddings (1-D or embedding tables)."""
    o = recipe.train.optimizer
    freeze = [re.compile(p) for p in recipe.train.freeze]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if any(p.search(name) for p in freeze):
            param.requires_grad_(False)
            continue
        if not param.requires_grad:
            continue
        is_embedding = id(param) in embeddings
        decay = param.ndim >= 2 and not is_embedding
        groups.setdefault((decay, is_embedding), []).append(param)
    if not groups:
        raise UsageError(f"train.freeze {list(recipe.train.freeze)} freezes every parameter: "
                         "nothing would train. Narrow the patterns.")
    return [{"params": params, "weight_decay": o.weight_decay if decay else 0.0,
             "lr_scale": o.embedding_lr_scale if emb else 1.0}
            for (decay, emb), params in groups.items()]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig,
                   steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR sets each group's lr to base_lr x lambda(step): the group's `lr_scale` (embeddings)
    enters here once, and base_lr stays the recipe's peak lr for every group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, scale=g["lr_scale"]: lr_multiplier(schedule, s, steps) * scale
                    for g in optimizer.param_groups])


def _precision(recipe: Recipe, cuda: bool) -> str:
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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(
        np.frombuffer(json.dumps(np.random.get_state(legacy=False), default=_np_default).encode(),
                      dtype=np.uint8).copy()),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()),
                                    dtype=torch.uint8)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    raise TypeError(type(obj))


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = json.loads(bytes(state["numpy"].numpy()).decode())
    np_state["state"] = {k: (np.uint64(v) if not isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class MetricsLog:
    """metrics.jsonl, one JSON object per event, flushed at once (a kill loses nothing)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # Events after the step we resume from (a checkpoint's, or 0 when a run killed before
            # its first checkpoint starts over) will happen again: drop them, and a last line cut
            # short by a kill. Rewritten atomically, so a kill now loses nothing.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict) and event.get("step", 0) <= resume_step:
                    kept.append(line)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, path)
        self.fh = open(path, "a") if enabled else None  # noqa: SIM115 - closed in close()

    def write(self, event: dict[str, Any]) -> None:
        if self.fh is not None:
            try:
                self.fh.write(json.dumps(json_safe(event)) + "\n")
                self.fh.flush()
            except OSError as err:
                raise UsageError(_write_failure("metrics.jsonl", self.path, err)) from None

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def train(recipe: Recipe, *, output_dir: str | None = None, resume: str | None = None,
          overwrite: bool = False, console: Any = None,
          on_event: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train one stage. `resume`: None (refuse an existing run dir), "auto", "never" or a
    checkpoint path. `on_event` sees every event written to metrics.jsonl. Returns the run
    directory and the final forgetting report; raises `TrainingStopped` when the run stops early
    (signal, NaN loss, forgetting budget) and `UsageError` for anything the user can fix."""
    with _Signals() as signals, contextlib.ExitStack() as cleanup:
        try:
            return _train(recipe, signals, cleanup, output_dir=output_dir, resume=resume,
                          overwrite=overwrite, console=console, on_event=on_event)
        except _StopNow as stop:
            raise TrainingStopped(f"received {stop} before training started: nothing was "
                                  "trained and nothing needs saving; run the same command "
                                  "again to start.", exit_code=signals.exit_code) from None


def _train(recipe: Recipe, signals: _Signals, cleanup: contextlib.ExitStack, *,
           output_dir: str | None, resume: str | None, overwrite: bool, console: Any,
           on_event: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from cpt_cli.training.display import TrainDisplay

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would drown the live view
    keep_freed_memory()  # no page faults on re-touched memory each step (see hostmemory)

    problems = check_model_path(recipe)
    if problems:
        raise UsageError("the recipe's model cannot be used:", problems)
    run_dir = run_dir_for(recipe, output_dir)
    resume_from = resume_point(run_dir, resume, overwrite)
    check_overwrite_keeps_model(recipe, run_dir, overwrite and resume_from is None)

    cuda = torch.cuda.is_available()
    if not cuda:
        # Where DeepSpeed is installed, accelerate imports it (unwrapping a model for a
        # checkpoint), and DeepSpeed's accelerator detection then logs a warning into the live
        # view; its documented override names the CPU it would settle on anyway.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    check_compiler(recipe, cuda, os.environ)
    accelerator = Accelerator(**_accelerator_device(cuda, os.environ),
                              mixed_precision=_precision(recipe, cuda),
                              log_with=_trackers(recipe) or None,
                              project_dir=str(run_dir))
    check_world(accelerator.num_processes, os.environ)
    P, rank, main = accelerator.num_processes, accelerator.process_index, \
        accelerator.is_main_process
    # A run directory resumed in place is held from here on: its checkpoint is read below, and a
    # training still running there would rotate it away meanwhile. A new one is held only once
    # everything is checked, so that a bad recipe leaves no trace.
    def hold_run_dir() -> None:
        _lock_together(accelerator, run_dir, cleanup,
                       unchanged=lambda: resume_point(run_dir, resume, overwrite) == resume_from)

    held_early = resume_from is not None and run_dir.is_dir()
    if held_early:
        hold_run_dir()
    display = TrainDisplay(console=console, enabled=main)
    if recipe.train.precision in ("bf16", "fp16") and not cuda:
        display.status(f"train.precision {recipe.train.precision} needs a GPU: training in fp32 "
                       "on this CPU")

    # Rank 0 fills the cache; the others then read it. The plan is the same on every process.
    data = plan_data(recipe, _main_first(accelerator, lambda: prepare_data(
        recipe, progress=display.data_progress)), P)
    for warning in data.plan.warnings:  # the plan's one list, as `cpt mix inspect` shows it
        display.warning(warning)
    _, accum, steps = batch_geometry(recipe, P)
    deepspeed = _is_deepspeed(accelerator)
    if deepspeed:
        _configure_deepspeed(accelerator, recipe, accum)
    if resume_from is not None:
        check_resumable(resume_from, data, P)  # before anything in the run directory changes

    model = load_model(recipe, data.tokenizer)
    context = max_context(model)
    if context is not None and recipe.data.seq_len > context:
        raise UsageError(f"data.seq_len: {recipe.data.seq_len} is above the model's context of "
                         f"{context} tokens; lower data.seq_len to at most {context}")
    window = training_window(recipe.eval.max_length, recipe.data.seq_len, context)
    _check_document_masking(recipe, model, cuda)
    flops_per_token = training_flops_per_token(model, recipe.data.seq_len)
    if recipe.train.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    if recipe.train.compile:
        # Layer by layer (as torchtitan does): each decoder layer compiles once and is reused,
        # so compile time does not grow with depth, and a graph break stays inside one layer.
        for layer in _decoder_layers(model):
            layer.compile()

    groups = param_groups(model, recipe)
    o = recipe.train.optimizer
    # The fused kernel on CUDA and on CPU (torch >= 2.4): one kernel for all parameters, 1.4 ms
    # per step on the quickstart model's 1M parameters against 6.8 ms for the per-tensor loop.
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    if o.load_from_parent and resume_from is None:
        _load_parent_optimizer(recipe, model, optimizer)
    if resume_from is not None:
        check_checkpoint_weights(resume_from, model)  # before the run directory changes

    # Nothing is written before here: a bad recipe or bad data leaves no trace.
    if not held_early:
        hold_run_dir()

    def set_up_run_dir() -> None:
        if main:
            if overwrite and resume_from is None:
                for path in run_dir.iterdir():  # all but the lock this run holds
                    if path.name != LOCK_NAME:
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
            remove_debris(run_dir)
            (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "recipe.yaml")
            _write_heldout(run_dir, data)

    _write_together(accelerator, "the run directory", run_dir, set_up_run_dir)

    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand: accelerate's wrapper would step it once per process.
    scheduler = make_scheduler(optimizer, recipe.train.schedule, steps)

    state = RunState()
    if resume_from is not None:
        state = _load_checkpoint(resume_from, accelerator, model, optimizer, scheduler, data)
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=recipe.train.micro_batch_size,
                          grad_accum=accum, num_processes=P, rank=rank,
                          document_masking=not recipe.data.cross_document_attention,
                          pin_memory=accelerator.device.type == "cuda")
    metrics = _write_together(
        accelerator, "metrics.jsonl", run_dir / "metrics.jsonl",
        lambda: MetricsLog(run_dir / "metrics.jsonl", main, state.step))

    def emit(event: dict[str, Any]) -> None:
        metrics.write(event)
        if on_event is not None:
            on_event(event)

    if accelerator.trackers:
        accelerator.init_trackers(recipe.name)

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        accelerator.mixed_precision)
    domains = data.eval_domains
    roles = {d.name: d.role for d in domains}

    def evaluate() -> dict[str, Any]:
        # Compiled layers score eagerly: held-out batches vary in shape and run without grad,
        # so compiling them would cost two more graphs (dynamic shapes, inference mode) for a
        # few batches, and eager scoring gives exactly the figures `cpt eval` computes later.
        with torch.compiler.set_stance("force_eager") if recipe.train.compile else \
                contextlib.nullcontext():
            return score_domains(model, data.tokenizer, domains,
                                 batch_tokens=recipe.eval.batch_tokens,
                                 autocast_dtype=autocast_dtype, max_length=window)

    def eval_event(report: dict[str, Any], step: int) -> dict[str, Any]:
        return {"event": "eval", "step": step, "tokens": step * loader.global_batch * L,
                "domains": {d["name"]: {k: d.get(k) for k in ("role", "loss", "bpb", "delta_bpb")}
                            for d in report["domains"]}}

    L = recipe.data.seq_len
    start_path = run_dir / "eval" / "start.npz"
    if start_path.exists():
        start_scores = load_scores(start_path)
    else:
        display.status("evaluating the starting model on every domain")
        start_scores = evaluate()
        _write_together(accelerator, "the start evaluation", start_path,
                        lambda: main and save_scores(start_path, start_scores))
        if main:
            emit(eval_event(forgetting_table(start_scores, None, roles, bootstrap_samples=0), 0))

    label_tokens_concat = loader.global_batch * (L - 1)
    wsd_branch = decay_start(recipe.train.schedule, steps) \
        if recipe.train.schedule.name == "wsd" else None
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    device = accelerator.device
    check_grad_norm = accelerator.mixed_precision != "fp16"  # the fp16 scaler skips inf grads
    stopped: TrainingStopped | None = None
    display.start_training(steps, state.step, loader.global_batch * L)
    last_log_time, last_log_step, paused = time.perf_counter(), state.step, 0.0
    signals.defer()  # from here a signal stops the run after the current step, with a checkpoint
    model.train()
    for step, micro_batches in loader.iter_steps(state.step):
        n_targets = label_tokens_concat if recipe.data.packing == "concat" else \
            loader.step_label_tokens(step)
        # HF's loss divides the summed token losses by num_items_in_batch; DDP then averages
        # over the P processes, so scale by P to get the exact global mean.
        num_items = torch.tensor(n_targets / P, device=device)
        step_loss = torch.zeros((), device=device)
        for a, mb in enumerate(micro_batches):
            sync = a == len(micro_batches) - 1
            # Restarting position_ids are the document masking (transformers builds the
            # block-diagonal mask from them); across documents the model's own positions,
            # computed once per batch rather than per row, are the same thing for less.
            positions = None if recipe.data.cross_document_attention else \
                mb.position_ids.to(device, non_blocking=True)
            if deepspeed:
                # DeepSpeed's engine reduces and steps inside backward when told this is the
                # last micro batch; cpt's loss is already the global mean's share, so the
                # engine must not divide it by its accumulation steps again.
                accelerator.sync_gradients = sync
                no_sync: Any = contextlib.nullcontext()
                backward_kwargs = {"scale_wrt_gas": False}
            else:
                no_sync = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                backward_kwargs = {}
            with no_sync:
                out = model(input_ids=mb.input_ids.to(device, non_blocking=True),
                            position_ids=positions,
                            labels=mb.labels.to(device, non_blocking=True),
                            num_items_in_batch=num_items, use_cache=False)
                accelerator.backward(out.loss, **backward_kwargs)
            step_loss += out.loss.detach()
        norm = None
        if recipe.train.grad_clip is not None:
            # Under DeepSpeed the engine has already clipped (gradient_clipping, set from
            # train.grad_clip) and stepped: this only reads the norm it measured.
            norm = accelerator.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        # One reduce and one host sync per step (a GPU stall each), carrying the loss, every
        # process's stop request and the gradient norm: a NaN must stop the update before it
        # lands, and all processes must stop after the same step.
        flags = torch.stack([step_loss, torch.tensor(float(signals.received is not None),
                                                     device=device)])
        flags = accelerator.reduce(flags, reduction="sum") if P > 1 else flags
        if norm is not None:
            flags = torch.cat([flags, torch.as_tensor(norm, device=device).float().reshape(1)])
        host = flags.tolist()
        loss_value, stop_requested = host[0] / P, host[1] > 0
        grad_norm = host[2] if norm is not None else None
        # The lr this update uses (the scheduler then moves on to the next step's); the first
        # group holds matrices, whose lr_scale is 1.
        lr_used = scheduler.get_last_lr()[0] / optimizer.param_groups[0]["lr_scale"]
        bad = not math.isfinite(loss_value) or (
            check_grad_norm and grad_norm is not None and not math.isfinite(grad_norm))
        if bad:
            # Under DeepSpeed the engine's update has already landed (it steps inside
            # backward): the step is counted and can stop the run, but is not undone.
            state.bad_steps += 1
        else:
            optimizer.step()
        # A skipped batch still counts as a step: the data, the schedule and the step number stay
        # aligned, so a resumed run and the plan agree on what step N is.
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step + 1
        tokens_done = state.step * loader.global_batch * L
        if bad:
            event = {"event": "bad_step", "step": state.step, "tokens": tokens_done,
                     "loss": str(loss_value), "grad_norm": str(grad_norm),
                     "bad_steps": state.bad_steps}
            emit(event)
            display.status(f"step {state.step}: loss {loss_value}, gradient norm {grad_norm}: "
                           f"update skipped ({state.bad_steps} of train.max_bad_steps "
                           f"{recipe.train.max_bad_steps})")
            if state.bad_steps > recipe.train.max_bad_steps:
                last = complete_checkpoints(run_dir)
                stopped = TrainingStopped(
                    f"the loss is {loss_value} (gradient norm {grad_norm}) at step "
                    f"{state.step}: training stopped before the update, after "
                    f"{state.bad_steps} bad step(s) (train.max_bad_steps is "
                    f"{recipe.train.max_bad_steps}). The last good checkpoint is "
                    f"{last[-1] if last else 'none (no checkpoint was written yet)'}. Lower "
                    "train.optimizer.lr, check the data, or allow a few bad batches with "
                    "train.max_bad_steps, then rerun with --resume auto.", exit_code=1)
                break
            continue

        if state.step % recipe.train.log_every_steps == 0 or state.step == steps:
            now = time.perf_counter()
            # Training time only: evaluations and checkpoints since the last line are excluded
            # (`paused`), so tokens/s measures the steps themselves.
            tps = (state.step - last_log_step) * loader.global_batch * L / max(
                now - last_log_time - paused, 1e-9)
            last_log_time, last_log_step, paused = now, state.step, 0.0
            event = {"event": "train", "step": state.step, "tokens": tokens_done,
                     "loss": loss_value, "lr": lr_used, "tokens_per_s": tps,
                     "grad_norm": grad_norm}
            if cuda:
                event["mfu"] = tps * flops_per_token / (peak * P) if peak else None
            emit(event)
            if accelerator.trackers:
                accelerator.log({k: v for k, v in event.items()
                                 if isinstance(v, (int, float))}, step=state.step)
            display.train_line(event)
        pause_start = time.perf_counter()

        over_budget = None
        if recipe.eval.every_steps and state.step % recipe.eval.every_steps == 0 and \
                state.step != steps and not stop_requested:
            report = forgetting_table(evaluate(), start_scores, roles, bootstrap_samples=0)
            event = eval_event(report, state.step)
            emit(event)
            display.eval_line(event)
            worst = report["summary"]["max_forgetting_bpb"]
            if worst is not None:
                state.peak_forgetting = max(worst, state.peak_forgetting or worst)
            budget = recipe.eval.max_forgetting_bpb
            if budget is not None and worst is not None and worst > budget:
                over_budget = (report["summary"]["worst_forgetting_domain"], worst)

        if P == 1:  # one process need not agree with anyone: act on a signal from just now
            stop_requested = signals.received is not None
        every = recipe.train.checkpoint.every_steps
        want_ckpt = (every and state.step % every == 0) or over_budget or stop_requested or \
            state.step == wsd_branch
        if want_ckpt and state.step != steps:
            saved = _save_checkpoint(run_dir, state, accelerator, model, optimizer, scheduler,
                                     data, recipe, keep_forever=state.step == wsd_branch)
            display.checkpoint_saved(saved)
        if over_budget:
            stopped = TrainingStopped(
                f"domain {over_budget[0]!r} forgot {over_budget[1]:.4f} bits per byte at step "
                f"{state.step}, above eval.max_forgetting_bpb "
                f"{recipe.eval.max_forgetting_bpb}; checkpoint saved in "
                f"{run_dir / CHECKPOINTS}", exit_code=1)
            break
        if stop_requested and state.step != steps:
            name = signals.received or "a stop signal (on another process)"
            stopped = TrainingStopped(
                f"received {name} at step {state.step} of {steps}: checkpoint saved to "
                f"{run_dir / CHECKPOINTS / f'step-{state.step:06d}'}. Resume with the same "
                f"command plus --resume auto (run directory {run_dir}).",
                exit_code=signals.exit_code)
            break
        paused += time.perf_counter() - pause_start
    display.stop()
    if stopped is not None:
        # No final evaluation: a preempted job has seconds left, and a run stopped for
        # forgetting was evaluated at this very step.
        _end(accelerator, metrics)
        raise stopped

    final_dir = _save_final(run_dir, state, accelerator, model, optimizer, data, recipe)
    final_scores = evaluate()
    report = forgetting_table(final_scores, start_scores, roles,
                              bootstrap_samples=recipe.eval.bootstrap_samples,
                              peak_forgetting=state.peak_forgetting)
    report.update(model=str(final_dir), start=_start_name(recipe))
    if main:
        emit(eval_event(report, state.step))

    def write_report() -> None:
        if main:
            save_scores(final_dir / "eval" / "start.npz", start_scores)
            # Written last: its presence marks the run as finished (see resume_point).
            write_json(final_dir / "eval" / "report.json", report)

    _write_together(accelerator, "the final report", final_dir / "eval", write_report)
    _end(accelerator, metrics)
    return TrainResult(run_dir=run_dir, final_dir=final_dir, report=report, steps=state.step)


def _end(accelerator: Any, metrics: Any) -> None:
    """Close the metrics file, wait for every process, finish the trackers and destroy the
    process group (accelerate's documented end of a run; see also process.end_worker)."""
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _accelerator_device(cuda: bool, env: Mapping[str, str]) -> dict[str, Any]:
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


def _is_deepspeed(accelerator: Any) -> bool:
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


def _configure_deepspeed(accelerator: Any, recipe: Recipe, accum: int) -> None:
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


# Dense bf16 peak of one accelerator, in FLOP/s, by a substring of torch.cuda.get_device_name()
# (first match wins, so "H100 PCIe" precedes "H100"). Vendor datasheets, without sparsity.
PEAK_BF16_FLOPS = (("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12),
                   ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
                   ("A10G", 70e12), ("A10", 125e12), ("MI300X", 1307e12))


def peak_flops(device_name: str, env: Mapping[str, str] = os.environ) -> float | None:
    """Peak FLOP/s for MFU: $CPT_PEAK_TFLOPS when set, else the table above (None: unknown)."""
    if env.get("CPT_PEAK_TFLOPS"):
        return float(env["CPT_PEAK_TFLOPS"]) * 1e12
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Model FLOPs to train on one token (PaLM, Chowdhery et al. 2022, appendix B):
    6 N + 12 n_layers d_model seq_len, where N counts the parameters that take part in matrix
    products (every parameter but the input embedding table, which is a lookup; a tied output
    layer counts once) and the second term is attention's QK^T and AV, forward and backward.
    Activation recomputation is not counted (it is hardware, not model, FLOPs)."""
    params = {id(p): p.numel() for p in model.parameters()}
    n = sum(params.values())
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if embedding is not None:
        n -= embedding.weight.numel()
        if output is not None and output.weight is embedding.weight:
            n += output.weight.numel()
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    return 6.0 * n + 12.0 * layers * hidden * seq_len


def _enable_activation_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing: the reentrant kind computes no gradients for a layer whose
    # inputs need none (frozen embeddings, say). transformers 5 renamed the method.
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def _trackers(recipe: Recipe) -> list[str]:
    import importlib.util

    available = []
    for name in recipe.train.trackers:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
        if importlib.util.find_spec(module) is not None:
            available.append(name)
        elif worker_rank() == "0":  # said once, not by every process
            print(f"cpt: tracker {name!r} is not installed; logging to metrics.jsonl only",
                  file=sys.stderr)
    return available


def check_compiler(recipe: Recipe, cuda: bool, environ: Mapping[str, str]) -> None:
    """train.compile on CPU builds C++ kernels at the first step: refuse up front, with the fix,
    where no compiler would be found (an inductor traceback otherwise)."""
    if recipe.train.compile and not cuda and cpu_compiler(environ) is None:
        raise UsageError("train.compile: true on CPU needs a C++ compiler (torch.compile builds "
                         "its CPU kernels with one) and none was found (CXX, g++, clang++, c++); "
                         "install one (e.g. apt install g++) or set train.compile: false")


def cpu_compiler(environ: Mapping[str, str]) -> str | None:
    """The C++ compiler torch.compile's CPU backend would use: $CXX, else the first of g++,
    clang++ or c++ on PATH."""
    if environ.get("CXX"):
        return shutil.which(environ["CXX"], path=environ.get("PATH"))
    for name in ("g++", "clang++", "c++"):
        found = shutil.which(name, path=environ.get("PATH"))
        if found:
            return found
    return None


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and \
                type(module[0]).__name__.endswith(("DecoderLayer", "Block")):
            return list(module)
    return []


def _check_document_masking(recipe: Recipe, model: Any, cuda: bool) -> None:
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if impl == "flex_attention" and not cuda:
        raise UsageError("model.attn_implementation: flex_attention has no backward pass on a "
                         "CPU in torch; train with sdpa (or eager) here")
    if recipe.data.cross_document_attention:
        return
    # transformers builds a block-diagonal mask from restarted position_ids for these backends.
    if impl not in ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"):
        raise UsageError(
            f"data.cross_document_attention is false, but the attention backend {impl!r} cannot "
            "keep attention within documents of a packed sequence. Set model.attn_implementation "
            "to sdpa, eager, flex_attention or flash_attention_2, or set "
            "data.cross_document_attention=true.")


def _on_any_process(accelerator: Any, flag: bool) -> bool:
    """Whether `flag` is true on any process (one reduce; every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device),
                               reduction="sum")
    return bool(total.item() > 0)


def _main_first(accelerator: Any, work: Callable[[], _T]) -> _T:
    """`work` on the main process, then on the others (accelerate's `main_process_first`), except
    that a UsageError on the main process is raised on every process, instead of leaving the
    others at the barrier until the main one exits and their connection breaks (a traceback
    from each)."""
    error: UsageError | None = None
    result: Any = None
    if accelerator.is_main_process:
        try:
            result = work()
        except UsageError as err:
            error = err
    failed = _on_any_process(accelerator, error is not None)
    if failed:
        raise error or UsageError("the data could not be prepared (see the main process)")
    return result if accelerator.is_main_process else work()


def _lock_together(accelerator: Any, run_dir: Path, cleanup: contextlib.ExitStack,
                   unchanged: Callable[[], bool]) -> None:
    """The main process takes the run directory's lock for the rest of the run (see runlock) and
    checks that the directory still holds what this run planned on; if not, every process
    raises (one reduce), as `_write_together` does."""
    problem: str | None = None
    if accelerator.is_main_process:
        try:
            fd = lock_run_dir(run_dir)
            if fd is not None:
                cleanup.callback(os.close, fd)
            if not unchanged():
                problem = (f"{run_dir} changed while this run prepared (another cpt train wrote "
                           "it); run the same command again")
        except RunBusy as busy:
            problem = busy_message(run_dir, busy.holder)
        except UsageError as err:
            problem = f"{run_dir} changed while this run prepared: {err}"
        except OSError as err:
            problem = _write_failure("the run directory's lock", run_dir / LOCK_NAME, err)
    failed = _on_any_process(accelerator, problem is not None)
    if failed:
        raise UsageError(problem or "the run directory is in use (see the main process)")


def _write_heldout(run_dir: Path, data: PreparedData) -> None:
    for d in data.domains:
        write_heldout(run_dir / HELDOUT_DIR / f"{d.name}.jsonl", d.heldout)
    if data.lineage is not None:
        names = {d.name for d in data.domains}
        for src in data.lineage.sources:
            if src.name not in names:
                write_heldout(run_dir / HELDOUT_DIR / f"{src.name}.jsonl",
                              read_heldout(src.heldout_file))


# What a failed write raises: OSError from Python's own files, RuntimeError from torch.save (a
# full disk reads "[enforce fail at inline_container.cc] . unexpected pos"), SafetensorError
# ("I/O error: No space left on device") from safetensors.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)

_T = TypeVar("_T")


def _write_together(accelerator: Any, what: str, path: Path, write: Callable[[], _T],
                    cleanup: Path | None = None) -> _T:
    """Run `write` on every process; if it fails on any, all of them raise the same UsageError
    (one reduce), instead of the others waiting forever at the next collective."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = write()
    except WRITE_ERRORS as err:
        error = err
    failed = _on_any_process(accelerator, error is not None)
    if failed:
        if cleanup is not None and accelerator.is_main_process:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise UsageError(_write_failure(what, path, error)) from None
    return result


def _write_failure(what: str, path: Path, error: BaseException | None) -> str:
    if error is None:
        reason = "the write failed on another process (see its log)"
    else:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        reason = f"{type(error).__name__}: {first}"
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(existing).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    writable = os.access(existing, os.W_OK)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    last = complete_checkpoints(run_dir)
    newest = f"newest: {last[-1]}" if last else "none was written yet"
    return (f"could not write {what} ({path}): {reason}. The disk holding it has {free}"
            f"{'' if writable else ' and the folder is not writable'}. Earlier checkpoints are "
            f"intact ({newest}); free space or fix permissions, then run the same command with "
            "--resume auto.")


def _save_model(folder: Path, unwrapped: Any, state_dict: dict[str, torch.Tensor],
                data: PreparedData) -> None:
    unwrapped.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
    data.tokenizer.save_pretrained(str(folder))


def _write_model_folder(folder: Path, run_dir: Path, unwrapped: Any, state_dict: Any,
                        optim_state: dict[str, Any], manifest: dict[str, Any],
                        data: PreparedData) -> None:
    """What a checkpoint and final/ share: the Hugging Face model and tokenizer, the optimizer
    state, the manifest and the held-out texts. With those a folder is a valid model.path whose
    lineage a next stage can replay and evaluate (a wsd run's pre-decay checkpoint, say)."""
    _save_model(folder, unwrapped, state_dict, data)
    torch.save(optim_state, folder / "optimizer.pt")
    write_json(folder / MANIFEST, manifest)
    copy_heldout(run_dir, folder)


def _gather_state(accelerator: Any, model: Any, optimizer: Any,
                  recipe: Recipe) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The unwrapped model, its full state dict and the full optimizer state, for a checkpoint
    or final/. Called on every process: under FSDP or DeepSpeed the gathering is collective."""
    return (accelerator.unwrap_model(model), accelerator.get_state_dict(model),
            _optimizer_state(accelerator, model, optimizer, recipe))


def _save_checkpoint(run_dir: Path, state: RunState, accelerator: Any, model: Any,
                     optimizer: Any, scheduler: Any, data: PreparedData, recipe: Recipe,
                     keep_forever: bool = False) -> Path:
    """Write checkpoints/step-N atomically: everything goes to `.tmp-step-N`, is flushed to
    disk, and only then renamed; a write that fails anywhere removes the temporary folder and
    leaves every earlier checkpoint as it was."""
    name = f"step-{state.step:06d}"
    root = run_dir / CHECKPOINTS
    tmp, target = root / f".tmp-{name}", root / name
    main = accelerator.is_main_process
    unwrapped, state_dict, optim_state = _gather_state(accelerator, model, optimizer, recipe)

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write() -> None:
        if main:
            _write_model_folder(tmp, run_dir, unwrapped, state_dict, optim_state,
                                _manifest(recipe, data, state.step, accelerator), data)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")

    def publish() -> None:
        if main:
            # trainer_state.json last: complete_checkpoints() only counts folders that have it.
            write_json(tmp / "trainer_state.json", {
                "step": state.step, "bad_steps": state.bad_steps,
                "peak_forgetting": state.peak_forgetting, "data": {
                    "plan": data.plan.fingerprint(), "sequences_consumed":
                    state.step * data.global_batch},
                "num_processes": accelerator.num_processes, "keep": keep_forever})
            _fsync_tree(tmp)
            _publish(tmp, target)
            _rotate(root, recipe.train.checkpoint.keep)

    def write_deepspeed() -> None:
        # Its own phase, on every process, after `prepare` made the folder: the engine's save
        # waits for all processes inside, so none may have left early from a failed write.
        if _is_deepspeed(accelerator):
            _save_deepspeed_state(tmp, model)

    for phase in (prepare, write_deepspeed, write, publish):
        _write_together(accelerator, f"checkpoint {name}", target, phase, cleanup=tmp)
    return target


def _fsync_tree(folder: Path) -> None:
    """Flush a finished checkpoint's files to disk before its rename publishes it: after a
    power loss the rename could otherwise reach the disk before the data (a SIGKILL alone
    loses nothing, the page cache survives the process)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _publish(tmp: Path, target: Path) -> None:
    """Rename a complete folder into place. A folder already there (a run resumed from an
    older checkpoint writes the same step again) is first renamed out of the way: at every
    moment `target` is either the old complete folder, absent, or the new complete one."""
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Delete a checkpoint: renamed to a hidden name first, so that a kill halfway through the
    deletion never leaves a `step-N` folder with some of its files missing."""
    doomed = folder.with_name(f".del-{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def remove_debris(run_dir: Path) -> None:
    """Remove what a killed run left half-written or half-deleted (hidden `.tmp-` and `.del-`
    folders); complete checkpoints are never touched. An `.old-X` whose replacement never
    arrived (killed between the two renames of `_publish`) is complete: it becomes `X` again."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if not path.is_dir():
                continue
            if path.name.startswith(".old-") and not (folder / path.name[5:]).exists():
                os.replace(path, folder / path.name[5:])
            elif path.name.startswith((".tmp-", ".old-", ".del-")):
                shutil.rmtree(path, ignore_errors=True)


def _rotate(root: Path, keep: int) -> None:
    ckpts = complete_checkpoints(root.parent)
    kept_forever = {p for p in ckpts if json.loads(
        (p / "trainer_state.json").read_text()).get("keep")}
    rotating = [p for p in ckpts if p not in kept_forever]
    for old in rotating[:-keep]:
        _discard(old)


def check_resumable(path: Path, data: PreparedData, num_processes: int) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, once it is known to continue this very run: the
    same data plan (sequence i is the same text) and the same number of processes (each one's
    RNG state is in the checkpoint)."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot resume from {path}: its trainer_state.json cannot be read "
                         f"({err}); resume from another checkpoint (--resume "
                         "checkpoints/step-N)") from None
    assert data.plan is not None
    if meta["data"]["plan"] != data.plan.fingerprint():
        raise UsageError(f"cannot resume from {path}: the data plan changed since it was written "
                         "(sources, weights, seq_len, budget or batch). Restore the recipe's data "
                         "section, or start a new stage with model.path pointing at a checkpoint.")
    if meta["num_processes"] != num_processes:
        raise UsageError(f"cannot resume from {path}: it was written by "
                         f"{meta['num_processes']} processes, this run has {num_processes}. "
                         "Resume with the same --num-processes.")
    return meta


def _load_checkpoint(path: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any,
                     data: PreparedData) -> RunState:
    meta = check_resumable(path, data, accelerator.num_processes)
    if _is_deepspeed(accelerator):
        _load_deepspeed_state(path, model)
    else:
        _load_weights_and_optimizer(path, accelerator, model, optimizer)
    scheduler.load_state_dict(_load_state(path / "scheduler.pt"))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.exists():
        _set_rng_state(_load_state(rng))
    return RunState(step=meta["step"], bad_steps=meta["bad_steps"],
                    peak_forgetting=meta["peak_forgetting"])


def check_checkpoint_weights(path: Path, model: Any) -> None:
    """The checkpoint's weight files are readable and hold this model's shapes: a damaged file,
    or a recipe whose model section changed since, is a message, not a failure halfway through
    loading."""
    from safetensors import safe_open

    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UsageError(f"checkpoint {path} has no model.safetensors; resume from another "
                         "checkpoint (--resume checkpoints/step-N)")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    saved = tuple(fh.get_slice(name).get_shape())
                    if name in shapes and shapes[name] != saved:
                        raise UsageError(
                            f"checkpoint {path} holds {name} of shape {list(saved)}, the "
                            f"recipe's model {list(shapes[name])}: the model section changed "
                            "since it was written. Restore it, or start a new run.")
        except SafetensorError as err:
            raise UsageError(f"checkpoint {path}: {shard.name} is damaged ({err}); resume "
                             "from another checkpoint (--resume checkpoints/step-N)") from None


def _load_weights_and_optimizer(path: Path, accelerator: Any, model: Any,
                                optimizer: Any) -> None:
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
    # Tied weights (lm_head = embed_tokens) are saved once; anything else missing is an error.
    tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UsageError(f"checkpoint {path} does not match the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    _restore_optimizer(model, optimizer, _load_state(path / "optimizer.pt"))


# Under DeepSpeed a checkpoint also holds the engine's own checkpoint in deepspeed/<tag>/: the
# module's weights (mp_rank_00_model_states.pt) and one optimizer partition per process
# (zero_pp_rank_R_mp_rank_00_optim_states.pt, with the fp32 master weights and the moments).
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def _save_deepspeed_state(folder: Path, engine: Any) -> None:
    """Every process writes its own partition through the engine's public save_checkpoint (a
    collective). No `latest` file: cpt's step-N folder names the checkpoint, and the tag is
    fixed. The scheduler is cpt's own (scheduler.pt), not the engine's."""
    engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)


def _load_deepspeed_state(path: Path, engine: Any) -> None:
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


def _load_state(path: Path) -> Any:
    """Resume state through torch.load(weights_only=True): tensors and plain containers only, so
    a tampered file cannot run code. A refusal (or a damaged file) is a message, not a traceback."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"it holds a pickled {found.group(1)}, not only tensors and plain values" \
            if found else f"it is damaged ({str(err).strip().splitlines()[0][:200]})"
        raise UsageError(f"cannot load {path}: {reason}, so it is not loaded (resume state is "
                         "read with weights_only=True). Resume from another checkpoint "
                         "(--resume checkpoints/step-N) or start over with --overwrite."
                         ) from None


def _optimizer_state(accelerator: Any, model: Any, optimizer: Any,
                     recipe: Recipe) -> dict[str, Any]:
    """The whole optimizer state, keyed by parameter name, through torch's distributed
    state-dict API: under FSDP each process holds a shard and this gathers them (a collective:
    every process calls it); for one process or DDP it is the plain state under names. Names
    rather than positions also let a next stage load it into a model built anew. Under DeepSpeed
    the same layout is assembled from the engine's partitions (see `_deepspeed_optimizer_state`).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if _is_deepspeed(accelerator):
        return _deepspeed_optimizer_state(model, optimizer, recipe)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def _deepspeed_optimizer_state(engine: Any, optimizer: Any, recipe: Recipe) -> dict[str, Any]:
    """Under ZeRO 1/2 every process holds one contiguous slice of each parameter group's
    flattened AdamW moments. Each process cuts its slice into per-parameter fragments with the
    map its optimizer's `state_dict()` publishes (`param_slice_mappings`: name -> start and
    numel), and the main process gathers them (a collective: every process calls it) into the
    layout of `get_optimizer_state_dict(full_state_dict=True)`: moments and step under parameter
    names, groups listing names. So `final/optimizer.pt` serves a next stage's
    `optimizer.load_from_parent` whatever the launch. Resume does not read it: it restores
    DeepSpeed's own per-process files (`_save_deepspeed_state`), which are exact.

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


def _restore_optimizer(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """The inverse of `_optimizer_state`: every process reads the full state and keeps its
    shard. (Not under DeepSpeed: a DeepSpeed checkpoint resumes from the engine's own files.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _load_parent_optimizer(recipe: Recipe, model: Any, optimizer: torch.optim.Optimizer) -> None:
    location = model_location(recipe)
    path = Path(location or "") / "optimizer.pt"
    if not path.is_file():
        raise UsageError(f"train.optimizer.load_from_parent: {path} not found; the parent must "
                         "be a cpt run's final/ (which keeps its optimizer state)")
    state = _load_state(path)
    # load_state_dict also restores the parent's hyperparameters (lr, weight decay, betas, eps,
    # lr_scale); only the moments and step counts carry over, this stage's settings apply.
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        if len(state["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(f"{len(state['param_groups'])} parameter groups in the parent, "
                             f"{len(optimizer.param_groups)} here")
        # Only the moments and step counts carry over: the groups take this stage's settings
        # (the parent's LambdaLR also left an initial_lr that a fresh optimizer lacks).
        state["param_groups"] = [{**{k: v for k, v in now.items() if k != "params"},
                                  "params": saved["params"]}
                                 for now, saved in zip(optimizer.param_groups,
                                                       state["param_groups"], strict=True)]
        _restore_optimizer(model, optimizer, state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UsageError(f"train.optimizer.load_from_parent: the parent's optimizer state in "
                         f"{path} does not match this model's trainable parameters ({err}); "
                         "use the same train.freeze as the parent, or set "
                         "load_from_parent: false") from None
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update(settings)
        # The parent's LambdaLR left its own base lr here; this stage's scheduler sets it anew.
        group.pop("initial_lr", None)
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            if "exp_avg" in moments and moments["exp_avg"].shape != param.shape:
                raise UsageError(
                    f"train.optimizer.load_from_parent: the parent's optimizer state in {path} "
                    f"holds a {tuple(moments['exp_avg'].shape)} moment for a parameter of shape "
                    f"{tuple(param.shape)}: it belongs to another model. Set load_from_parent: "
                    "false")


def _start_name(recipe: Recipe) -> str:
    """The start model as the manifest records it: a local folder by its absolute path (`cpt eval`
    loads it from anywhere), a Hub id as given."""
    return model_location(recipe) or "init (from scratch)"


def _manifest(recipe: Recipe, data: PreparedData, step: int, accelerator: Any) -> dict[str, Any]:
    assert data.plan is not None
    parent = data.lineage.manifest if data.lineage is not None else None
    stages = list(parent["stages"]) if parent else []
    sources = dict(parent["sources"]) if parent else {}
    consumed = step * data.global_batch
    counts = np.bincount(data.plan.source_order()[:consumed], minlength=len(data.domains))
    stage_sources = []
    for k, d in enumerate(data.domains):
        info = {"name": d.name, "role": d.role, "inherited": d.inherited,
                "weight": d.config.weight,
                "content_fingerprint": d.entry.meta["content_fingerprint"] if d.entry else None,
                "documents": len(d.train_docs),
                "sequences_trained": int(counts[k]),
                "tokens_trained": int(counts[k]) * recipe.data.seq_len,
                "heldout": d.heldout_summary()}
        stage_sources.append(info)
        if not d.inherited:
            from cpt_cli.config import to_plain

            entry = {"config": to_plain(d.config), "base_dir": str(Path(d.base_dir).resolve()),
                     "heldout": d.heldout_summary(), "stage": len(stages)}
            previous = sources.get(d.name)
            if previous is not None:
                # Redefined under the same name: the earlier definition was trained on, and
                # later held-out sets must still be checked against it.
                earlier = list(previous.get("earlier", []))
                if (previous["config"], previous["base_dir"]) != (entry["config"],
                                                                  entry["base_dir"]):
                    earlier.append({k: previous[k] for k in ("config", "base_dir", "stage")})
                if earlier:
                    entry["earlier"] = earlier
            sources[d.name] = entry
    stages.append({"name": recipe.name, "start_model": _start_name(recipe),
                   "steps": step, "tokens": consumed * recipe.data.seq_len,
                   "seq_len": recipe.data.seq_len, "replay_ratio": recipe.data.replay.ratio,
                   "schedule": {"name": recipe.train.schedule.name,
                                "lr": recipe.train.optimizer.lr},
                   "sources": stage_sources,
                   "environment": environment(accelerator.num_processes,
                                              accelerator.device.type)})
    return {"format": FORMAT, "name": recipe.name, "stages": stages, "sources": sources,
            "tokenizer_fingerprint": data.tokenizer_fp}


def _save_final(run_dir: Path, state: RunState, accelerator: Any, model: Any, optimizer: Any,
                data: PreparedData, recipe: Recipe) -> Path:
    """final/: a Hugging Face model folder plus the manifest, the held-out texts and the
    optimizer state (for a next stage's `optimizer.load_from_parent`; AdamW keeps two fp32
    moments per parameter, so optimizer.pt is about twice the fp32 weights)."""
    final = run_dir / "final"
    tmp = run_dir / ".tmp-final"
    main = accelerator.is_main_process
    unwrapped, state_dict, optim_state = _gather_state(accelerator, model, optimizer, recipe)

    def write() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            manifest = _manifest(recipe, data, state.step, accelerator)
            _write_model_folder(tmp, run_dir, unwrapped, state_dict, optim_state, manifest, data)
            _fsync_tree(tmp)
            _publish(tmp, final)
            write_json(run_dir / MANIFEST, manifest)

    _write_together(accelerator, "the final model", final, write, cleanup=tmp)
    return final
