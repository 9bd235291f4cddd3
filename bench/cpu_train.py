"""CPU training throughput: cpt's training loop vs the Hugging Face `Trainer`, same run.

    python bench/cpu_train.py                   # 2 rounds of 40 timed steps after 5 warm-up steps
    python bench/cpu_train.py --steps 10 --warmup 2 --rounds 1 --json

The quickstart's model and batch, read from recipes/quickstart/base.yaml (Llama, hidden 128,
4 layers, 4 heads, intermediate 384, vocabulary 1024 from a BPE trained on the text; sequence
256, micro batch 16, 8,192 tokens per optimizer step, so gradient accumulation 2), fp32 on CPU,
AdamW, gradient clipping at 1.0, cosine schedule, the quickstart's prose and Q&A mixture.

- cpt: `cpt_cli.train(recipe)`, the real path (cache, mixture plan, packed loader, trainer),
  with evaluation and checkpoints only at the ends of the run, three ways: as the quickstart
  recipes train (their `train.compile` and cpt's default document masking: position_ids
  restart at each document, so the model builds a block-diagonal mask); eager with document
  masking; eager with `cross_document_attention: true` (plain causal attention, as the
  `Trainer` attends).
- Hugging Face `Trainer`: the same initial weights (same config and seed), the very sequences
  cpt trains on (taken from cpt's loader, in the same order, through an IterableDataset), the
  same micro batch, accumulation, optimizer, lr, schedule and clipping; contiguous positions, as
  `run_clm` would. Twice: as a user runs it (eager), and with `torch_compile=True` (the whole
  model compiled), the fair match for cpt's compiled layers.

Every contender is a fresh Python process, so one's allocator settings, heap and caches never
reach another's, and they run in lock-step: all start together, and after each step a contender
waits until every other has done its step (in a rotating order), so the bursts of load a shared
machine sees land on neighbouring steps of every contender alike instead of on whichever ran
during the burst. A step is timed from its go to its end (the whole loop: data, forward,
backward, clipping, optimizer, logging). tokens/s is 32 x 256 over the median timed step across
`--rounds` rounds (fresh processes each); the best (shortest) step is printed too: interference
only ever adds time. Ratios are against the `Trainer` as a user runs it (eager).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cpt_cli.config import Recipe, recipe_from_config  # noqa: E402
from cpt_cli.data.corpus import build_quickstart_corpus  # noqa: E402

# The quickstart's own shape and settings, read from its recipe, so the benchmark follows it.
QUICKSTART = OmegaConf.to_container(OmegaConf.load(
    Path(__file__).resolve().parent.parent / "recipes" / "quickstart" / "base.yaml"))
MODEL = QUICKSTART["model"]["init"]["config"]
VOCAB = QUICKSTART["model"]["train_tokenizer"]["vocab_size"]
SEQ = QUICKSTART["data"]["seq_len"]
MICRO = QUICKSTART["train"]["micro_batch_size"]
GLOBAL = QUICKSTART["train"]["global_batch_tokens"] // SEQ  # sequences per optimizer step
QUICKSTART_COMPILE = QUICKSTART["train"].get("compile", False)
LR, WEIGHT_DECAY, BETAS = 3e-3, 0.1, (0.9, 0.95)


def make_recipe(work: Path, corpus: dict[str, Path], steps: int, cross_document: bool,
                compile: bool = False) -> Recipe:
    return recipe_from_config({
        "name": "bench", "seed": 1234,
        "model": {"init": {"config": MODEL}, "train_tokenizer": {"vocab_size": VOCAB}},
        "data": {"seq_len": SEQ, "cross_document_attention": cross_document,
                 "cache_dir": str(work / "cache"),
                 "sources": [{"name": "prose", "path": str(corpus["prose"]), "weight": 0.6},
                             {"name": "qa", "path": str(corpus["qa"]), "weight": 0.4,
                              "template": "Question: {question}\nAnswer: {answer}"}],
                 "holdout": {"tokens": "2k"}},
        "train": {"steps": steps, "global_batch_size": GLOBAL, "micro_batch_size": MICRO,
                  "optimizer": {"lr": LR, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS)},
                  "schedule": {"name": "cosine", "warmup": 0.05},
                  "checkpoint": {"every_steps": None}, "log_every_steps": 1,
                  "compile": compile},
        "eval": {"every_steps": None, "bootstrap_samples": 0},
    }, base_dir=work)


class Baton:
    """A contender's side of the lock-step: at the end of each step, report the step's seconds
    (from the parent's go to this step's end) and wait for the next go; the other contenders'
    steps run meanwhile."""

    def __init__(self, ctl_fd: int, rep_fd: int) -> None:
        self.ctl = os.fdopen(ctl_fd, "rb", buffering=0)
        self.rep = os.fdopen(rep_fd, "w", buffering=1)
        self.resumed: float | None = None

    def step_end(self) -> None:
        end = time.perf_counter()
        self.rep.write(f"{end - self.resumed if self.resumed is not None else 'nan'}\n")
        self.ctl.read(1)  # the go; after the last step the parent closes the pipe instead
        self.resumed = time.perf_counter()


def time_cpt(recipe: Recipe, run_dir: Path, baton: Baton) -> None:
    from cpt_cli.training.loop import train

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "train":
            baton.step_end()

    train(recipe, output_dir=str(run_dir), overwrite=True, on_event=on_event)


def packed_sequences(recipe: Recipe) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """The tokenizer and every micro batch row cpt trains on, in cpt's order."""
    from cpt_cli.data.loader import PackedLoader
    from cpt_cli.data.prepare import plan_data, prepare_data

    data = plan_data(recipe, prepare_data(recipe), 1)
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=MICRO,
                          grad_accum=GLOBAL // MICRO, document_masking=False)
    rows = []
    for _, micro_batches in loader.iter_steps(0):
        for mb in micro_batches:
            rows += [{"input_ids": ids, "labels": labels}
                     for ids, labels in zip(mb.input_ids, mb.labels, strict=True)]
    return data.tokenizer, rows


