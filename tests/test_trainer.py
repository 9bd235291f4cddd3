"""`train()` end to end on a tiny model: the run directory, metrics, checkpoints, final/, parameter
groups, freezing, and the refusal to overwrite a run.

`tiny_recipe` and `write_sources` are imported by the other trainer test modules (resume, kill,
lineage, distributed), so every trainer test trains the same kind of model on the same kind of
text: a 2-layer Llama with hidden size 32 and a 320-token BPE trained in the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cpt_cli.config import load_recipe, recipe_from_config  # noqa: E402
from cpt_cli.errors import UsageError  # noqa: E402
from cpt_cli.training.loop import train  # noqa: E402
from cpt_cli.training.optim import param_groups  # noqa: E402
from cpt_cli.training.schedule import lr_multiplier  # noqa: E402

TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128}
WORDS = ["river", "stone", "market", "lantern", "valley", "quiet", "morning", "harbour", "window",
         "bread", "salt", "copper", "garden", "letter", "winter", "bridge", "candle", "orchard",
         "music", "silver", "thread", "meadow", "engine", "clock", "kettle", "ladder", "island",
         "mirror", "pocket", "rabbit", "saddle", "tunnel", "velvet", "wagon", "yellow"]


def _prose(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 50))).capitalize() + "."
            for _ in range(n)]


def _code(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"def f{i}(x, y):\n    z = x * {rng.randint(1, 99)} + y\n    if z > {i * 3}:\n"
            f"        return z - {rng.randint(1, 9)}\n    return [i for i in range(z)]\n"
            for i in range(n)]


def write_sources(folder: Path) -> dict[str, str]:
    """Three small domains as JSONL files: prose, code and notes (prose with another seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"prose": _prose(150, 1), "code": _code(150, 2), "notes": _prose(150, 3)}
    paths = {}
    for name, docs in texts.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        paths[name] = str(path)
    return paths


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def tiny_config(tmp: Path, name: str, sources: list[dict[str, Any]],
                **sections: Any) -> dict[str, Any]:
    """A recipe mapping for a tiny from-scratch run; `sections` are merged in (nested dicts)."""
    base = {"name": name, "seed": 11,
            "model": {"init": {"config": TINY_MODEL}, "train_tokenizer": {"vocab_size": 320}},
            "data": {"seq_len": 64, "sources": sources, "holdout": {"tokens": 500},
                     "cache_dir": str(tmp / "cache")},
            "train": {"steps": 6, "global_batch_size": 4, "micro_batch_size": 2,
                      "optimizer": {"lr": 3e-3}, "schedule": {"name": "cosine", "warmup": 2},
                      "checkpoint": {"every_steps": 2, "keep": 1}, "log_every_steps": 1},
            "eval": {"every_steps": 3, "bootstrap_samples": 0}}
    return merge(base, sections)


def tiny_recipe(tmp: Path, name: str, sources: list[dict[str, Any]], **sections: Any) -> Any:
    return recipe_from_config(tiny_config(tmp, name, sources, **sections), base_dir=tmp)


def recipe_file(tmp: Path, name: str, sources: list[dict[str, Any]], **sections: Any) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp, name, sources, **sections)))
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("trainer")
    paths = write_sources(tmp / "data")
    sources = [{"name": "prose", "path": paths["prose"]},
               {"name": "code", "path": paths["code"], "weight": 0.5}]
    recipe = tiny_recipe(tmp, "tiny", sources)
    events: list[dict[str, Any]] = []
    result = train(recipe, output_dir=str(tmp / "runs" / "tiny"), on_event=events.append)
    return {"tmp": tmp, "recipe": recipe, "result": result, "events": events,
            "sources": sources}


def test_run_directory_layout(run: dict[str, Any]) -> None:
    run_dir = run["result"].run_dir
    assert run["result"].steps == 6 and run["result"].final_dir == run_dir / "final"
    # The recipe as trained, loadable again.
    again = load_recipe(run_dir / "recipe.yaml")
    assert again.train.steps == 6 and [s.name for s in again.data.sources] == ["prose", "code"]
    # keep: 1 rotates step 2 away; step 6 is the end of the run, written as final/ instead.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000004"]
    ckpt = run_dir / "checkpoints" / "step-000004"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt",
                 "scheduler.pt", "rng-0.pt", "trainer_state.json", "manifest.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"]["sequences_consumed"] == 16
    assert not [p for p in run_dir.rglob(".tmp*")]


