"""Setting up a training run: a `Run` built in named phases, in the order torchtune's recipes
use (`setup` calling `_setup_model`, `_setup_optimizer`, `_setup_data`), each phase's comment
saying why it comes where it does:

    run directory (read only) -> accelerator -> data -> model -> optimizer
        -> run directory (written) -> prepare, scheduler, checkpoint restore -> start scores

Nothing is written before the run directory phase: a bad recipe, bad data or a checkpoint that
cannot continue this run leaves no trace.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt_cli.config import Recipe, save_recipe
from cpt_cli.data.loader import PackedLoader
from cpt_cli.data.mixture import phase_at
from cpt_cli.data.prepare import PreparedData, batch_geometry, prepare_data
from cpt_cli.data.replan import mix_of, plan_history
from cpt_cli.errors import UsageError
from cpt_cli.evaluation.report import (
    forgetting_table,
    load_scores,
    save_scores,
    score_domains,
    training_window,
)
from cpt_cli.hostmemory import keep_freed_memory
from cpt_cli.model import (
    check_document_masking,
    check_model_path,
    compile_layers,
    enable_activation_checkpointing,
    load_model,
    max_context,
)
from cpt_cli.runs.atomic import remove_debris
from cpt_cli.runs.events import MetricsLog
from cpt_cli.runs.layout import (
    CHECKPOINTS,
    check_overwrite_keeps_model,
    resume_point,
    run_dir_for,
)
from cpt_cli.runs.lineage import HELDOUT_DIR, read_heldout, write_heldout
from cpt_cli.runs.lock import LOCK_NAME
from cpt_cli.training.backend import make_accelerator
from cpt_cli.training.checkpoint import (
    Checkpointer,
    RunState,
    check_checkpoint_weights,
    plan_resumed,
)
from cpt_cli.training.collective import lock_together, main_first, write_together
from cpt_cli.training.deepspeed import configure_deepspeed, is_deepspeed
from cpt_cli.training.display import TrainDisplay
from cpt_cli.training.optim import load_parent_optimizer, make_optimizer, make_scheduler
from cpt_cli.training.throughput import training_flops_per_token


@dataclass
class Run:
    """A training run once set up: what the loop, the step and the evaluations read."""

    recipe: Recipe
    run_dir: Path
    accelerator: Any
    display: TrainDisplay
    data: PreparedData
    steps: int                      # the run's total optimizer steps
    deepspeed: bool
    model: Any                      # as accelerate prepared it (DDP, FSDP, DeepSpeed engine)
    eval_window: int                # tokens per evaluation window: the context it trains
    flops_per_token: float
    optimizer: Any
    scheduler: Any
    checkpointer: Checkpointer
    state: RunState
    loader: PackedLoader
    metrics: MetricsLog
    on_event: Callable[[dict[str, Any]], None] | None
    start_scores: Any = None        # the starting model's per-domain scores (last phase)

    @property
    def roles(self) -> dict[str, str]:
        return {d.name: d.role for d in self.data.eval_domains}

    @property
    def answers(self) -> set[str]:
        """The domains scored on their answers (held-out sets of a loss_on completion|assistant
        source): every forgetting report of the run marks them `scored_on: answers`."""
        return {d.name for d in self.data.eval_domains if d.scored_on_answers}

    @property
    def tokens_per_step(self) -> int:
        return self.loader.global_batch * self.recipe.data.seq_len

    def emit(self, event: dict[str, Any]) -> None:
        """One event to metrics.jsonl and to the caller's `on_event`."""
        self.metrics.write(event)
        if self.on_event is not None:
            self.on_event(event)

    def evaluate(self) -> dict[str, Any]:
        """Score every domain's held-out texts with the model as it is now."""
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.accelerator.mixed_precision)
        # Compiled layers score eagerly: held-out batches vary in shape and run without grad,
        # so compiling them would cost two more graphs (dynamic shapes, inference mode) for a
        # few batches, and eager scoring gives exactly the figures `cpt eval` computes later.
        with torch.compiler.set_stance("force_eager") if self.recipe.train.compile else \
                contextlib.nullcontext():
            return score_domains(self.model, self.data.tokenizer, self.data.eval_domains,
                                 batch_tokens=self.recipe.eval.batch_tokens,
                                 autocast_dtype=autocast_dtype, max_length=self.eval_window)

    def eval_event(self, report: dict[str, Any], step: int) -> dict[str, Any]:
        # scored_on from the run, not the report: every evaluation of the run says it, whatever
        # built its report.
        answers = self.answers
        event = {"event": "eval", "step": step, "tokens": step * self.tokens_per_step,
                 "domains": {d["name"]: {**{k: d.get(k) for k in ("role", "loss", "bpb",
                                                                  "delta_bpb")},
                                         "scored_on": "answers" if d["name"] in answers
                                         else "text"}
                             for d in report["domains"]}}
        # A scheduled mix's phase (docs/evaluation.md); a constant mix has none.
        phase = phase_at(self.data.plan, step)
        return {**event, "phase": phase} if phase else event