def time_hf_trainer(recipe: Recipe, work: Path, baton: Baton,
                    torch_compile: bool = False) -> None:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer, rows = packed_sequences(recipe)
    # Built as cpt_cli.model.load_model builds a model from model.init: identical weights.
    config = dict(MODEL)
    model_type = config.pop("model_type")
    config = AutoConfig.for_model(model_type, **config, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter(rows)

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            baton.step_end()

    steps = recipe.train.steps or 0
    args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=GLOBAL // MICRO, max_steps=steps, learning_rate=LR,
        weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=max(1, round(0.05 * steps)),
        optim="adamw_torch", logging_steps=10**9, save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=recipe.seed,
        torch_compile=torch_compile)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()]).train()


HF = "Hugging Face Trainer"
QUICKSTART_ROW = "cpt, as the quickstart recipes train"
CONTENDERS: dict[str, dict[str, Any]] = {
    QUICKSTART_ROW: {"cpt": True, "cross": False, "compile": QUICKSTART_COMPILE},
    "cpt, eager (document masking)": {"cpt": True, "cross": False},
    "cpt, eager, cross_document_attention": {"cpt": True, "cross": True},
    HF: {"cpt": False},
    "Trainer, torch_compile": {"cpt": False, "compile": True},
}


def run_one(name: str, work: Path, total_steps: int, baton: Baton) -> None:
    """One contender in this process (the child side of `lockstep`)."""
    spec = CONTENDERS[name]
    corpus = build_quickstart_corpus(work / "corpus", max_documents=3000)
    if spec["cpt"]:
        recipe = make_recipe(work, corpus, total_steps, spec["cross"],
                             compile=spec.get("compile", False))
        time_cpt(recipe, work / f"cpt-run-{os.getpid()}", baton)
    else:
        time_hf_trainer(make_recipe(work, corpus, total_steps, True), work / f"hf-{os.getpid()}",
                        baton, torch_compile=spec.get("compile", False))


# After a contender's step, its OpenMP threads spin a moment before they sleep (libgomp's spin
# count, about a millisecond); the next contender starts after this pause, on idle cores.
HANDOVER_PAUSE_S = 0.02