def test_metrics_train_and_eval_events(run: dict[str, Any]) -> None:
    events = read_metrics(run["result"].run_dir)
    assert events == run["events"]  # on_event sees exactly what metrics.jsonl records
    train_events = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train_events] == [1, 2, 3, 4, 5, 6]
    schedule = run["recipe"].train.schedule
    for e in train_events:
        assert set(e) >= {"step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm"}
        assert e["tokens"] == e["step"] * 4 * 64
        # Unmasked concat: every position but each row's first is trained.
        assert set(e["trained_tokens"]) == {"prose", "code"}
        assert sum(e["trained_tokens"].values()) == 4 * 63
        # The lr logged with step s is the one its update used.
        assert e["lr"] == pytest.approx(3e-3 * lr_multiplier(schedule, e["step"] - 1, 6))
        assert e["tokens_per_s"] > 0 and 0 < e["loss"] < 20
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    for e in evals:
        assert set(e["domains"]) == {"prose", "code"}
        for d in e["domains"].values():
            assert d["loss"] > 0 and d["bpb"] > 0 and d["role"] == "target"
    # bpb after 6 steps at lr 3e-3 is lower than at the start on both domains.
    for name in ("prose", "code"):
        assert evals[-1]["domains"][name]["bpb"] < evals[0]["domains"][name]["bpb"]
        assert evals[-1]["domains"][name]["delta_bpb"] == pytest.approx(
            evals[-1]["domains"][name]["bpb"] - evals[0]["domains"][name]["bpb"])


def test_manifest_counts_agree_with_the_plan(run: dict[str, Any]) -> None:
    from cpt_cli.inspection import inspect_mix

    manifest = json.loads((run["result"].run_dir / "manifest.json").read_text())
    assert manifest == json.loads((run["result"].final_dir / "manifest.json").read_text())
    (stage,) = manifest["stages"]
    assert stage["steps"] == 6 and stage["tokens"] == 6 * 4 * 64
    plan = inspect_mix(run["recipe"])
    assert plan["total_tokens"] == stage["tokens"]
    planned = {s["name"]: s["tokens_planned"] for s in plan["sources"]}
    trained = {s["name"]: s["tokens_trained"] for s in stage["sources"]}
    assert trained == planned and sum(trained.values()) == stage["tokens"]
    # weights 1 : 0.5 over 24 sequences
    assert trained == {"prose": 16 * 64, "code": 8 * 64}


