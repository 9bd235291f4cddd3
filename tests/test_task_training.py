"""Training on task data (issue #14): the loss of a step is the mean over the trained tokens of
the whole global batch, equal to an independent masked cross-entropy; metrics.jsonl counts the
trained tokens per source; 1 and 2 processes give the same curve; a crashed and resumed masked
run is bit-identical to one trained straight through.

The recipe: prose (plain text) beside the quickstart's Q&A as prompt/completion records trained
on the answers, a 2-layer Llama saved in a folder (so the test can load the weights that step 1
trained from), 4 sequences of 64 tokens a step in 2 micro batches.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_trainer import read_metrics, weights

from cpt_cli.config import load_recipe
from cpt_cli.data.loader import PackedLoader
from cpt_cli.data.prepare import plan_data, prepare_data
from cpt_cli.training.loop import train


@pytest.fixture(scope="module")
def start_model(tmp_path_factory: pytest.TempPathFactory,
                random_llama: Callable[[Path, int], Path]) -> Path:
    """A randomly initialized tiny Llama with the tiny tokenizer, saved as a model folder."""
    return random_llama(tmp_path_factory.mktemp("start-model"), 3)


def masked_recipe(tmp: Path, model: Path, corpus: dict[str, Path], packing: str = "concat",
                  **train_keys: Any) -> Path:
    config = {
        "name": "masked", "seed": 7, "model": {"path": str(model)},
        "data": {"seq_len": 64, "packing": packing, "cache_dir": str(tmp / "cache"),
                 "holdout": {"tokens": 300},
                 "sources": [{"name": "prose", "path": str(corpus["prose"])},
                             {"name": "qa", "path": str(corpus["qa"]),
                              "format": "prompt_completion", "completion_field": "answer",
                              "template": "Question: {question}\nAnswer: {answer}",
                              "loss_on": "completion", "weight": 2.0}]},
        "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2,
                  "optimizer": {"lr": 3e-3}, "schedule": {"name": "cosine", "warmup": 1},
                  "checkpoint": {"every_steps": 2, "keep": 10}, "log_every_steps": 1,
                  **train_keys},
        "eval": {"every_steps": 2, "bootstrap_samples": 0}}
    path = tmp / f"masked-{packing}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_loss_is_the_masked_cross_entropy_of_the_global_batch(
        tmp_path: Path, start_model: Path, quickstart_corpus: dict[str, Path],
        packing: str) -> None:
    """Step 1's loss (computed by the starting weights) against a cross-entropy by hand over
    the 4 sequences of step 0 at once: the sum over the tokens whose label is not -100,
    divided by their count. Under concat, dividing by every position instead (what an
    unmasked run does) would be off by the masked share."""
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(masked_recipe(tmp_path, start_model, quickstart_corpus, packing,
                                       steps=1))
    result = train(recipe, output_dir=str(tmp_path / "run"))
    (event,) = [e for e in read_metrics(result.run_dir) if e["event"] == "train"]

    data = plan_data(recipe, prepare_data(recipe))
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=4, grad_accum=1)
    batch = loader.micro_batch(0, 0)  # the whole global batch as one micro batch
    model = AutoModelForCausalLM.from_pretrained(str(start_model), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    targets = batch.labels[:, 1:]
    trained = targets != -100
    assert 0 < int(trained.sum()) < targets.numel() - 8  # the prompts are masked
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            targets.reshape(-1), ignore_index=-100,
                                            reduction="sum")
    assert event["loss"] == pytest.approx(float(nll) / int(trained.sum()), rel=1e-6, abs=1e-6)
    # Trained tokens per source: the labels of each source's rows.
    per_row = trained.sum(dim=1).numpy()
    names = [s.name for s in data.streams]
    expected = {name: int(per_row[batch.sources == k].sum()) for k, name in enumerate(names)}
    assert event["trained_tokens"] == expected
    assert expected["qa"] > 0 and expected["prose"] > 0
    # The final report and every evaluation event say what the qa domain is scored on.
    assert {d["name"]: d["scored_on"] for d in result.report["domains"]} == \
        {"prose": "text", "qa": "answers"}
    for e in read_metrics(result.run_dir):
        if e["event"] == "eval":
            assert e["domains"]["qa"]["scored_on"] == "answers"
            assert e["domains"]["prose"]["scored_on"] == "text"


def test_crashed_and_resumed_masked_run_is_bit_identical(
        tmp_path: Path, start_model: Path, quickstart_corpus: dict[str, Path]) -> None:
    """A crash after step 3 (checkpoint at 2), resumed with --resume auto: the same weights,
    optimizer state and curve as the run trained straight through."""
    recipe = load_recipe(masked_recipe(tmp_path, start_model, quickstart_corpus))
    straight = train(recipe, output_dir=str(tmp_path / "straight"))

    def crash(event: dict[str, Any]) -> None:
        if event["event"] == "train" and event["step"] == 3:
            raise RuntimeError("simulated crash")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, output_dir=str(crashed), on_event=crash)
    assert not (crashed / "final").exists()
    train(recipe, output_dir=str(crashed), resume="auto")
    wa, wb = weights(straight.final_dir), weights(crashed / "final")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa = torch.load(straight.final_dir / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(crashed / "final" / "optimizer.pt", weights_only=True)["state"]
    for k in oa:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa[k][key], ob[k][key]), (k, key)

    def curve(run: Path) -> list[tuple[Any, ...]]:
        return [(e["event"], e["step"], e.get("loss"), e.get("trained_tokens"),
                 str(e.get("domains"))) for e in read_metrics(run)]

    assert curve(straight.run_dir) == curve(crashed)


@pytest.mark.slow
def test_two_processes_match_one_on_a_masked_recipe(
        tmp_path: Path, start_model: Path, quickstart_corpus: dict[str, Path],
        train_two_processes: Callable[..., Any]) -> None:
    """8 sequences a step: 4 micro batches of 2 on one process, 2 on each of two. The global
    batch, its trained tokens and so the loss are the same."""
    recipe = masked_recipe(tmp_path, start_model, quickstart_corpus, global_batch_size=8)
    one = train(load_recipe(recipe), output_dir=str(tmp_path / "one"))
    two_dir = tmp_path / "two"
    proc = train_two_processes(recipe, two_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def train_events(run_dir: Path) -> list[dict[str, Any]]:
        return [e for e in read_metrics(run_dir) if e["event"] == "train"]

    a, b = train_events(one.run_dir), train_events(two_dir)
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert y["trained_tokens"] == x["trained_tokens"]
        assert x["trained_tokens"]["qa"] > 0
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), x["step"]


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("name, chat_template, warned", [
    ("tiny-Instruct", CHAT_TEMPLATE, True),
    ("tiny-base", CHAT_TEMPLATE, False),      # a chat template alone does not make it instruct
    ("tiny-Instruct", None, False),           # nor does the name without a chat template
])
def test_an_instruct_start_model_is_warned_about_once(
        tmp_path: Path, start_model: Path, quickstart_corpus: dict[str, Path], cli: Any,
        name: str, chat_template: str | None, warned: bool) -> None:
    from transformers import AutoTokenizer

    model = tmp_path / name
    shutil.copytree(start_model, model)
    tok = AutoTokenizer.from_pretrained(str(start_model))
    tok.chat_template = chat_template
    tok.save_pretrained(str(model))
    recipe = masked_recipe(tmp_path, model, quickstart_corpus, steps=1)
    for args in (["mix", "inspect", recipe], ["train", recipe, "--output-dir", tmp_path / "run"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())  # the table's wrapping undone
        assert text.count("arXiv:2410.10739") == int(warned), text
        if warned:
            assert f"{name!r} names it so" in text and "docs/concepts.md" in text