def lockstep(names: list[str], work: Path, steps: int, warmup: int) -> dict[str, list[float]]:
    """Run every contender in its own fresh Python process, all at once but one step at a time:
    each waits after every step until the others have done theirs, so a burst of load from
    elsewhere lands on neighbouring steps of every contender alike, while allocator settings,
    heaps and caches stay per process. Returns each contender's timed step seconds."""
    total = steps + warmup
    children: dict[str, tuple[subprocess.Popen[bytes], Any, Any, Path]] = {}
    for name in names:
        ctl_r, ctl_w = os.pipe()
        rep_r, rep_w = os.pipe()
        log = work / f"{''.join(c if c.isalnum() else '-' for c in name)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--contender", name, "--work", str(work),
                 "--steps", str(steps), "--warmup", str(warmup),
                 "--ctl-fd", str(ctl_r), "--rep-fd", str(rep_w)],
                pass_fds=(ctl_r, rep_w), stdout=out, stderr=subprocess.STDOUT)
        os.close(ctl_r)
        os.close(rep_w)
        children[name] = (proc, os.fdopen(ctl_w, "wb", buffering=0), os.fdopen(rep_r), log)

    def failed(name: str) -> NoReturn:
        proc, _, _, log = children[name]
        for other, *_ in children.values():
            other.kill()
        tail = log.read_text(errors="replace")[-4000:]
        sys.exit(f"{name} stopped (exit {proc.wait()}); the end of {log}:\n{tail}")

    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(1, total + 1):
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            _, ctl, rep, _ = children[name]
            if step > 1:
                time.sleep(HANDOVER_PAUSE_S)
                ctl.write(b"g")
            line = rep.readline()
            if not line:
                failed(name)
            if step > warmup:
                times[name].append(float(line))
    for name, (proc, ctl, rep, _) in children.items():
        ctl.close()  # the last step's go: the contender finishes its run and exits
        if proc.wait() != 0:
            failed(name)
        rep.close()
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (at least 1: the first step has no go)")
    parser.add_argument("--rounds", type=int, default=2, help="lock-step runs, fresh processes")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: tmp)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--ctl-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rep-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--steps, --rounds and --warmup must be at least 1")
    if args.contender:  # a child of lockstep()
        run_one(args.contender, args.work, args.steps + args.warmup,
                Baton(args.ctl_fd, args.rep_fd))
        return {}
    if args.work:
        return measure(args, args.work)
    with tempfile.TemporaryDirectory(prefix="cpt-bench-") as tmp:  # 80 MB: not left behind
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every contender in lock-step, `args.rounds` times, in `work`; the report (printed)."""
    # The corpus and token cache once, before any timing, so every child starts from the same.
    from cpt_cli.data.prepare import prepare_data
    corpus = build_quickstart_corpus(work / "corpus", max_documents=3000)
    prepare_data(make_recipe(work, corpus, 1, False))
    names = list(CONTENDERS)
    step_times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name, times in lockstep(names[r:] + names[:r], work, args.steps,
                                    args.warmup).items():
            step_times[name] += times
    results = {}
    for name, times in step_times.items():
        median, best = statistics.median(times), min(times)
        results[name] = {"tokens_per_s": GLOBAL * SEQ / median, "median_step_s": median,
                         "best_tokens_per_s": GLOBAL * SEQ / best, "best_step_s": best,
                         "mean_step_s": statistics.fmean(times), "timed_steps": len(times)}
    hf = results[HF]
    for row in results.values():
        row["ratio"] = row["tokens_per_s"] / hf["tokens_per_s"]
        row["best_ratio"] = row["best_tokens_per_s"] / hf["best_tokens_per_s"]
    report = {"results": results, "steps": args.steps, "warmup": args.warmup,
              "rounds": args.rounds,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} torch threads",
              "load_average": os.getloadavg(),
              "versions": {"torch": torch.__version__,
                           "transformers": __import__("transformers").__version__}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'':40} {'tokens/s':>10} {'median step':>12} {'ratio':>6}   "
              f"{'best step':>10} {'tokens/s':>10} {'ratio':>6}")
        for name, row in results.items():
            print(f"{name:40} {row['tokens_per_s']:10,.0f} {row['median_step_s']:11.3f}s "
                  f"{row['ratio']:5.2f}x   {row['best_step_s']:9.3f}s "
                  f"{row['best_tokens_per_s']:10,.0f} {row['best_ratio']:5.2f}x")
        print(f"{report['machine']}; load average {report['load_average'][0]:.1f}; "
              f"torch {torch.__version__}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