def test_final_loads_with_transformers(run: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run["result"].final_dir
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("The river runs past the market.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    assert (final / "optimizer.pt").is_file() and (final / "manifest.json").is_file()
    assert sorted(p.name for p in (final / "heldout").iterdir()) == ["code.jsonl", "prose.jsonl"]
    # final/ holds the trained weights, not the step-4 checkpoint's.
    ckpt = weights(run["result"].run_dir / "checkpoints" / "step-000004")
    assert any(not torch.equal(t, ckpt[k]) for k, t in weights(final).items())


def test_existing_run_directory_is_never_overwritten(run: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="already exists.*--resume auto.*--overwrite"):
        train(run["recipe"], output_dir=str(run["result"].run_dir))
    with pytest.raises(UsageError, match="finished run"):
        train(run["recipe"], output_dir=str(run["result"].run_dir), resume="auto")


def test_overwrite_replaces_a_run_and_nothing_else(run: dict[str, Any]) -> None:
    recipe = tiny_recipe(run["tmp"], "again", run["sources"], train={"steps": 2},
                         eval={"every_steps": None})
    # A folder cpt did not train into (data, other runs, the current directory) is never deleted.
    folder = run["tmp"] / "mine"
    (folder / "runs" / "old").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(UsageError, match="not a cpt run directory.*--overwrite will not delete"):
        train(recipe, output_dir=str(folder), overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "runs"]
    # A run directory is replaced.
    run_dir = run["tmp"] / "runs" / "again"
    train(recipe, output_dir=str(run_dir))
    (run_dir / "stale.txt").write_text("from the earlier run")
    result = train(recipe, output_dir=str(run_dir), overwrite=True)
    assert not (run_dir / "stale.txt").exists() and result.steps == 2


def _model(config: dict[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"),
                                                                 **config))


def test_no_weight_decay_on_norms_biases_and_embeddings(tmp_path: Path) -> None:
    model = _model({**TINY_MODEL, "vocab_size": 100, "attention_bias": True,
                    "tie_word_embeddings": False})
    recipe = tiny_recipe(tmp_path, "groups", [{"name": "x", "path": "x.jsonl"}],
                         train={"optimizer": {"weight_decay": 0.1, "embedding_lr_scale": 0.5}})
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, recipe)
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay and no_decay and not decay & no_decay
    assert decay | no_decay == set(names.values())
    for name in no_decay:
        assert "norm" in name or name.endswith(".bias") or "embed_tokens" in name, name
    for name in decay:
        assert name.endswith(".weight") and "norm" not in name and "embed_tokens" not in name
    assert "lm_head.weight" in decay  # an untied output layer is a matrix like any other
    assert {"model.layers.0.self_attn.q_proj.bias", "model.norm.weight",
            "model.embed_tokens.weight"} <= no_decay
    scales = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scales["model.embed_tokens.weight"] == 0.5
    assert {s for n, s in scales.items() if n != "model.embed_tokens.weight"} == {1.0}


def test_freeze_patterns_leave_parameters_out(tmp_path: Path) -> None:
    model = _model({**TINY_MODEL, "vocab_size": 100})
    recipe = tiny_recipe(tmp_path, "freeze", [{"name": "x", "path": "x.jsonl"}],
                         train={"freeze": ["embed_tokens", r"layers\.0\."]})
    trained = {id(p) for g in param_groups(model, recipe) for p in g["params"]}
    for name, param in model.named_parameters():
        frozen = "embed_tokens" in name or ".layers.0." in name
        assert (id(param) not in trained) == frozen, name
        assert param.requires_grad != frozen, name


# ---------------------------------------------------------------------------------------------
# Numerical faults and failed writes
# ---------------------------------------------------------------------------------------------


def _poison_step(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int], micro: int = 2) -> None:
    """Make the training loss NaN at the given (1-based) steps, through the model's forward."""
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.forward
    calls = {"n": 0}

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if kwargs.get("labels") is not None:  # a training micro batch, not an evaluation
            calls["n"] += 1
            if (calls["n"] - 1) // micro + 1 in bad_steps:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
        run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from cpt_cli.errors import TrainingStopped
    from cpt_cli.runs.layout import complete_checkpoints

    run_dir = run["tmp"] / "runs" / "nan"
    recipe = tiny_recipe(run["tmp"], "nan", run["sources"],
                         train={"checkpoint": {"every_steps": 2, "keep": 3}})
    _poison_step(monkeypatch, {5})
    with pytest.raises(TrainingStopped, match=r"loss is nan .* at step 5.*last good checkpoint is "
                                              r".*step-000004") as stop:
        train(recipe, output_dir=str(run_dir))
    assert stop.value.exit_code == 1
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-000002", "step-000004"]
    assert not (run_dir / "final").exists()
    for tensor in weights(run_dir / "checkpoints" / "step-000004").values():
        assert torch.isfinite(tensor).all()
    events = read_metrics(run_dir)
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert [(e["step"], e["loss"]) for e in events if e["event"] == "bad_step"] == [(5, "nan")]


def test_max_bad_steps_skips_bad_batches(run: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tiny_recipe(run["tmp"], "skip", run["sources"],
                         train={"max_bad_steps": 2, "checkpoint": {"every_steps": None}},
                         eval={"every_steps": None})
    _poison_step(monkeypatch, {2, 5})
    result = train(recipe, output_dir=str(run["tmp"] / "runs" / "skip"))
    assert result.steps == 6
    events = read_metrics(result.run_dir)
    assert [e["step"] for e in events if e["event"] == "bad_step"] == [2, 5]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 3, 4, 6]
    for tensor in weights(result.final_dir).values():
        assert torch.isfinite(tensor).all()
    # A skipped batch makes no update: Adam's step count is 4 of 6.
    state = torch.load(result.final_dir / "optimizer.pt", weights_only=True)["state"]
    assert {int(s["step"]) for s in state.values()} == {4}


def test_absurd_learning_rate_stops_with_a_clear_message(run: dict[str, Any]) -> None:
    from cpt_cli.errors import TrainingStopped

    recipe = tiny_recipe(run["tmp"], "lr", run["sources"],
                         train={"optimizer": {"lr": 1e30}, "grad_clip": None,
                                "schedule": {"name": "constant", "warmup": 0},
                                "checkpoint": {"every_steps": 1, "keep": 2}})
    with pytest.raises(TrainingStopped, match="Lower train.optimizer.lr") as stop:
        train(recipe, output_dir=str(run["tmp"] / "runs" / "lr"))
    assert re.search(r"loss is (nan|inf)", str(stop.value)), stop.value


