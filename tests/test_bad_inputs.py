"""Bad recipes, bad data and unsafe inputs, each through the real CLI (`cpt train`, `cpt mix
inspect`, `cpt eval`).

Every mistake must end with exit status 2 and one message that names what is wrong (the key, the
file and line) and how to fix it; no traceback; and nothing written: the run directory does not
appear and no file under the test's folder changes (the tokenization cache lives elsewhere and may
fill, since it is keyed by content). docs/reliability.md lists the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# --------------------------------------------------------------------------------------------
# The matrix: one entry per kind of mistake.
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a case adds to the command line, or the recipe file it uses instead."""

    args: list[str] = field(default_factory=list)
    recipe_file: Path | None = None


Mutate = Callable[[dict[str, Any], Path], "Setup | None"]


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Mutate
    expect: tuple[str, ...]           # every one must appear in the message


def _set(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = recipe
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _del(recipe: dict[str, Any], dotted: str) -> None:
    node: Any = recipe
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    del node[last]


def setting(**changes: Any) -> Mutate:
    """A mutation setting dotted keys (`data__seq_len=256` sets data.seq_len)."""

    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        for key, value in changes.items():
            _set(recipe, key.replace("__", "."), value)

    return mutate


def _bert_folder(tmp: Path) -> Path:
    folder = tmp / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForSequenceClassification"],
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 300}))
    return folder


def _model_path(value: str) -> Mutate:
    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        recipe["model"] = {"path": value}

    return mutate


def _not_causal(recipe: dict[str, Any], tmp: Path) -> None:
    recipe["model"] = {"path": str(_bert_folder(tmp).relative_to(tmp))}


def _no_config(recipe: dict[str, Any], tmp: Path) -> None:
    (tmp / "weights").mkdir()
    (tmp / "weights" / "model.safetensors").write_bytes(b"")
    recipe["model"] = {"path": "weights"}


def _run_directory_as_model(recipe: dict[str, Any], tmp: Path) -> None:
    final = tmp / "old-runs" / "base" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    recipe["model"] = {"path": "old-runs/base"}


def _file_as_model(recipe: dict[str, Any], tmp: Path) -> None:
    (tmp / "model.safetensors").write_bytes(b"")
    recipe["model"] = {"path": "model.safetensors"}


