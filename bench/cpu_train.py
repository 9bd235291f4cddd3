"""CPU training throughput: cpt's training loop vs the Hugging Face `Trainer`, same run.

    python bench/cpu_train.py                   # 3 rounds of 30 timed steps after 5 warm-up steps
    python bench/cpu_train.py --steps 10 --warmup 2 --json

The quickstart model shape (Llama, hidden 128, 4 layers, 4 heads, intermediate 384, vocabulary
1024 from a BPE trained on the text), sequence 256, micro batch 16, global batch 32 sequences
(gradient accumulation 2), fp32 on CPU, AdamW, gradient clipping at 1.0, cosine schedule.

- cpt: `cpt_cli.train(recipe)`, the real path (cache, mixture plan, packed loader, trainer),
  with evaluation and checkpoints only at the ends of the run. Timed from the end of the last
  warm-up step to the end of the last step, through `on_event`, which fires right after each
  step's one host sync. Twice: with document masking (the default: position_ids restart at each
  document, so the model builds a block-diagonal mask) and with `cross_document_attention: true`
  (contiguous position_ids, plain causal attention).
- Hugging Face `Trainer`: the same initial weights (same config and seed), the very sequences
  cpt trains on (taken from cpt's loader, in the same order, through an IterableDataset), the
  same micro batch, accumulation, optimizer, lr, schedule and clipping; contiguous positions, as
  `run_clm` would. Timed the same way with a `TrainerCallback` at each optimizer step.

The three runs repeat in `--rounds` rounds, in a rotated order, and tokens/s is 32 x 256 over
the median time of a timed step across all rounds: a shared machine's bursts of load slow single
steps of whichever run is active, and the median of interleaved rounds shrugs them off where one
run's total time cannot. The best (shortest) step is printed too: interference only ever adds
time, so on a busy machine it is the closer figure to each loop's own speed. Ratios are
cpt / Trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cpt_cli.config import Recipe, recipe_from_config  # noqa: E402
from cpt_cli.corpus import build_quickstart_corpus  # noqa: E402

SEQ, MICRO, GLOBAL = 256, 16, 32
MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 512, "tie_word_embeddings": True}
LR, WEIGHT_DECAY, BETAS = 3e-3, 0.1, (0.9, 0.95)


def make_recipe(work: Path, corpus: dict[str, Path], steps: int, cross_document: bool) -> Recipe:
    return recipe_from_config({
        "name": "bench", "seed": 1234,
        "model": {"init": {"config": MODEL}, "train_tokenizer": {"vocab_size": 1024}},
        "data": {"seq_len": SEQ, "cross_document_attention": cross_document,
                 "cache_dir": str(work / "cache"),
                 "sources": [{"name": "prose", "path": str(corpus["prose"]), "weight": 0.6},
                             {"name": "qa", "path": str(corpus["qa"]), "weight": 0.4,
                              "template": "Question: {question}\nAnswer: {answer}"}],
                 "holdout": {"tokens": "2k"}},
        "train": {"steps": steps, "global_batch_size": GLOBAL, "micro_batch_size": MICRO,
                  "optimizer": {"lr": LR, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS)},
                  "schedule": {"name": "cosine", "warmup": 0.05},
                  "checkpoint": {"every_steps": None}, "log_every_steps": 1},
        "eval": {"every_steps": None, "bootstrap_samples": 0},
    }, base_dir=work)


def time_cpt(recipe: Recipe, run_dir: Path, warmup: int) -> list[float]:
    from cpt_cli.trainer import train

    ends: dict[int, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "train":
            ends[event["step"]] = time.perf_counter()

    train(recipe, output_dir=str(run_dir), overwrite=True, on_event=on_event)
    return _rate(ends, warmup, recipe.train.steps or 0)


def packed_sequences(recipe: Recipe) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """The tokenizer and every micro batch row cpt trains on, in cpt's order."""
    from cpt_cli.loader import PackedLoader
    from cpt_cli.prepare import plan_data, prepare_data

    data = plan_data(recipe, prepare_data(recipe), 1)
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=MICRO,
                          grad_accum=GLOBAL // MICRO, document_masking=False)
    rows = []
    for _, micro_batches in loader.iter_steps(0):
        for mb in micro_batches:
            rows += [{"input_ids": ids, "labels": labels}
                     for ids, labels in zip(mb.input_ids, mb.labels, strict=True)]
    return data.tokenizer, rows


def time_hf_trainer(recipe: Recipe, work: Path, warmup: int) -> list[float]:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer, rows = packed_sequences(recipe)
    # Built as cpt_cli.modeling.load_model builds a model from model.init: identical weights.
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

    ends: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends[state.global_step] = time.perf_counter()

    steps = recipe.train.steps or 0
    args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=GLOBAL // MICRO, max_steps=steps, learning_rate=LR,
        weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=max(1, round(0.05 * steps)),
        optim="adamw_torch", logging_steps=10**9, save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=recipe.seed)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()]).train()
    return _rate(ends, warmup, steps)


def _rate(ends: dict[int, float], warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step."""
    return [ends[s] - ends[s - 1] for s in range(warmup + 1, steps + 1)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: tmp)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    corpus = build_quickstart_corpus(work / "corpus", max_documents=3000)
    total = args.steps + args.warmup
    runs = {
        "cpt (document masking)": lambda: time_cpt(make_recipe(work, corpus, total, False),
                                                   work / "cpt-doc", args.warmup),
        "cpt (cross_document_attention)": lambda: time_cpt(
            make_recipe(work, corpus, total, True), work / "cpt-cross", args.warmup),
        "Hugging Face Trainer": lambda: time_hf_trainer(make_recipe(work, corpus, total, True),
                                                        work, args.warmup),
    }
    names = list(runs)
    step_times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step_times[name] += runs[name]()
    results = {}
    for name, times in step_times.items():
        median, best = statistics.median(times), min(times)
        results[name] = {"tokens_per_s": GLOBAL * SEQ / median, "median_step_s": median,
                         "best_tokens_per_s": GLOBAL * SEQ / best, "best_step_s": best,
                         "mean_step_s": statistics.fmean(times), "timed_steps": len(times)}
    hf = results["Hugging Face Trainer"]
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
        print(f"{'':32} {'tokens/s':>10} {'median step':>12} {'ratio':>6}   "
              f"{'best step':>10} {'tokens/s':>10} {'ratio':>6}")
        for name, row in results.items():
            print(f"{name:32} {row['tokens_per_s']:10,.0f} {row['median_step_s']:11.3f}s "
                  f"{row['ratio']:5.2f}x   {row['best_step_s']:9.3f}s "
                  f"{row['best_tokens_per_s']:10,.0f} {row['best_ratio']:5.2f}x")
        print(f"{report['machine']}; load average {report['load_average'][0]:.1f}; "
              f"torch {torch.__version__}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