def _failing_save(monkeypatch: pytest.MonkeyPatch, when: Callable[[Path], bool],
                  error: BaseException) -> None:
    original = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, Path)) and when(Path(f)):
            raise error
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


# What torch.save really raises on a full disk (checked on a 200 kB tmpfs).
DISK_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_failed_checkpoint_write_keeps_earlier_checkpoints(
        run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from cpt_cli.runs.layout import complete_checkpoints

    run_dir = run["tmp"] / "runs" / "full"
    recipe = tiny_recipe(run["tmp"], "full", run["sources"],
                         train={"checkpoint": {"every_steps": 2, "keep": 3}})
    _failing_save(monkeypatch, lambda p: p.parent.name == ".tmp-step-000004", DISK_FULL)
    with pytest.raises(UsageError, match=r"could not write checkpoint step-000004 .*"
                                         r"RuntimeError: \[enforce fail.*MB free.*Earlier "
                                         r"checkpoints are intact \(newest: .*step-000002\).*"
                                         r"--resume auto"):
        train(recipe, output_dir=str(run_dir))
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-000002"]
    assert not list(run_dir.rglob(".tmp-*"))
    monkeypatch.undo()
    # Space freed: the run resumes from step 2 and finishes.
    result = train(recipe, output_dir=str(run_dir), resume="auto")
    assert result.steps == 6 and (result.final_dir / "model.safetensors").is_file()


def test_failed_final_write_is_exit_2_without_traceback(
        run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from typer.testing import CliRunner

    from cpt_cli.cli import app

    run_dir = run["tmp"] / "runs" / "full-final"
    path = recipe_file(run["tmp"], "full-final", run["sources"],
                       train={"checkpoint": {"every_steps": 2, "keep": 3}})
    _failing_save(monkeypatch, lambda p: p.parent.name == ".tmp-final",
                  OSError(errno.ENOSPC, "No space left on device"))
    result = CliRunner().invoke(app, ["train", str(path), "--output-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "could not write the final model" in result.output
    assert "No space left on device" in result.output
    assert not (run_dir / "final").exists() and not (run_dir / ".tmp-final").exists()
    assert (run_dir / "checkpoints" / "step-000004" / "trainer_state.json").is_file()


def test_world_size_guard() -> None:
    from cpt_cli.training.backend import check_world

    check_world(1, {})
    check_world(2, {"WORLD_SIZE": "2"})
    with pytest.raises(UsageError, match="WORLD_SIZE=2.*accelerate sees one.*--num-processes"):
        check_world(1, {"WORLD_SIZE": "2"})


# ---------------------------------------------------------------------------------------------
# Options: activation checkpointing, compile, precision, MFU, trackers, plain output
# ---------------------------------------------------------------------------------------------


def test_activation_checkpointing_trains_the_same(run: dict[str, Any]) -> None:
    def losses(name: str, **train_section: Any) -> list[float]:
        recipe = tiny_recipe(run["tmp"], name, run["sources"],
                             train={"steps": 3, "checkpoint": {"every_steps": None},
                                    **train_section}, eval={"every_steps": None})
        result = train(recipe, output_dir=str(run["tmp"] / "runs" / name))
        return [e["loss"] for e in read_metrics(result.run_dir) if e["event"] == "train"]

    plain = losses("no-ac")
    recomputed = losses("ac", gradient_checkpointing=True)
    # Recomputation repeats the same forward: the same losses to float precision.
    assert recomputed == pytest.approx(plain, rel=1e-6)
    assert len(plain) == 3


def test_decoder_layers_are_found_for_per_layer_compile() -> None:
    from cpt_cli.model import decoder_layers

    layers = decoder_layers(_model({**TINY_MODEL, "vocab_size": 100}))
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 2


@pytest.mark.slow
def test_compiled_layers_train_without_falling_back(run: dict[str, Any]) -> None:
    """train.compile: every decoder layer shares one compiled graph for training, so the steps
    stay compiled instead of hitting dynamo's recompile limit (8) and silently running eager, as
    they did when scoring built a KV cache whose per-layer state became a guard; the held-out
    evaluations run eager (their shapes vary) and give the same figures as an eager run."""
    from torch._dynamo.utils import counters

    def losses(name: str, **train_section: Any) -> list[float]:
        recipe = tiny_recipe(run["tmp"], name, run["sources"],
                             train={"steps": 4, "checkpoint": {"every_steps": None},
                                    **train_section}, eval={"every_steps": 2})
        result = train(recipe, output_dir=str(run["tmp"] / "runs" / name))
        return [e["loss"] for e in read_metrics(result.run_dir) if e["event"] == "train"]

    torch.compiler.reset()
    counters.clear()
    compiled = losses("compiled", compile=True)
    frames = dict(counters["frames"])
    assert frames["total"] == frames["ok"], frames  # no frame gave up and ran eager
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch.compiler.reset()
    assert compiled == pytest.approx(losses("eager"), rel=1e-4)
    evals = {name: [e["domains"] for e in read_metrics(run["tmp"] / "runs" / name)
                    if e["event"] == "eval" and e["step"] == 0] for name in ("compiled", "eager")}
    assert evals["compiled"] == evals["eager"]  # the start model, scored eagerly by both


def test_training_flops_per_token() -> None:
    from cpt_cli.training.throughput import training_flops_per_token

    d, f, n_layers, vocab, seq = 32, 64, 2, 100, 64
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # q k v o, gate up down, two norms
    matmul_params = n_layers * per_layer + d + vocab * d  # + final norm + output layer
    expected = 6 * matmul_params + 12 * n_layers * d * seq
    for tied in (False, True):
        model = _model({**TINY_MODEL, "vocab_size": vocab, "tie_word_embeddings": tied})
        # The input embedding is a lookup (no FLOPs); the output layer is a matmul, tied or not.
        assert training_flops_per_token(model, seq) == expected


def test_peak_flops_table_and_override() -> None:
    from cpt_cli.training.throughput import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", {}) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", {}) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", {}) == 312e12
    assert peak_flops("Some Future GPU", {}) is None
    assert peak_flops("Some Future GPU", {"CPT_PEAK_TFLOPS": "123.5"}) == 123.5e12


def test_cpu_compiler_lookup(tmp_path: Path) -> None:
    from cpt_cli.model import cpu_compiler

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    assert cpu_compiler({"PATH": str(bin_dir)}) is None
    clang = bin_dir / "clang++"
    clang.write_text("#!/bin/sh\n")
    clang.chmod(0o755)
    assert cpu_compiler({"PATH": str(bin_dir)}) == str(clang)
    assert cpu_compiler({"PATH": str(bin_dir), "CXX": "icpx"}) is None  # $CXX decides


def test_precision_on_cpu_is_fp32(tmp_path: Path) -> None:
    from cpt_cli.training.backend import mixed_precision

    for precision in ("auto", "bf16", "fp16", "fp32"):
        recipe = tiny_recipe(tmp_path, "p", [{"name": "x", "path": "x.jsonl"}],
                             train={"precision": precision})
        assert mixed_precision(recipe, cuda=False) == "no"


def test_cli_output_off_a_terminal_is_plain(run: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal: no colour or cursor codes, one line per logged step with the step count
    and an ETA, a line per checkpoint; a tracker that is not installed is named, never
    required."""
    from typer.testing import CliRunner

    from cpt_cli.cli import app

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    path = recipe_file(run["tmp"], "plain", run["sources"],
                       train={"steps": 4, "trackers": ["tensorboard"]},
                       eval={"every_steps": 2})
    result = CliRunner().invoke(app, ["train", str(path), "--output-dir",
                                      str(run["tmp"] / "runs" / "plain")])
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output
    assert re.search(r"^step 1/4  loss \d+\.\d+  lr \S+  [\d,]+ tok/s  256 tokens  ETA \d+m\d\ds$",
                     result.output, re.MULTILINE), result.output
    assert re.search(r"^checkpoint saved: \S+step-000002$", result.output, re.MULTILINE)
    assert re.search(r"^eval step 2: bpb prose \d\.\d{4} \([+-]\d\.\d{4}\), code ", result.output,
                     re.MULTILINE)
    assert "tracker 'tensorboard' is not installed; logging to metrics.jsonl only" in \
        result.output


def test_signal_before_training_stops_without_writing(run: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from cpt_cli.errors import TrainingStopped
    from cpt_cli.training import setup

    original = setup.prepare_data
    # What SIGINT did before (Python's default_int_handler; SIG_IGN under a shell's `&`).
    before = signal.getsignal(signal.SIGINT)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the data is being prepared
        return original(*args, **kwargs)

    monkeypatch.setattr(setup, "prepare_data", interrupted)
    run_dir = run["tmp"] / "runs" / "early"
    with pytest.raises(TrainingStopped, match="SIGINT before training started") as stop:
        train(tiny_recipe(run["tmp"], "early", run["sources"]), output_dir=str(run_dir))
    assert stop.value.exit_code == 130
    assert not run_dir.exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
