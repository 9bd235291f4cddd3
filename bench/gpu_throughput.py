"""GPU throughput: cpt's real training path vs the Hugging Face Trainer, same card, same command.

    python bench/gpu_throughput.py --anchor shared/bench/hf_trainer_anchor.py   # on an H100/H200
    python bench/gpu_throughput.py --tiny                                       # CPU smoke test

For each model shape (Llama-3.2-1B and SmolLM-360M, initialized from config, sequence 2048, bf16)
it writes a recipe, a tokenizer whose vocabulary matches the shape, and random-token documents,
then runs `cpt_cli.train` exactly as `cpt train` would (cache, plan, packed loader, trainer with
evaluation and checkpoints switched to the ends of the run). Tokens/s is the median over the
logged intervals after warm-up, MFU counts 6N per token plus attention (12 * layers * d * seq, the
anchor's formula) against a measured bf16 matrix-product peak, and peak memory is
`torch.cuda.max_memory_allocated`. The anchor (HF Trainer) runs in a subprocess of the same
command, on the same shapes; the ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "smollm-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                        num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                        tie_word_embeddings=True, batch=16),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True, batch=8),
}
TINY = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                     tie_word_embeddings=True, batch=2)}


def flops_per_token(shape: dict, seq: int) -> float:
    d, L, V, inter = (shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"],
                      shape["intermediate_size"])
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    n_matmul = L * (2 * d * d + 2 * d * kv + 3 * d * inter) + d * V
    return 6 * n_matmul + 12 * L * d * seq


def measured_peak_flops() -> float:
    """bf16 matrix-product peak of this card, measured (8192^3, 20 repeats)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t)


def word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer with exactly `vocab` entries: random words become random ids, as
    in the anchor's random-token batches."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)}
    words["<|eos|>"], words["<|unk|>"] = vocab - 2, vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", unk_token="<|unk|>",
                            bos_token="<|eos|>").save_pretrained(str(folder))


def write_documents(path: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        left = tokens
        while left > 0:
            n = int(min(left, rng.integers(200, 4000)))
            ids = rng.integers(0, vocab - 2, n)
            fh.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")
            left -= n


def run_cpt(name: str, shape: dict, seq: int, steps: int, warm: int, work: Path,
            log_every: int) -> dict:
    from cpt_cli import load_recipe, train

    vocab = shape["vocab_size"]
    tok_dir = work / f"tok-{name}"
    word_tokenizer(tok_dir, vocab)
    batch = shape["batch"]
    data = work / f"{name}.jsonl"
    write_documents(data, vocab, tokens=(steps + 2) * batch * seq + 400_000)
    config = {k: v for k, v in shape.items() if k != "batch"}
    config.update(model_type="llama", max_position_embeddings=seq)
    recipe = {
        "name": f"bench-{name}", "seed": 0,
        "model": {"init": {"config": config}, "tokenizer": str(tok_dir),
                  "attn_implementation": "sdpa"},
        "data": {"seq_len": seq, "cache_dir": str(work / "cache"),
                 "sources": [{"name": "random", "path": str(data)}],
                 "holdout": {"tokens": 2 * seq}, "cross_document_attention": True},
        "train": {"steps": steps, "global_batch_size": batch, "micro_batch_size": batch,
                  "precision": "bf16" if torch.cuda.is_available() else "fp32",
                  "compile": torch.cuda.is_available(), "log_every_steps": log_every,
                  "optimizer": {"lr": 1e-4}, "schedule": {"name": "constant", "warmup": 0},
                  "checkpoint": {"every_steps": None}},
        "eval": {"every_steps": None, "bootstrap_samples": 0},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(load_recipe(path), output_dir=str(work / "runs" / name), overwrite=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text()
              .splitlines() if '"train"' in line]
    rates = [e["tokens_per_s"] for e in events if e["step"] > warm]
    tps = statistics.median(rates)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"impl": "cpt", "model": name, "batch": batch, "seq": seq, "tok_s": tps,
            "peak_gib": peak, "flops_per_token": flops_per_token(shape, seq)}


def run_anchor(anchor: str, tiny: bool) -> list[dict]:
    cmd = [sys.executable, anchor] + (["--tiny"] if tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = []
    for line in out.stdout.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the Trainer prints Python dicts of its own
        if isinstance(row, dict) and "kind" in row:
            rows.append(row)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--anchor", default=None, help="path of hf_trainer_anchor.py")
    parser.add_argument("--only", default=None, help="comma-separated shape names")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    shapes = TINY if args.tiny else SHAPES
    if args.only:
        shapes = {k: v for k, v in shapes.items() if k in args.only.split(",")}
    seq, steps, warm, log_every = (128, 6, 2, 1) if args.tiny else (2048, 30, 10, 5)
    peak = measured_peak_flops() if torch.cuda.is_available() else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in shapes.items():
            row = run_cpt(name, shape, seq, steps, warm, Path(tmp), log_every)
            if peak:
                row["mfu"] = row["tok_s"] * row["flops_per_token"] / peak
            print(json.dumps(row), flush=True)
            results.append(row)
    anchors = run_anchor(args.anchor, args.tiny) if args.anchor else []
    for row in anchors:
        print(json.dumps(row), flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
          f"peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else "\ndevice: cpu")
    print(f"{'model':14} {'cpt tok/s':>11} {'cpt MFU':>8} {'cpt GiB':>8} {'HF tok/s':>10} "
          f"{'HF GiB':>7} {'ratio':>6}")
    for row in results:
        hf = next((a for a in anchors if a.get("model") == row["model"]
                   and a.get("kind") == "hf_trainer" and "tokens_per_s" in a), None)
        ratio = row["tok_s"] / hf["tokens_per_s"] if hf else None
        row["ratio_vs_hf_trainer"] = ratio
        print(f"{row['model']:14} {row['tok_s']:11,.0f} {row.get('mfu') or 0:8.2f} "
              f"{row['peak_gib'] or 0:8.1f} {hf['tokens_per_s'] if hf else 0:10,.0f} "
              f"{hf.get('peak_mem_gib', 0) if hf else 0:7.1f} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpt": results, "anchor": anchors}, indent=1))


if __name__ == "__main__":
    main()