def set_up(recipe: Recipe, cleanup: contextlib.ExitStack, *, output_dir: str | None,
           resume: str | None, overwrite: bool, console: Any,
           on_event: Callable[[dict[str, Any]], None] | None, replan: bool = False) -> Run:
    """Every phase, in order; `cleanup` releases the run directory's lock when the run ends."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would drown the live view
    keep_freed_memory()  # no page faults on re-touched memory each step (see hostmemory)
    # 1. The run directory's rules, reading only, and the model's location: what cannot start
    #    fails before a process group, data or weights exist.
    problems = check_model_path(recipe)
    if problems:
        raise UsageError("the recipe's model cannot be used:", problems)
    run_dir = run_dir_for(recipe, output_dir)
    resume_from = resume_point(run_dir, resume, overwrite)
    check_overwrite_keeps_model(recipe, run_dir, overwrite and resume_from is None)
    # 2. The accelerator: the data plan is cut for its number of processes.
    accelerator = make_accelerator(recipe, run_dir)

    def hold_run_dir() -> None:
        lock_together(accelerator, run_dir, cleanup,
                      unchanged=lambda: resume_point(run_dir, resume, overwrite) == resume_from)

    # A run directory resumed in place is held from here on: its checkpoint is read below, and a
    # training still running there would rotate it away meanwhile. A new one is held only once
    # everything is checked, so that a bad recipe leaves no trace.
    held_early = resume_from is not None and run_dir.is_dir()
    if held_early:
        hold_run_dir()
    display = _display(recipe, accelerator, console)
    # 3. The data before the model: it brings the tokenizer, and its batch geometry is what
    #    DeepSpeed's config and the resume check need.
    data, accum, steps = _set_up_data(recipe, accelerator, display, resume_from, replan)
    # 4. The model, then 5. its optimizer (AdamW over the parameter groups, perhaps the parent's
    #    moments), both before accelerate wraps them together.
    model, eval_window = _set_up_model(recipe, data)
    flops_per_token = training_flops_per_token(model, recipe.data.seq_len)
    _after_model_loaded(recipe, model)
    optimizer = make_optimizer(model, recipe)
    if recipe.train.optimizer.load_from_parent and resume_from is None:
        load_parent_optimizer(recipe, model, optimizer)
    if resume_from is not None:
        check_checkpoint_weights(resume_from, model)  # before the run directory changes
    # 6. The run directory, written: everything above was checked.
    if not held_early:
        hold_run_dir()
    write_together(accelerator, "the run directory", run_dir, lambda: _set_up_run_dir(
        recipe, run_dir, data, accelerator.is_main_process, overwrite and resume_from is None))
    # 7. Wrapped model and optimizer, the schedule, and the checkpoint's state on top of them.
    run = _set_up_training(recipe, run_dir, accelerator, display, data, accum, steps, model,
                           eval_window, flops_per_token, optimizer, resume_from, on_event)
    # 8. The starting model's scores: the baseline every forgetting figure is measured from.
    run.start_scores = _start_scores(run)
    return run


def _display(recipe: Recipe, accelerator: Any, console: Any) -> TrainDisplay:
    display = TrainDisplay(console=console, enabled=accelerator.is_main_process)
    if recipe.train.precision in ("bf16", "fp16") and not torch.cuda.is_available():
        display.status(f"train.precision {recipe.train.precision} needs a GPU: training in fp32 "
                       "on this CPU")
    return display


def _set_up_data(recipe: Recipe, accelerator: Any, display: TrainDisplay,
                 resume_from: Path | None, replan: bool) -> tuple[PreparedData, int, int]:
    """The prepared data and its plan, the gradient accumulation and the number of steps. A
    resumed run's plan is rebuilt from its checkpoint and the recipe's changes judged (before
    anything in the run directory changes)."""
    P = accelerator.num_processes
    # Rank 0 fills the cache; the others then read it. The plan is the same on every process.
    prepared = main_first(accelerator, lambda: prepare_data(recipe,
                                                            progress=display.data_progress))
    data = plan_resumed(resume_from, recipe, prepared, P, replan=replan) \
        if resume_from is not None else plan_history(recipe, prepared, P,
                                                     [{"step": 0, "mix": mix_of(recipe)}])
    for warning in data.plan.warnings:  # the plan's one list, as `cpt mix inspect` shows it
        display.warning(warning)
    _, accum, steps = batch_geometry(recipe, P)
    if is_deepspeed(accelerator):
        configure_deepspeed(accelerator, recipe, accum)
    return data, accum, steps


def _set_up_model(recipe: Recipe, data: PreparedData) -> tuple[Any, int | None]:
    """The starting model and its evaluation window (eval.max_length, by default data.seq_len),
    both checked against the model's context."""
    model = load_model(recipe, data.tokenizer)
    context = max_context(model)
    if context is not None and recipe.data.seq_len > context:
        raise UsageError(f"data.seq_len: {recipe.data.seq_len} is above the model's context of "
                         f"{context} tokens; lower data.seq_len to at most {context}")
    check_document_masking(recipe, model, torch.cuda.is_available())
    return model, training_window(recipe.eval.max_length, recipe.data.seq_len, context)


