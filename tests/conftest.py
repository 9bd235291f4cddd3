"""Fixtures shared by the test modules: offline Hugging Face, a private cpt cache, a tiny corpus,
a tiny tokenizer, a tiny valid recipe, and the real CLI run in-process.

`tiny_recipe` is a 2-layer, 32-wide Llama built from a config, a 300-token byte-level BPE trained
on the recipe's own sources (cached once per session), 150 documents per domain from the
quickstart corpus builder, 2 steps of 4 sequences of 64 tokens: about 3 s to train on 2 cores.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Before transformers or huggingface_hub are imported by any test module: they read it at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
}


@pytest.fixture(scope="session", autouse=True)
def library_logging() -> None:
    """transformers' log handler keeps the stderr it first saw: let that be the session's, not
    the stream of one CliRunner call (closed afterwards, so a later warning would fail to
    print and bury the output in a "Logging error" traceback)."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


@pytest.fixture(scope="session", autouse=True)
def cpt_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$CPT_CACHE for the whole session: tokenizers and token files are shared between tests
    (keyed by content), never written to the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("cpt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CPT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def quickstart_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """code.jsonl, prose.jsonl and qa.jsonl with 150 documents each (about 0.2 s to build)."""
    from cpt_cli.data.corpus import build_quickstart_corpus

    return build_quickstart_corpus(tmp_path_factory.mktemp("corpus"), max_documents=150)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory, quickstart_corpus: dict[str, Path],
                   cpt_cache: Path) -> Path:
    """A 300-token byte-level BPE (with BOS/EOS/PAD) saved to a folder: a `model.tokenizer` for
    recipes whose sources change from test to test, so no test retrains a tokenizer."""
    from cpt_cli.config import TokenizerTrainConfig
    from cpt_cli.data.tokenization import train_tokenizer

    texts = [json.loads(line)["text"] for line in
             quickstart_corpus["prose"].read_text().splitlines()]
    tok = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=300), cpt_cache,
                          "tests-tiny-tokenizer")
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def random_llama(tiny_tokenizer: Path) -> Callable[[Path, int], Path]:
    """random_llama(folder, seed) -> folder: a TINY_LLAMA initialized from `seed`, saved with the
    tiny tokenizer as a model folder (a start model for a recipe's model.path)."""

    def save(folder: Path, seed: int) -> Path:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
        torch.manual_seed(seed)
        config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"},
                             vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        return folder

    return save


@pytest.fixture(scope="session")
def train_two_processes() -> Callable[..., subprocess.CompletedProcess[str]]:
    """train_two_processes(recipe, output_dir, *extra): `cpt train RECIPE --num-processes 2
    --output-dir OUTPUT_DIR EXTRA...` as a user runs it (accelerate's launcher, offline), its
    output captured."""

    def run(recipe: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe),
                               "--num-processes", "2", "--output-dir", str(output_dir), *extra],
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))

    return run


@pytest.fixture
def tiny_recipe(tmp_path: Path, quickstart_corpus: dict[str, Path], cpt_cache: Path
                ) -> dict[str, Any]:
    """A valid recipe as a dict, its data copied to tmp_path/data (paths relative to the recipe's
    folder, tmp_path) and its run directory at tmp_path/runs/tiny. Mutate it, then `write_recipe`.
    """
    data = tmp_path / "data"
    data.mkdir()
    for name in ("prose", "qa"):
        shutil.copy(quickstart_corpus[name], data / f"{name}.jsonl")
    return {
        "name": "tiny",
        "seed": 1,
        "model": {"init": {"config": copy.deepcopy(TINY_LLAMA)},
                  "train_tokenizer": {"vocab_size": 300}},
        "data": {
            "seq_len": 64,
            "cache_dir": str(cpt_cache),
            "sources": [
                {"name": "prose", "path": "data/prose.jsonl"},
                {"name": "qa", "path": "data/qa.jsonl",
                 "template": "Question: {question}\nAnswer: {answer}"},
            ],
            "holdout": {"tokens": 500},
        },
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2,
                  "checkpoint": {"every_steps": 1, "keep": 2}},
        "output_dir": "runs/tiny",
    }


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[dict[str, Any], str], Path]:
    """write_recipe(recipe_dict, name="recipe.yaml") -> the YAML file in tmp_path."""

    def write(recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """cli("train", "recipe.yaml", ...) runs the real `cpt` app in-process from tmp_path and
    returns click's Result (`output` holds stdout and stderr)."""
    from typer.testing import CliRunner

    from cpt_cli.cli import app

    monkeypatch.chdir(tmp_path)  # a default runs/<name> lands in tmp_path, never in the repo
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, [str(a) for a in args])

    return invoke
