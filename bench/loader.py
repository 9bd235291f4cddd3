"""Loader throughput: packed micro batches (input_ids, labels, position_ids as torch tensors)
read from the token cache by `PackedLoader`, on one CPU core.

    python bench/loader.py                     # concat and best_fit, seq_len 2048
    python bench/loader.py --json loader.json  # also write the figures as JSON

Target (issue 3): at least 1M tokens/s on one core, so the loader never starves a GPU step (an
8B model at 40% MFU on one H100 trains about 8k tokens/s per GPU; one core feeds a hundred).
The data is the quickstart corpus (code, prose and Q&A from the Python installation, built offline
if missing), tokenized by cpt with an 8,192-token BPE; the plan mixes the three sources with a
25% replay share, so every batch interleaves sources as training does. The process is pinned to
one core and torch to one thread; the plan's order and best_fit's bins are built before the clock
starts (they are built once per run) and reported on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 4096}


# The ramped case (issue 13): five sources whose weights move over the whole run, and a replay
# ratio that ramps too, so every step of the plan sits in a different segment of its ramp.
RAMPED = {"code": {"0%": 0.6, "100%": 0.1}, "qa": {"0%": 0.1, "50%": 0.2, "100%": 0.7},
          "docs": {"0%": 0.3, "100%": 0.2}, "prose": {"0%": 1.0, "100%": 0.5},
          "essays": {"0%": 0.2, "100%": 1.0}}


def recipe(data: Path, tokenizer: Path, cache: Path, packing: str, seq_len: int, micro: int,
           steps: int, ramped: bool = False) -> Any:
    from cpt_cli.config import recipe_from_config

    qa = {"name": "qa", "path": str(data / "qa.jsonl"), "weight": 0.4,
          "template": "Question: {question}\nAnswer: {answer}"}
    sources = [{"name": "code", "path": str(data / "code.jsonl"), "weight": 0.6}, qa]
    replay = [{"name": "prose", "path": str(data / "prose.jsonl")}]
    ratio: Any = 0.25
    if ramped:  # the same three files under five names: five streams, five schedules
        sources.append({"name": "docs", "path": str(data / "code.jsonl"), "min_chars": 2})
        replay.append({"name": "essays", "path": str(data / "prose.jsonl"), "min_chars": 2})
        for s in sources + replay:
            s["weight"] = RAMPED[s["name"]]
        ratio = {"0%": 0.2, "100%": 0.35}
    return recipe_from_config({
        "name": "bench-loader", "seed": 1,
        "model": {"init": {"config": TINY_MODEL}, "tokenizer": str(tokenizer)},
        "data": {"seq_len": seq_len, "packing": packing, "cache_dir": str(cache),
                 "max_epochs": 10_000, "holdout": {"tokens": "20k"},
                 "sources": sources, "replay": {"ratio": ratio, "sources": replay}},
        "train": {"steps": steps, "global_batch_size": micro * 8, "micro_batch_size": micro}},
        base_dir=data)


def plan_100b(seq_len: int = 2048, batch_tokens: int = 1_000_000) -> dict[str, Any]:
    """Planning a 100B-token run with the ramped five-source schedule: seconds and peak memory
    (tracemalloc) of make_plan, and of locating its last sequence (one segment's order)."""
    import tracemalloc

    from cpt_cli.data.mixture import PlanSource, make_plan
    from cpt_cli.data.schedule import MixSchedule, ValueSchedule

    batch = round(batch_tokens / seq_len)
    steps = 100 * 10**9 // (batch * seq_len)

    def points(mapping: dict[str, float]) -> ValueSchedule:
        return ValueSchedule(tuple((round(float(k.rstrip("%")) / 100 * steps), v)
                                   for k, v in mapping.items()))
    names = list(RAMPED)
    roles = ["new", "new", "new", "replay", "replay"]
    mix = MixSchedule(weights=[points(RAMPED[n]) for n in names], roles=roles,
                      ratio=points({"0%": 0.2, "100%": 0.35}), steps=steps, global_batch=batch,
                      names=names)
    rows = [PlanSource(n, r, 1.0, 10**9, 10**13, 0) for n, r in zip(names, roles, strict=True)]
    tracemalloc.start()
    start = time.perf_counter()
    plan = make_plan(rows, [10**13 / seq_len] * 5, mix.total, 0.0, seq_len, 1, [16.0] * 5,
                     global_batch=batch, schedule=mix)
    planned = time.perf_counter() - start
    plan.locate(plan.total_sequences - 1)
    located = time.perf_counter() - start - planned
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"tokens": plan.total_tokens, "sequences": plan.total_sequences, "steps": steps,
            "segments": int(len(plan.parts[0].counts)), "plan_s": planned,
            "locate_last_s": located, "peak_mib": peak / 2**20}