def _after_model_loaded(recipe: Recipe, model: Any) -> None:
    """Activation checkpointing and compiling, once the FLOPs are counted from the plain model."""
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if recipe.train.compile:
        compile_layers(model)


def _set_up_run_dir(recipe: Recipe, run_dir: Path, data: PreparedData, main: bool,
                    replacing: bool) -> None:
    """recipe.yaml, checkpoints/ and the held-out texts, on the main process; an --overwrite
    empties the folder first (all but the lock this run holds), and a killed run's debris goes."""
    if not main:
        return
    if replacing:
        for path in run_dir.iterdir():
            if path.name != LOCK_NAME:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    remove_debris(run_dir)
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    for d in data.domains:
        write_heldout(run_dir / HELDOUT_DIR / f"{d.name}.jsonl", d.heldout)
    if data.lineage is not None:
        names = {d.name for d in data.domains}
        for src in data.lineage.sources:
            if src.name not in names:
                write_heldout(run_dir / HELDOUT_DIR / f"{src.name}.jsonl",
                              read_heldout(src.heldout_file))


def _set_up_training(recipe: Recipe, run_dir: Path, accelerator: Any, display: TrainDisplay,
                     data: PreparedData, accum: int, steps: int, model: Any,
                     eval_window: int, flops_per_token: float, optimizer: Any,
                     resume_from: Path | None,
                     on_event: Callable[[dict[str, Any]], None] | None) -> Run:
    """Prepare model and optimizer, then the scheduler, the checkpoint's state (restored after
    prepare, which under FSDP or DeepSpeed reshapes both), the loader and metrics.jsonl."""
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand: accelerate's wrapper would step it once per process.
    scheduler = make_scheduler(optimizer, recipe.train.schedule, steps)
    checkpointer = Checkpointer(run_dir, recipe, steps, accelerator, model, optimizer, scheduler,
                                data)
    state = checkpointer.restore(resume_from) if resume_from is not None else RunState()
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=recipe.train.micro_batch_size,
                          grad_accum=accum, num_processes=accelerator.num_processes,
                          rank=accelerator.process_index,
                          document_masking=not recipe.data.cross_document_attention,
                          pin_memory=accelerator.device.type == "cuda")
    main = accelerator.is_main_process
    metrics = write_together(
        accelerator, "metrics.jsonl", run_dir / "metrics.jsonl",
        lambda: MetricsLog(run_dir / "metrics.jsonl", main, state.step))
    if accelerator.trackers:
        accelerator.init_trackers(recipe.name)
    run = Run(recipe=recipe, run_dir=run_dir, accelerator=accelerator, display=display,
              data=data, steps=steps, deepspeed=is_deepspeed(accelerator), model=model,
              eval_window=eval_window, flops_per_token=flops_per_token, optimizer=optimizer,
              scheduler=scheduler, checkpointer=checkpointer, state=state, loader=loader,
              metrics=metrics, on_event=on_event)
    revision = data.revisions[-1] if data.revisions else None
    if resume_from is not None and revision is not None and revision["step"] == state.step:
        run.emit({"event": "revision", **revision})  # what this resume changed, from this step
        for change in revision["changes"]:
            display.status(f"resume applies {change['key']}: {change['old']!r} -> "
                           f"{change['new']!r} from step {state.step}")
    return run


def _start_scores(run: Run) -> Any:
    """The starting model's scores: read back when a resumed run has them, else computed,
    saved and logged as the step-0 evaluation."""
    start_path = run.run_dir / "eval" / "start.npz"
    if start_path.exists():
        return load_scores(start_path)
    run.display.status("evaluating the starting model on every domain")
    scores = run.evaluate()
    main = run.accelerator.is_main_process
    write_together(run.accelerator, "the start evaluation", start_path,
                   lambda: main and save_scores(start_path, scores))
    if main:
        run.emit(run.eval_event(forgetting_table(scores, None, run.roles, bootstrap_samples=0,
                                                 answers=run.answers), 0))
    return scores
