"""The training loop: `train(recipe)` = set up, run the steps, finish.

    cpt train recipes/quickstart/cpt.yaml                  # one process (CPU or one GPU)
    accelerate launch -m cpt_cli train RECIPE              # any accelerate setup (FSDP, DeepSpeed)

Set-up (training/setup.py) prepares data, model, optimizer and run directory and evaluates the
starting model. Then per step: one optimizer step (training/step.py: micro batches with gradient
accumulation, clip, step, schedule), a log line with tokens/s (training/throughput.py), every
`eval.every_steps` the per-domain held-out evaluation (forgetting curves in metrics.jsonl), a
checkpoint when the Checkpointer says one is due (training/checkpoint.py: atomic, resumes bit for
bit), and the stop checks (bad steps, forgetting budget, a signal: training/signals.py). At the
end `final/` and the forgetting table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt_cli.config import Recipe
from cpt_cli.errors import TrainingStopped
from cpt_cli.evaluation.report import (
    forgetting_table,
    judge_replay_budget,
    save_scores,
)
from cpt_cli.runs.layout import CHECKPOINTS, complete_checkpoints
from cpt_cli.runs.lineage import write_json
from cpt_cli.training.backend import end
from cpt_cli.training.checkpoint import start_name
from cpt_cli.training.collective import write_together
from cpt_cli.training.replay import decision_missed, steer_replay
from cpt_cli.training.setup import Run, set_up
from cpt_cli.training.signals import Signals, StopNow
from cpt_cli.training.step import StepResult, train_step
from cpt_cli.training.throughput import Throughput, peak_flops


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    report: dict[str, Any]
    steps: int
    stopped: str | None = None


def train(recipe: Recipe, *, output_dir: str | None = None, resume: str | None = None,
          overwrite: bool = False, console: Any = None,
          on_event: Callable[[dict[str, Any]], None] | None = None,
          replan: bool = False) -> TrainResult:
    """Train one stage. `resume`: None (refuse an existing run dir), "auto", "never" or a
    checkpoint path; `replan`: a resume applies a changed mixture from the checkpoint's step
    (config/resume.py). `on_event` sees every event written to metrics.jsonl. Returns the run
    directory and the final forgetting report; raises `TrainingStopped` when the run stops early
    (signal, NaN loss, forgetting budget) and `UsageError` for anything the user can fix."""
    with Signals() as signals, contextlib.ExitStack() as cleanup:
        try:
            return _train(recipe, signals, cleanup, output_dir=output_dir, resume=resume,
                          overwrite=overwrite, console=console, on_event=on_event,
                          replan=replan)
        except StopNow as stop:
            raise TrainingStopped(f"received {stop} before training started: nothing was "
                                  "trained and nothing needs saving; run the same command "
                                  "again to start.", exit_code=signals.exit_code) from None


def _train(recipe: Recipe, signals: Signals, cleanup: contextlib.ExitStack, *,
           output_dir: str | None, resume: str | None, overwrite: bool, console: Any,
           on_event: Callable[[dict[str, Any]], None] | None, replan: bool) -> TrainResult:
    run = set_up(recipe, cleanup, output_dir=output_dir, resume=resume, overwrite=overwrite,
                 console=console, on_event=on_event, replan=replan)
    stopped = _run_steps(run, signals)
    run.display.stop()
    if stopped is not None:
        # No final evaluation: a preempted job has seconds left, and a run stopped for
        # forgetting was evaluated at this very step.
        end(run.accelerator, run.metrics)
        raise stopped
    return _finish(run)


def _run_steps(run: Run, signals: Signals) -> TrainingStopped | None:
    """The steps from the run's state to the last; a TrainingStopped when the run must stop
    early (after its checkpoint, where one is due)."""
    state, P = run.state, run.accelerator.num_processes
    cuda = torch.cuda.is_available()
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    run.display.start_training(run.steps, state.step, run.tokens_per_step)
    throughput = Throughput(run.tokens_per_step, run.flops_per_token, peak, P,
                            start_step=state.step)
    signals.defer()  # from here a signal stops the run after the current step, with a checkpoint
    run.model.train()
    stopped = _evaluate_missed(run, signals)
    if stopped is not None:
        return stopped
    for step, micro_batches in run.loader.iter_steps(state.step):
        result = train_step(run, step, micro_batches, signals)
        state.step = step + 1
        if result.bad:
            state.bad_steps += 1
            stopped = _bad_step(run, result)
            if stopped is not None:
                return stopped
            continue
        if state.step % run.recipe.train.log_every_steps == 0 or state.step == run.steps:
            _log(run, result, throughput, cuda)
        with throughput.paused():
            over_budget = _evaluate_if_due(run, result.stop_requested)
            # One process need not agree with anyone: act on a signal from just now.
            stop_requested = result.stop_requested if P > 1 else signals.received is not None
            saved = run.checkpointer.save(state, force=bool(over_budget) or stop_requested)
            if saved is not None:
                run.display.checkpoint_saved(saved)
        stopped = _stop(run, over_budget, stop_requested, signals)
        if stopped is not None:
            return stopped
    return None


def _bad_step(run: Run, result: StepResult) -> TrainingStopped | None:
    """A non-finite loss or gradient norm: the update was skipped; past train.max_bad_steps the
    run stops (exit status 1), naming the last good checkpoint."""
    state, recipe = run.state, run.recipe
    run.emit({"event": "bad_step", "step": state.step,
              "tokens": state.step * run.tokens_per_step, "loss": str(result.loss),
              "grad_norm": str(result.grad_norm), "bad_steps": state.bad_steps})
    run.display.status(f"step {state.step}: loss {result.loss}, gradient norm {result.grad_norm}: "
                       f"update skipped ({state.bad_steps} of train.max_bad_steps "
                       f"{recipe.train.max_bad_steps})")
    if state.bad_steps <= recipe.train.max_bad_steps:
        return None
    last = complete_checkpoints(run.run_dir)
    return TrainingStopped(
        f"the loss is {result.loss} (gradient norm {result.grad_norm}) at step "
        f"{state.step}: training stopped before the update, after "
        f"{state.bad_steps} bad step(s) (train.max_bad_steps is "
        f"{recipe.train.max_bad_steps}). The last good checkpoint is "
        f"{last[-1] if last else 'none (no checkpoint was written yet)'}. Lower "
        "train.optimizer.lr, check the data, or allow a few bad batches with "
        "train.max_bad_steps, then rerun with --resume auto.", exit_code=1)


def _log(run: Run, result: StepResult, throughput: Throughput, cuda: bool) -> None:
    """A train event: metrics.jsonl, the trackers and the display."""
    step = run.state.step
    tps = throughput.tokens_per_s(step)
    # trained_tokens: per source, the tokens of this step's global batch that the loss saw
    # (`tokens` counts what the model computed over): a Q&A source trained on its answers
    # shows here how much of the loss it really is.
    event = {"event": "train", "step": step, "tokens": step * run.tokens_per_step,
             "loss": result.loss, "lr": result.lr, "tokens_per_s": tps,
             "grad_norm": result.grad_norm, "trained_tokens": result.trained_tokens}
    if cuda:
        event["mfu"] = throughput.mfu(tps)
    run.emit(event)
    if run.accelerator.trackers:
        scalars = {k: v for k, v in event.items() if isinstance(v, (int, float))}
        scalars.update({f"trained_tokens/{name}": n
                        for name, n in result.trained_tokens.items()})
        run.accelerator.log(scalars, step=step)
    run.display.train_line(event)


def _evaluate_if_due(run: Run, stop_requested: bool) -> tuple[str, float] | None:
    """Every eval.every_steps (but not at the last step, which final/ evaluates, nor when the
    run is about to stop): the forgetting report as an event; the peak forgetting so far; under
    ratio: auto the replay decision, applied from this step (before its checkpoint); and
    (domain, forgetting) when a retained domain is over eval.max_forgetting_bpb."""
    state, every = run.state, run.recipe.eval.every_steps
    if not every or state.step % every != 0 or state.step == run.steps or stop_requested:
        return None
    report = forgetting_table(run.evaluate(), run.start_scores, run.roles, bootstrap_samples=0)
    event = run.eval_event(report, state.step)
    run.emit(event)
    run.display.eval_line(event)
    worst = report["summary"]["max_forgetting_bpb"]
    if worst is not None:
        state.peak_forgetting = max(worst, state.peak_forgetting or worst)
    steer_replay(run, report)
    budget = run.recipe.eval.max_forgetting_bpb
    if budget is not None and worst is not None and worst > budget:
        return report["summary"]["worst_forgetting_domain"], worst
    return None


def _evaluate_missed(run: Run, signals: Signals) -> TrainingStopped | None:
    """An auto run resumed at a step whose evaluation its stop skipped (a signal during the
    step before): that evaluation and its decision now, before the next step, as the straight
    run made them; the stop if it finds a domain over eval.max_forgetting_bpb. Done again, it
    decides the same (deterministic), so the checkpoint need not be rewritten."""
    if not decision_missed(run):
        return None
    return _stop(run, _evaluate_if_due(run, False), False, signals)


def _stop(run: Run, over_budget: tuple[str, float] | None, stop_requested: bool,
          signals: Signals) -> TrainingStopped | None:
    """Why the run stops after this step (its checkpoint is written), or None."""
    step, steps, run_dir = run.state.step, run.steps, run.run_dir
    if over_budget:
        return TrainingStopped(
            f"domain {over_budget[0]!r} forgot {over_budget[1]:.4f} bits per byte at step "
            f"{step}, above eval.max_forgetting_bpb "
            f"{run.recipe.eval.max_forgetting_bpb}; checkpoint saved in "
            f"{run_dir / CHECKPOINTS}", exit_code=1)
    if stop_requested and step != steps:
        name = signals.received or "a stop signal (on another process)"
        return TrainingStopped(
            f"received {name} at step {step} of {steps}: checkpoint saved to "
            f"{run_dir / CHECKPOINTS / f'step-{step:06d}'}. Resume with the same "
            f"command plus --resume auto (run directory {run_dir}).",
            exit_code=signals.exit_code)
    return None


def _finish(run: Run) -> TrainResult:
    """final/, its evaluation against the start, the forgetting report (written last: it marks
    the run as finished, see runs/layout.resume_point)."""
    state, main = run.state, run.accelerator.is_main_process
    final_dir = run.checkpointer.save_final(state)
    report = forgetting_table(run.evaluate(), run.start_scores, run.roles,
                              bootstrap_samples=run.recipe.eval.bootstrap_samples,
                              peak_forgetting=state.peak_forgetting, answers=run.answers)
    report.update(model=str(final_dir), start=start_name(run.recipe))
    judge_replay_budget(report, run.recipe.data.replay.max_forgetting_bpb)
    if main:
        run.emit(run.eval_event(report, state.step))

    def write_report() -> None:
        if main:
            save_scores(final_dir / "eval" / "start.npz", run.start_scores)
            # Written last: its presence marks the run as finished (see resume_point).
            write_json(final_dir / "eval" / "report.json", report)

    write_together(run.accelerator, "the final report", final_dir / "eval", write_report)
    end(run.accelerator, run.metrics)
    return TrainResult(run_dir=run.run_dir, final_dir=final_dir, report=report, steps=state.step)