def tokenizer_folder(data: Path, cache: Path, work: Path) -> Path:
    from cpt_cli.config import TokenizerTrainConfig
    from cpt_cli.data.tokenization import train_tokenizer

    texts = (json.loads(line)["text"] for name in ("code", "prose")
             for line in (data / f"{name}.jsonl").read_text().splitlines())
    tok = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=8192, max_chars=10**9), cache,
                          "bench-loader-quickstart")
    folder = work / "tokenizer"
    tok.save_pretrained(str(folder))
    return folder


def measure(r: Any, seconds: float) -> dict[str, Any]:
    from cpt_cli.data.loader import PackedLoader
    from cpt_cli.data.prepare import batch_geometry, plan_data, prepare_data

    data = prepare_data(r)  # cached after the first packing mode
    start = time.perf_counter()
    data = plan_data(r, data)
    assert data.plan is not None
    if not data.plan.parts:  # a constant order is built once per run, before the first step
        data.plan.source_order()  # (a scheduled plan builds each segment when it reaches it)
    setup = time.perf_counter() - start
    _, accum, steps = batch_geometry(r, 1)
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=r.train.micro_batch_size,
                          grad_accum=accum)
    tokens = batches = 0
    start = time.perf_counter()
    for step, micro_batches in loader.iter_steps(0):
        for mb in micro_batches:
            tokens += mb.input_ids.numel()
            batches += 1
        loader.step_trained_tokens(step)  # the trainer asks for it every step (per source)
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    # Resuming: the first batch of a late step, from a fresh loader (no re-reading).
    start = time.perf_counter()
    late = PackedLoader(data.plan, data.streams, micro_batch_size=r.train.micro_batch_size,
                        grad_accum=accum)
    late.micro_batch(steps - 1, 0)
    resume = time.perf_counter() - start
    return {"packing": r.data.packing + (" ramped" if data.plan.parts else ""),
            "sources": len(data.plan.sources), "seq_len": r.data.seq_len,
            "micro_batch": r.train.micro_batch_size, "micro_batches": batches,
            "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "plan_sequences": data.plan.total_sequences, "plan_setup_s": setup,
            "resume_first_batch_s": resume}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "quickstart"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tokens", default="2B", help="The plan's budget (sets its length).")
    parser.add_argument("--seconds", type=float, default=10.0, help="Time per packing mode.")
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch

    from cpt_cli.config import parse_size
    from cpt_cli.data.cache import default_cache_dir
    from cpt_cli.data.corpus import build_quickstart_corpus

    torch.set_num_threads(1)
    data = Path(args.data)
    build_quickstart_corpus(data)
    work = Path(tempfile.mkdtemp(prefix="cpt-bench-loader-"))
    cache = default_cache_dir()  # $CPT_CACHE or ~/.cache/cpt: the token files are reused
    tok = tokenizer_folder(data, cache, work)
    steps = parse_size(args.tokens) // (args.seq_len * args.micro_batch * 8)
    results = []
    for packing, ramped in (("concat", False), ("best_fit", False), ("concat", True)):
        r = recipe(data, tok, cache, packing, args.seq_len, args.micro_batch, steps, ramped)
        row = measure(r, args.seconds)
        results.append(row)
        print(f"{row['packing']:15s} {row['tokens_per_s']:>12,.0f} tokens/s on one core "
              f"({row['micro_batches']:,} micro batches of {args.micro_batch} x {args.seq_len} "
              f"in {row['seconds']:.1f} s); plan of {row['plan_sequences']:,} sequences built "
              f"in {row['plan_setup_s']:.2f} s; resuming at the last step: first batch in "
              f"{row['resume_first_batch_s'] * 1000:.1f} ms", flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    big = plan_100b(args.seq_len)
    print(f"planning {big['tokens']:,} tokens ({big['sequences']:,} sequences, {big['segments']:,}"
          f" segments) with the ramped schedule: {big['plan_s']:.2f} s, the last sequence located"
          f" in {big['locate_last_s']:.2f} s, peak {big['peak_mib']:.0f} MiB", flush=True)
    ok = all(r["tokens_per_s"] >= 1e6 for r in results) and big["plan_s"] < 10
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": f"{platform.processor() or platform.machine()}, 1 of {os.cpu_count()} "
                       f"cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"), "results": results, "plan_100b": big,
            "ok": ok}, indent=2))
    print("targets met (>= 1M tokens/s, 100B planned < 10 s)" if ok else
          "target missed (>= 1M tokens/s, 100B planned < 10 s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