def _tokenizer_without_eos(recipe: dict[str, Any], tmp: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a small text", "another small text"],
                            trainers.BpeTrainer(vocab_size=270, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel
                                                .alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(tmp / "tok-no-eos"))
    recipe["model"].pop("train_tokenizer")
    recipe["model"]["tokenizer"] = "tok-no-eos"


def _damaged_tokenizer(recipe: dict[str, Any], tmp: Path) -> None:
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    recipe["model"].pop("train_tokenizer")
    recipe["model"]["tokenizer"] = "tok"


def _cache_dir_is_a_file(recipe: dict[str, Any], tmp: Path) -> None:
    (tmp / "cache.bin").write_bytes(b"")
    recipe["data"]["cache_dir"] = "cache.bin"


def _empty_source(recipe: dict[str, Any], tmp: Path) -> None:
    (tmp / "data" / "empty.jsonl").write_text("")
    recipe["data"]["sources"][0]["path"] = "data/empty.jsonl"


def _blank_documents(recipe: dict[str, Any], tmp: Path) -> None:
    (tmp / "data" / "blank.jsonl").write_text('{"text": ""}\n{"text": "   \\n"}\n' * 5)
    recipe["data"]["sources"][0]["path"] = "data/blank.jsonl"


def _invalid_yaml(recipe: dict[str, Any], tmp: Path) -> Setup:
    path = tmp / "broken.yaml"
    path.write_text("name: tiny\ndata: {seq_len: 64, sources: [\n")
    return Setup(recipe_file=path)


def _yaml_list(recipe: dict[str, Any], tmp: Path) -> Setup:
    path = tmp / "list.yaml"
    path.write_text("- name: tiny\n- seq_len: 64\n")
    return Setup(recipe_file=path)


def _python_tag(recipe: dict[str, Any], tmp: Path) -> Setup:
    marker = tmp / "pwned"
    path = tmp / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    return Setup(recipe_file=path)


def _missing_recipe(recipe: dict[str, Any], tmp: Path) -> Setup:
    return Setup(recipe_file=tmp / "no-such-recipe.yaml")


def _args(*args: str) -> Mutate:
    def mutate(recipe: dict[str, Any], tmp: Path) -> Setup:
        return Setup(args=list(args))

    return mutate


def _without(*dotted: str) -> Mutate:
    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        for key in dotted:
            _del(recipe, key)

    return mutate


def _global_tokens(recipe: dict[str, Any], tmp: Path) -> None:
    del recipe["train"]["global_batch_size"]
    recipe["train"]["global_batch_tokens"] = 10


def _replay(ratio: float) -> Mutate:
    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        recipe["data"]["replay"] = {"ratio": ratio,
                                    "sources": [{"name": "old", "path": "data/qa.jsonl",
                                                 "template": "{question} {answer}"}]}

    return mutate


def _several(recipe: dict[str, Any], tmp: Path) -> None:
    recipe["data"]["seq_lenn"] = 64
    recipe["train"]["optimizer"] = {"lr": -1.0}
    recipe["data"]["sources"][0]["weight"] = 0
    recipe["train"]["schedule"] = {"name": "cosin"}


def _duplicate(recipe: dict[str, Any], tmp: Path) -> None:
    recipe["data"]["sources"][1]["name"] = "prose"


def _tokenizer_missing(recipe: dict[str, Any], tmp: Path) -> None:
    recipe["model"].pop("train_tokenizer")
    recipe["model"]["tokenizer"] = "./no-such-tokenizer"


def _hf_missing(recipe: dict[str, Any], tmp: Path) -> None:
    recipe["data"]["sources"][0] = {"name": "web", "hf": {"path": "./no-such-dataset"}}


def _unknown_model_type(name: str) -> Mutate:
    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        recipe["model"]["init"]["config"]["model_type"] = name

    return mutate


RECIPE_CASES = [
    Case("unknown-key-did-you-mean", setting(data__seq_lenn=64),
         ("data.seq_lenn", "did you mean 'seq_len'")),
    Case("unknown-section", setting(trian={"steps": 2}), ("trian", "did you mean 'train'")),
    Case("wrong-type-int", setting(train__steps="many"), ("train.steps", "expected an integer")),
    Case("wrong-type-bool", setting(model__trust_remote_code="sure"),
         ("model.trust_remote_code", "true or false")),
    Case("wrong-type-list", setting(data__sources={"name": "x", "path": "data/qa.jsonl"}),
         ("data.sources", "expected a list")),
    Case("zero-weight", setting(data__sources__0__weight=0),
         ("data.sources[0].weight", "positive")),
    Case("negative-weight", setting(data__sources__1__weight=-0.5),
         ("data.sources[1].weight", "positive")),
    Case("weight-not-a-number", setting(data__sources__1__weight="heavy"),
         ("data.sources[1].weight", "expected a finite number")),
    Case("weight-nan", setting(data__sources__1__weight="nan"),
         ("data.sources[1].weight", "expected a finite number")),
    Case("warmup-nan", setting(train__schedule={"name": "cosine", "warmup": "nan"}),
         ("train.schedule.warmup", "expected a finite number", "'nan'")),
    Case("max-epochs-nan", setting(data__max_epochs=float("nan")),
         ("data.max_epochs", "expected a finite number")),
    Case("lr-infinite", setting(train__optimizer={"lr": "inf"}),
         ("train.optimizer.lr", "expected a finite number")),
    Case("forgetting-budget-nan", setting(eval__max_forgetting_bpb=".nan"),
         ("eval.max_forgetting_bpb", "expected a finite number")),
    Case("seed-too-large", setting(seed=99999999999999999999),
         ("seed", "must be between 0 and 4294967295")),
    Case("replay-ratio-one", _replay(1.0), ("data.replay.ratio", "below 1")),
    Case("replay-ratio-above-one", _replay(1.5), ("data.replay.ratio", "below 1")),
    Case("replay-ratio-without-sources", setting(data__replay={"ratio": 0.25, "inherit": False}),
         ("data.replay", "data.replay.sources")),
    Case("duplicate-source-names", _duplicate, ("data.sources[1].name", "unique")),
    Case("glob-matches-nothing", setting(data__sources__0__path="data/*.parquet"),
         ("'prose'", "data/*.parquet", "matches no file", "Check the glob")),
    Case("empty-source-file", _empty_source, ("'prose'", "no documents", "path")),
    Case("only-blank-documents", _blank_documents, ("'prose'", "no documents", "10 empty")),
    Case("seq-len-above-context", setting(data__seq_len=256),
         ("data.seq_len", "256", "128", "lower data.seq_len")),
    Case("tokenizer-without-eos", _tokenizer_without_eos,
         ("model.tokenizer", "tok-no-eos", "no EOS", "eos_token")),
    Case("tokenizer-damaged", _damaged_tokenizer,
         ("model.tokenizer", "could not load a tokenizer", "tokenizer.json")),
    Case("tokenizer-missing", _tokenizer_missing,
         ("model.tokenizer", "no-such-tokenizer", "does not exist")),
    Case("holdout-larger-than-source", setting(data__holdout__tokens="1M"),
         ("holdout", "data.holdout.tokens (now 1,000,000)")),
    Case("impossible-budget-under-max-epochs", setting(train__steps=5000, data__max_epochs=1),
         ("max_epochs", "epochs")),
    Case("holdout-zero", setting(data__holdout__tokens=0),
         ("data.holdout.tokens", "must be positive", "100k")),
    Case("source-path-empty-list", setting(data__sources__0__path=[]),
         ("data.sources[0].path", "empty list")),
    Case("bad-size-suffix", setting(data__holdout__tokens="10X"),
         ("data.holdout.tokens", "'10X'", "100k, 50M, 2B")),
    Case("bad-size-negative", setting(train__steps=None, train__tokens="-5k"),
         ("train.tokens", "'-5k'", "100k")),
    Case("unknown-schedule", setting(train__schedule={"name": "cosin"}),
         ("train.schedule.name", "'cosin'", "did you mean 'cosine'")),
    Case("unknown-packing", setting(data__packing="concatenate"),
         ("data.packing", "did you mean 'concat'")),
    Case("unknown-precision", setting(train__precision="bf32"), ("train.precision", "'bf16'")),
    Case("both-steps-and-tokens", setting(train__tokens="10k"),
         ("train.tokens", "train.steps", "exactly one")),
    Case("neither-steps-nor-tokens", _without("train.steps"),
         ("train.tokens", "train.steps", "exactly one")),
    Case("model-path-missing", _model_path("./no-such-model"),
         ("model.path", "'./no-such-model' does not exist", "looked for /")),
    Case("model-hub-id-offline", _model_path("HuggingFaceTB/SmolLM2-360M"),
         ("'HuggingFaceTB/SmolLM2-360M'", "HF_HUB_OFFLINE is set: only local or cached")),
    Case("model-path-missing-nested", _model_path("models/old/final"),
         ("model.path", "models/old/final", "does not exist")),
    Case("model-path-not-causal-lm", _not_causal,
         ("model.path", "BertForSequenceClassification", "not a causal")),
    Case("model-path-without-config", _no_config, ("model.path", "no config.json")),
    Case("model-path-is-a-run-directory", _run_directory_as_model,
         ("model.path", "no config.json", "did you mean old-runs/base/final?")),
    Case("model-path-is-a-file", _file_as_model,
         ("model.path", "model.safetensors is a file", "give the folder")),
    Case("model-path-and-init", setting(model__path="somewhere"),
         ("model.path", "model.init", "exactly one")),
    Case("model-type-unknown", _unknown_model_type("llamma"),
         ("model.init.config.model_type", "'llamma'", "did you mean 'llama'")),
    Case("model-type-not-causal", _unknown_model_type("t5"),
         ("model.init.config.model_type", "'t5'", "causal")),
    Case("model-init-config-bad-field", setting(model__init__config__hidden_size="wide"),
         ("model.init.config", "hidden_size", "'wide'")),
    Case("accelerate-config-missing", setting(launch={"accelerate_config": "fsdp.yaml"}),
         ("launch.accelerate_config", "'fsdp.yaml' is not a file", "relative to the recipe")),
    Case("launch-no-processes", setting(launch={"num_processes": 0}),
         ("launch.num_processes", "at least 1")),
    Case("attention-backend-unknown", setting(model__attn_implementation="flash_attention_9"),
         ("model.attn_implementation", "'flash_attention_9'", "sdpa")),
    Case("cache-dir-is-a-file", _cache_dir_is_a_file,
         ("data.cache_dir", "cache.bin", "it is a file")),
    Case("vocab-too-small", setting(model__train_tokenizer__vocab_size=100),
         ("model.train_tokenizer.vocab_size", "260")),
    Case("invalid-yaml", _invalid_yaml, ("broken.yaml", "not valid YAML")),
    Case("yaml-not-a-mapping", _yaml_list, ("list.yaml", "mapping")),
    Case("yaml-python-tag", _python_tag, ("evil.yaml", "python/object")),
    Case("recipe-file-missing", _missing_recipe, ("no-such-recipe.yaml", "not found")),
    Case("override-without-equals", _args("data.seq_len"),
         ("'data.seq_len'", "KEY=VALUE")),
    Case("override-unknown-key", _args("train.optimizer.lrr=1e-4"),
         ("train.optimizer.lrr", "did you mean 'lr'")),
    Case("override-bad-value", _args("data.seq_len=long"), ("data.seq_len", "integer")),
    Case("override-list-index-out-of-range", _args("data.sources.5.weight=2"),
         ("'data.sources.5.weight=2'", "list items by index")),
    Case("interpolation-missing", setting(train__micro_batch_size="${train.micro}"),
         ("train.micro_batch_size", "interpolation", "train.micro")),
    Case("negative-lr", setting(train__optimizer={"lr": -3e-4}),
         ("train.optimizer.lr", "positive")),
    Case("betas-one-number", setting(train__optimizer={"betas": [0.9]}),
         ("train.optimizer.betas", "two numbers")),
    Case("betas-out-of-range", setting(train__optimizer={"betas": [0.9, 1.5]}),
         ("train.optimizer.betas", "[0, 1)")),
    Case("template-unknown-field", setting(data__sources__1__template="Q: {quest}"),
         ("'qa'", "qa.jsonl:1", "'quest'", "question", "on_error: skip")),
    Case("template-not-format-string", setting(data__sources__1__template="Q: {question"),
         ("data.sources[1].template", "format string")),
    Case("template-attribute-access",
         setting(data__sources__1__template="Q: {question.__class__}"),
         ("data.sources[1].template", "{question.__class__}", "plain field name")),
    Case("template-positional", setting(data__sources__1__template="Q: {}"),
         ("data.sources[1].template", "named placeholders")),
    Case("global-batch-tokens-below-one-sequence", _global_tokens,
         ("train.global_batch_tokens", "less than one sequence")),
    Case("micro-batch-does-not-divide", setting(train__global_batch_size=5),
         ("micro_batch_size", "multiple of 2")),
    Case("checkpoint-keep-zero", setting(train__checkpoint__keep=0),
         ("train.checkpoint.keep", "at least 1")),
    Case("on-error-unknown", setting(data__sources__0__on_error="ignore"),
         ("data.sources[0].on_error", "'skip'")),
    Case("run-name-not-a-folder-name", setting(name="my run/1"), ("name:", "letters, digits")),
    Case("hf-dataset-missing", _hf_missing,
         ("'web'", "no-such-dataset", "HF_HUB_OFFLINE")),
    Case("hf-streaming-unbounded",
         setting(data__sources__0={"name": "web", "hf": {"path": "x/y", "streaming": True}}),
         ("data.sources[0].hf.max_documents", "streaming")),
    Case("several-mistakes-at-once", _several,
         ("4 problems", "data.seq_lenn", "train.optimizer.lr", "data.sources[0].weight",
          "train.schedule.name")),
]

# --------------------------------------------------------------------------------------------
# Running a case.
# --------------------------------------------------------------------------------------------

COMMANDS = {"train": ["train"], "inspect": ["mix", "inspect"]}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def run_bad(cli: Callable[..., Any], tmp: Path, recipe: dict[str, Any],
            write_recipe: Callable[..., Path], mutate: Mutate, command: str) -> str:
    """Apply the mistake, run the command, check the common contract, return the message."""
    setup = mutate(recipe, tmp) or Setup()
    recipe_file = setup.recipe_file or write_recipe(recipe)
    before = _snapshot(tmp)
    result = cli(*COMMANDS[command], recipe_file, *setup.args)
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}, output:\n{out}\n{result.exception!r}"
    assert "Traceback" not in out, out
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)
    # Progress lines may come first (a data error shows while tokenizing); one error follows.
    assert [line[:7] for line in out.splitlines()].count("error: ") == 1, out
    assert not (tmp / "runs").exists(), "a run directory was written"
    assert _snapshot(tmp) == before, "files under the recipe's folder changed"
    return out


