"""Evaluation speed: `cpt eval`'s per-document scoring of 100k held-out tokens per domain.

    python bench/eval_speed.py          # target: under 10 s per 100k tokens on a 2-core CPU

The quickstart model's shape (Llama, hidden 128, 4 layers, vocabulary 1,024, context 512) with a
byte-level BPE trained on the quickstart corpus; each domain's documents are taken in file order
until 100k tokens. Speed does not depend on the weights, so the model is randomly initialized.
Prints seconds and tokens/s per domain, best of 3 rounds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cpt_cli.config import TokenizerTrainConfig  # noqa: E402
from cpt_cli.data.corpus import build_quickstart_corpus  # noqa: E402
from cpt_cli.data.tokenization import train_tokenizer  # noqa: E402
from cpt_cli.evaluation.scoring import score_documents  # noqa: E402

TOKENS = 100_000


def _text(record: dict) -> str:
    if "text" in record:
        return record["text"]
    return f"Question: {record['question']}\nAnswer: {record['answer']}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_quickstart_corpus(Path(tmp) / "corpus")
        texts = {d: [_text(json.loads(line)) for line in p.read_text().splitlines()]
                 for d, p in paths.items()}
        tok = train_tokenizer(iter(texts["prose"] + texts["qa"]), TokenizerTrainConfig(
            vocab_size=1024), Path(tmp) / "cache", "bench-eval")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id)).eval()
        print(f"torch threads: {torch.get_num_threads()}; model "
              f"{sum(p.numel() for p in model.parameters()):,} parameters")
        for domain, docs in texts.items():
            chosen, n = [], 0
            for text in docs:
                if n >= TOKENS:
                    break
                chosen.append(text)
                n += len(tok(text, add_special_tokens=False)["input_ids"])
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                scores = score_documents(model, tok, chosen)
                best = min(best, time.perf_counter() - t)
            total = int(scores.tokens.sum())
            print(f"{domain:6} {len(chosen):5} documents {total:8,} tokens  {best:6.2f} s  "
                  f"{total / best:10,.0f} tokens/s  ({best * TOKENS / total:.2f} s per 100k)")


if __name__ == "__main__":
    main()