@pytest.mark.parametrize("command", ["train", "inspect"])
@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c.id for c in RECIPE_CASES])
def test_bad_recipe(case: Case, command: str, cli: Any, tmp_path: Path, tiny_recipe: dict,
                    write_recipe: Any) -> None:
    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, case.mutate, command)
    for phrase in case.expect:
        assert phrase in out, f"{phrase!r} not in:\n{out}"
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------
# Bad data: each a clear error naming the file and line, or, with `on_error: skip`, skipped and
# counted in `cpt mix inspect --json` (sources[i].skipped).
# --------------------------------------------------------------------------------------------

BAD_LINE = 31  # the bad record sits after 30 good ones, so the message must count lines
# 20 MB rather than the issue's 100 MB: the same code path (max_chars, default 10M characters)
# in a fraction of the time and memory.
HUGE_CHARS = 20_000_000


@dataclass(frozen=True)
class DataCase:
    id: str
    bad: bytes | None                  # the bad JSONL line, or None for a plain-text glob case
    expect: tuple[str, ...]
    reason: str | None                 # the skip count's key; None: a file-level error


def _good_lines(quickstart_corpus: dict[str, Path], n: int = 60) -> list[bytes]:
    return quickstart_corpus["prose"].read_bytes().splitlines()[:n]


DATA_CASES = [
    DataCase("invalid-json", b'{"text": "an unterminated string}',
             (f"bad.jsonl:{BAD_LINE}", "invalid JSON", "on_error: skip"), "invalid JSON"),
    DataCase("not-utf8", '{"text": "café"}'.encode("latin-1"),
             (f"bad.jsonl:{BAD_LINE}", "not valid UTF-8", "on_error: skip"), "not valid UTF-8"),
    DataCase("missing-text-field", b'{"body": "the text is under another name"}',
             (f"bad.jsonl:{BAD_LINE}", "'text' is missing", "body", "text_field"), "is missing"),
    DataCase("text-not-a-string", b'{"text": 42}',
             (f"bad.jsonl:{BAD_LINE}", "'text'", "not text"), "not text"),
    DataCase("text-null", b'{"text": null}',
             (f"bad.jsonl:{BAD_LINE}", "'text' is null", "on_error: skip"), "not text"),
    DataCase("record-not-an-object", b'["a", "list"]',
             (f"bad.jsonl:{BAD_LINE}", "expected a JSON object"), "expected a JSON object"),
    DataCase("huge-line", json.dumps({"text": "x" * HUGE_CHARS}).encode(),
             (f"bad.jsonl:{BAD_LINE}", "20,000,000 characters", "max_chars", "on_error: skip"),
             "above max_chars"),
]


def _data_recipe(recipe: dict[str, Any], tokenizer: Path) -> None:
    """A fixed tokenizer (trained once per session): the sources change from case to case."""
    recipe["model"].pop("train_tokenizer")
    recipe["model"]["tokenizer"] = str(tokenizer)


@pytest.mark.parametrize("command", ["train", "inspect"])
@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_data_is_an_error(case: DataCase, command: str, cli: Any, tmp_path: Path,
                              tiny_recipe: dict, write_recipe: Any, tiny_tokenizer: Path,
                              quickstart_corpus: dict[str, Path]) -> None:
    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        _data_recipe(recipe, tiny_tokenizer)
        lines = _good_lines(quickstart_corpus)
        assert case.bad is not None
        lines.insert(BAD_LINE - 1, case.bad)
        (tmp / "data" / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        recipe["data"]["sources"][0]["path"] = "data/bad.jsonl"

    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, mutate, command)
    for phrase in (*case.expect, "source 'prose'"):
        assert phrase in out, f"{phrase!r} not in:\n{out}"


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_data_is_skipped_and_counted(case: DataCase, cli: Any, tmp_path: Path,
                                         tiny_recipe: dict, write_recipe: Any,
                                         tiny_tokenizer: Path,
                                         quickstart_corpus: dict[str, Path]) -> None:
    _data_recipe(tiny_recipe, tiny_tokenizer)
    lines = _good_lines(quickstart_corpus)
    assert case.bad is not None
    lines.insert(BAD_LINE - 1, case.bad)
    (tmp_path / "data" / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    tiny_recipe["data"]["sources"][0].update(path="data/bad.jsonl", on_error="skip")
    result = cli("mix", "inspect", write_recipe(tiny_recipe), "--json")
    assert result.exit_code == 0, result.output
    prose = json.loads(result.stdout)["sources"][0]
    assert prose["name"] == "prose"
    assert prose["skipped"] == {case.reason: 1}
    assert prose["documents"] + prose["heldout_documents"] == len(lines) - 1


def _text_folder(tmp: Path, quickstart_corpus: dict[str, Path], odd_name: str,
                 odd: bytes) -> None:
    """docs/ with 30 plain-text documents and one odd file among them."""
    docs = tmp / "docs"
    docs.mkdir()
    for i, line in enumerate(_good_lines(quickstart_corpus, 30)):
        (docs / f"doc{i:02d}.txt").write_text(json.loads(line)["text"])
    (docs / odd_name).write_bytes(odd)


# A PNG header and a few NUL bytes: what `docs/*.txt` picks up when an image is misnamed.
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256)) * 4
PLAIN_CASES = [
    ("binary-file-in-text-glob", "image.txt", BINARY, ("image.txt", "binary file"),
     "binary file"),
    ("latin1-file-in-text-glob", "latin1.txt", "déjà vu, naïve café".encode("latin-1"),
     ("latin1.txt", "not valid UTF-8"), "not valid UTF-8"),
]


@pytest.mark.parametrize("command", ["train", "inspect"])
@pytest.mark.parametrize("case", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_bad_plain_file(case: tuple, command: str, cli: Any, tmp_path: Path, tiny_recipe: dict,
                        write_recipe: Any, tiny_tokenizer: Path,
                        quickstart_corpus: dict[str, Path]) -> None:
    _, name, odd, expect, _ = case

    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        _data_recipe(recipe, tiny_tokenizer)
        _text_folder(tmp, quickstart_corpus, name, odd)
        recipe["data"]["sources"][0]["path"] = "docs/*.txt"

    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, mutate, command)
    for phrase in (*expect, "source 'prose'", "on_error: skip"):
        assert phrase in out, f"{phrase!r} not in:\n{out}"


@pytest.mark.parametrize("case", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_bad_plain_file_is_skipped_and_counted(case: tuple, cli: Any, tmp_path: Path,
                                               tiny_recipe: dict, write_recipe: Any,
                                               tiny_tokenizer: Path,
                                               quickstart_corpus: dict[str, Path]) -> None:
    _, name, odd, _, reason = case
    _data_recipe(tiny_recipe, tiny_tokenizer)
    _text_folder(tmp_path, quickstart_corpus, name, odd)
    tiny_recipe["data"]["sources"][0].update(path="docs/*.txt", on_error="skip")
    result = cli("mix", "inspect", write_recipe(tiny_recipe), "--json")
    assert result.exit_code == 0, result.output
    prose = json.loads(result.stdout)["sources"][0]
    assert prose["skipped"] == {reason: 1}
    assert prose["documents"] + prose["heldout_documents"] == 30


def test_empty_documents_are_counted_not_silent(cli: Any, tmp_path: Path, tiny_recipe: dict,
                                                write_recipe: Any, tiny_tokenizer: Path,
                                                quickstart_corpus: dict[str, Path]) -> None:
    """Empty and whitespace-only documents are dropped (nothing to train on) even with the
    default on_error: raise, and the report counts them. (A null is a bad record: DATA_CASES.)"""
    _data_recipe(tiny_recipe, tiny_tokenizer)
    lines = _good_lines(quickstart_corpus) + [b'{"text": ""}', b'{"text": " \\n\\t "}']
    (tmp_path / "data" / "gaps.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    tiny_recipe["data"]["sources"][0]["path"] = "data/gaps.jsonl"
    result = cli("mix", "inspect", write_recipe(tiny_recipe), "--json")
    assert result.exit_code == 0, result.output
    prose = json.loads(result.stdout)["sources"][0]
    assert prose["skipped"] == {"empty": 2}
    assert prose["documents"] + prose["heldout_documents"] == 60


def _truncated_gzip() -> bytes:
    import gzip

    whole = gzip.compress(b'{"text": "a document"}\n' * 2000)
    return whole[:len(whole) // 2]


FILE_CASES = [
    ("broken.parquet", b"PAR1 but not really a parquet file", ("broken.parquet", "Parquet")),
    ("broken.json", b'{"records": [1, 2], "more": [3]}', ("broken.json", "list of records")),
    ("broken.jsonl.gz", b"plain bytes, not gzip", ("broken.jsonl.gz", "could not be read",
                                                   "BadGzipFile")),
    ("cut.jsonl.gz", _truncated_gzip(), ("cut.jsonl.gz", "could not be read")),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_file_level_errors_are_not_skipped(case: tuple, cli: Any, tmp_path: Path,
                                           tiny_recipe: dict, write_recipe: Any,
                                           tiny_tokenizer: Path) -> None:
    """A whole file that cannot be read (a broken .parquet, .json or .gz) stops the run even
    with on_error: skip: skipping it would silently drop a whole file of the corpus."""
    name, content, expect = case

    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        _data_recipe(recipe, tiny_tokenizer)
        (tmp / "data" / name).write_bytes(content)
        recipe["data"]["sources"][0].update(path=f"data/{name}", on_error="skip")

    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, mutate, "inspect")
    for phrase in expect:
        assert phrase in out, f"{phrase!r} not in:\n{out}"


def test_a_byte_order_mark_is_not_an_error(cli: Any, tmp_path: Path, tiny_recipe: dict,
                                           write_recipe: Any, tiny_tokenizer: Path,
                                           quickstart_corpus: dict[str, Path]) -> None:
    """JSON Lines saved with a UTF-8 byte-order mark (Windows editors) read as usual."""
    _data_recipe(tiny_recipe, tiny_tokenizer)
    lines = _good_lines(quickstart_corpus)
    (tmp_path / "data" / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    tiny_recipe["data"]["sources"][0]["path"] = "data/bom.jsonl"
    result = cli("mix", "inspect", write_recipe(tiny_recipe), "--json")
    assert result.exit_code == 0, result.output
    prose = json.loads(result.stdout)["sources"][0]
    assert prose["skipped"] == {}
    assert prose["documents"] + prose["heldout_documents"] == len(lines)


# --------------------------------------------------------------------------------------------
# Command-line mistakes: run directories, --resume, cpt eval.
# --------------------------------------------------------------------------------------------


def test_existing_run_directory_is_never_overwritten(cli: Any, tmp_path: Path,
                                                     tiny_recipe: dict,
                                                     write_recipe: Any) -> None:
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("a week of GPU time")
    recipe = write_recipe(tiny_recipe)
    before = _snapshot(tmp_path)
    result = cli("train", recipe)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for phrase in ("already exists", "--resume auto", "--overwrite", "--output-dir"):
        assert phrase in result.output, result.output
    assert _snapshot(tmp_path) == before


def _output_dir_is_a_file(recipe: dict[str, Any], tmp: Path) -> None:
    (tmp / "results").write_text("not a folder")
    recipe["output_dir"] = "results"


TRAIN_CASES = [
    Case("resume-from-a-folder", _args("--resume", "data"),
         ("--resume data", "not a complete cpt checkpoint", "'auto'")),
    Case("resume-from-nowhere", _args("--resume", "nowhere"),
         ("--resume nowhere", "not a complete cpt checkpoint")),
    Case("resume-from-a-file", _args("--resume", "data/qa.jsonl"),
         ("--resume data/qa.jsonl", "not a complete cpt checkpoint")),
    Case("output-dir-is-a-file", _output_dir_is_a_file,
         ("results is a file", "--output-dir")),
    Case("output-dir-option-is-a-file", _args("--output-dir", "data/qa.jsonl"),
         ("data/qa.jsonl is a file", "--output-dir")),
    Case("overwrite-a-folder-that-is-no-run", _args("--output-dir", "data", "--overwrite"),
         ("data is not a cpt run directory", "--overwrite will not delete it")),
    Case("freeze-everything", setting(train__freeze=[".*"]),
         ("train.freeze", "freezes every parameter")),
    Case("flex-attention-on-cpu", setting(model__attn_implementation="flex_attention"),
         ("model.attn_implementation", "flex_attention", "sdpa")),
    Case("model-size-negative", setting(model__init__config__intermediate_size=-4),
         ("model.init.config", "cannot be built")),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c.id for c in TRAIN_CASES])
def test_bad_train_options(case: Case, cli: Any, tmp_path: Path, tiny_recipe: dict,
                           write_recipe: Any) -> None:
    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, case.mutate, "train")
    for phrase in case.expect:
        assert phrase in out, f"{phrase!r} not in:\n{out}"


def test_compile_on_cpu_without_a_compiler(cli: Any, tmp_path: Path, tiny_recipe: dict,
                                           write_recipe: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile would fail at the first step with an inductor traceback; cpt says why first."""
    (tmp_path / "no-compilers").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers"))
    monkeypatch.delenv("CXX", raising=False)

    def compile_on(recipe: dict[str, Any], tmp: Path) -> None:
        _set(recipe, "train.compile", True)

    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, compile_on, "train")
    for phrase in ("train.compile", "C++ compiler", "train.compile: false"):
        assert phrase in out, out


@pytest.mark.parametrize("args, expect", [
    (["nowhere/final"], ("nowhere/final", "does not exist")),
    (["data"], ("data", "neither a model folder")),
    (["data", "--data", "code"], ("--data 'code'", "NAME=FILE")),
    (["data", "--data", "=data/qa.jsonl"], ("NAME=FILE",)),
    (["data", "--data", "a=data/qa.jsonl", "--data", "a=data/prose.jsonl"],
     ("--data a: named twice",)),
    (["data", "--max-forgetting", "nan"], ("--max-forgetting nan", "finite")),
    (["data", "--max-forgetting", "-1"], ("--max-forgetting -1.0", "0 or more")),
    (["data", "--batch-tokens", "0"], ("--batch-tokens 0", "positive")),
    (["data", "--bootstrap", "-5"], ("--bootstrap -5",)),
    (["data", "--plot", "data"], ("--plot data: is a folder",)),
    (["data", "--plot", "nowhere/curves.png"], ("the folder nowhere does not exist",)),
    # /sys refuses new files even to root, for whom permission bits would not.
    (["data", "--plot", "/sys/curves.png"], ("--plot /sys/curves.png: cannot write there",)),
], ids=["path-missing", "not-a-model", "data-without-equals", "data-without-name",
        "data-name-twice", "budget-nan", "budget-negative", "batch-tokens-zero",
        "bootstrap-negative", "plot-is-a-folder", "plot-folder-missing", "plot-unwritable"])
def test_bad_eval(args: list[str], expect: tuple[str, ...], cli: Any, tmp_path: Path,
                  tiny_recipe: dict) -> None:
    before = _snapshot(tmp_path)
    result = cli("eval", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for phrase in expect:
        assert phrase in result.output, result.output
    assert _snapshot(tmp_path) == before


def test_mistakes_through_a_real_process(tmp_path: Path, tiny_recipe: dict,
                                         write_recipe: Any) -> None:
    """`python -m cpt_cli train`, as a user runs it: the message on stderr, nothing on stdout,
    status 2, no traceback (one process, about 5 s: the in-process matrix covers the rest)."""
    import subprocess
    import sys

    tiny_recipe["data"]["seq_lenn"] = 64
    tiny_recipe["train"]["optimizer"] = {"lr": 0}
    recipe = write_recipe(tiny_recipe)
    proc = subprocess.run([sys.executable, "-m", "cpt_cli", "train", str(recipe)],
                          cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="default"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "has 2 problems" in proc.stderr, proc.stderr
    assert "did you mean 'seq_len'" in proc.stderr and "train.optimizer.lr" in proc.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# Security: no code from a model folder or a checkpoint runs unless the recipe says so.
# --------------------------------------------------------------------------------------------


def test_remote_code_does_not_run_by_default(cli: Any, tmp_path: Path, tiny_recipe: dict,
                                             write_recipe: Any, tiny_tokenizer: Path) -> None:
    """A model folder whose config maps AutoModelForCausalLM to its own Python file: without
    `model.trust_remote_code: true` the file is never imported and cpt says what to set."""
    marker = tmp_path / "remote-code-ran"

    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        folder = tmp / "custom"
        shutil.copytree(tiny_tokenizer, folder)
        (folder / "config.json").write_text(json.dumps({
            "model_type": "evil", "architectures": ["EvilForCausalLM"],
            "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
        (folder / "modeling_evil.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
        recipe["model"] = {"path": "custom"}

    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, mutate, "train")
    assert "model.path" in out and "trust_remote_code" in out, out
    assert not marker.exists()


class _Payload:
    """Unpickling this calls open(path, "w"): what a booby-trapped optimizer.pt would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_resume_refuses_a_pickled_object_in_the_checkpoint(cli: Any, tmp_path: Path,
                                                           tiny_recipe: dict,
                                                           write_recipe: Any,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Resume state is read with torch.load(weights_only=True): an optimizer.pt carrying an
    arbitrary object is refused with a message, and the object is never built. The run it
    resumes also shows that an access token in the environment is neither printed nor written
    into the run directory."""
    import torch

    secret = "hf_cptTestSecretTokenDoNotLeak0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    tiny_recipe["train"]["checkpoint"] = {"every_steps": 1, "keep": 2}
    recipe = write_recipe(tiny_recipe)
    first = cli("train", recipe)
    assert first.exit_code == 0, first.output
    assert secret not in first.output
    run_files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert len(run_files) > 10
    assert not [p for p in run_files if secret.encode() in p.read_bytes()]
    step1 = tmp_path / "runs" / "tiny" / "checkpoints" / "step-000001"
    state = torch.load(step1 / "optimizer.pt", weights_only=True)
    marker = tmp_path / "payload-ran"
    state["payload"] = _Payload(marker)
    torch.save(state, step1 / "optimizer.pt")
    result = cli("train", recipe, "--resume", step1)
    assert result.exit_code == 2, f"{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    for phrase in ("optimizer.pt", "step-000001", "pickled", "weights_only=True"):
        assert phrase in result.output, result.output
    assert not marker.exists()


def test_trust_remote_code_warns(tiny_recipe: dict, tiny_tokenizer: Path,
                                 write_recipe: Any) -> None:
    """A recipe that turns trust_remote_code on is told, every time, what that allows."""
    from transformers import AutoTokenizer

    from cpt_cli.config import load_recipe
    from cpt_cli.model import load_model

    tiny_recipe["model"]["trust_remote_code"] = True
    recipe = load_recipe(write_recipe(tiny_recipe))
    with pytest.warns(UserWarning, match="trust_remote_code is true: code shipped with the "
                                         "model will run"):
        load_model(recipe, AutoTokenizer.from_pretrained(str(tiny_tokenizer)))


def test_quickstart_corpus_into_a_file_is_refused(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    for target in ("afile", "afile/sub"):
        result = cli("data", "quickstart", target)
        assert result.exit_code == 2, result.output
        assert f"cannot write the corpus to {target}" in result.output, result.output
        assert "Traceback" not in result.output
    assert (tmp_path / "afile").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# Bad task records (issue #14): prompt/completion and chat sources, each an error naming the
# file and the record, nothing written.
# --------------------------------------------------------------------------------------------

CHAT = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
FAILING_CHAT = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system turns') }}"
                "{% endif %}" + CHAT)
TASK_CASES = [
    # (id, format, chat_template, bad record, phrases the message must hold)
    ("missing-completion", "prompt_completion", None, {"prompt": "Q?"},
     ("'completion' is missing", "completion_field")),
    ("missing-prompt", "prompt_completion", None, {"completion": "A."},
     ("'prompt' is missing", "prompt_field")),
    ("empty-completion", "prompt_completion", None, {"prompt": "Q?", "completion": "  "},
     ("empty completion",)),
    ("message-without-role", "chat", CHAT, {"messages": [{"content": "hi"}]},
     ("message 0 has no role",)),
    ("message-without-content", "chat", CHAT,
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     ("message 1 has no content",)),
    ("unknown-role", "chat", CHAT, {"messages": [{"role": "human", "content": "hi"}]},
     ("unknown role 'human'", "system, user, assistant, tool")),
    ("template-fails", "chat", FAILING_CHAT,
     {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "ok"}]},
     ("chat template failed to render", "no system turns")),
]


def _good_task_record(format_: str, i: int) -> dict[str, Any]:
    if format_ == "prompt_completion":
        return {"prompt": f"Question {i}: what follows {i}?", "completion": f" {i + 1}."}
    return {"messages": [{"role": "user", "content": f"What follows {i}?"},
                         {"role": "assistant", "content": f"{i + 1}."}]}


@pytest.mark.parametrize("command", ["train", "inspect"])
@pytest.mark.parametrize("case", TASK_CASES, ids=[c[0] for c in TASK_CASES])
def test_bad_task_records(case: tuple, command: str, cli: Any, tmp_path: Path,
                          tiny_recipe: dict, write_recipe: Any, tiny_tokenizer: Path) -> None:
    _, format_, template, bad, expect = case

    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        _data_recipe(recipe, tiny_tokenizer)
        records = [_good_task_record(format_, i) for i in range(60)]
        records.insert(BAD_LINE - 1, bad)
        (tmp / "data" / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        source = {"name": "task", "path": "data/task.jsonl", "format": format_,
                  "loss_on": "completion" if format_ == "prompt_completion" else "assistant"}
        if template is not None:
            source["chat_template"] = template
        recipe["data"]["sources"][1] = source

    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, mutate, command)
    for phrase in (*expect, f"task.jsonl:{BAD_LINE}", "source 'task'"):
        assert phrase in " ".join(out.split()), f"{phrase!r} not in:\n{out}"


def test_loss_on_assistant_on_a_prompt_completion_source(cli: Any, tmp_path: Path,
                                                         tiny_recipe: dict,
                                                         write_recipe: Any) -> None:
    def mutate(recipe: dict[str, Any], tmp: Path) -> None:
        recipe["data"]["sources"][1].update(format="prompt_completion", loss_on="assistant",
                                            completion_field="answer")

    out = run_bad(cli, tmp_path, tiny_recipe, write_recipe, mutate, "train")
    assert "data.sources[1].loss_on: 'assistant'" in out and "loss_on: completion" in out
