"""`cpt mix inspect`: the table, held-out tokens, shares achieved, packing efficiency, warnings,
`--samples` with document boundaries and sources, and `--json` with nothing else on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cpt_cli.config import load_recipe
from cpt_cli.inspection import inspect_mix

SOURCE_KEYS = {"name", "role", "weight", "documents", "tokens_available", "holdout_tokens",
               "tokens_planned", "share_planned", "epochs", "share_achieved"}


@pytest.fixture
def mix_recipe(tiny_recipe: dict[str, Any], tmp_path: Path, quickstart_corpus: dict[str, Path],
               tiny_tokenizer: Path) -> dict[str, Any]:
    """prose + qa (0.7 / 0.3) with code replayed at 25%: a few hundred sequences."""
    import shutil

    shutil.copy(quickstart_corpus["code"], tmp_path / "data" / "code.jsonl")
    tiny_recipe["model"] = {"init": tiny_recipe["model"]["init"], "tokenizer": str(tiny_tokenizer)}
    tiny_recipe["data"]["sources"][0]["weight"] = 0.7
    tiny_recipe["data"]["sources"][1]["weight"] = 0.3
    tiny_recipe["data"]["replay"] = {"ratio": 0.25,
                                     "sources": [{"name": "code", "path": "data/code.jsonl"}]}
    tiny_recipe["train"] = {"steps": 150, "global_batch_size": 8, "micro_batch_size": 4}
    return tiny_recipe


def test_json_report(mix_recipe: dict[str, Any], write_recipe: Any) -> None:
    # The real command in a fresh process: --json must leave stdout to the JSON alone, whatever
    # the libraries underneath print (tokenizers, datasets and transformers all can).
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "cpt_cli", "mix", "inspect",
                           str(write_recipe(mix_recipe)), "--json", "--samples", "3"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert {"sources", "total_tokens", "replay_share", "sequences", "packing",
            "warnings", "samples"} <= set(report)
    assert set(report["packing"]) >= {"mode", "padding_fraction", "dropped_tokens"}
    rows = {s["name"]: s for s in report["sources"]}
    assert list(rows) == ["prose", "qa", "code"]
    for row in rows.values():
        assert set(row) >= SOURCE_KEYS
        assert row["holdout_tokens"] >= 500  # data.holdout.tokens, whole documents
        assert row["share_achieved"] == pytest.approx(row["share_planned"])
        assert row["epochs"] == pytest.approx(row["tokens_planned"] / row["tokens_available"])
    assert report["sequences"] == 1200 and report["total_tokens"] == 1200 * 64
    assert sum(r["tokens_planned"] for r in rows.values()) == report["total_tokens"]
    for name, share in (("prose", 0.525), ("qa", 0.225), ("code", 0.25)):
        assert abs(rows[name]["share_planned"] - share) <= 0.005
        assert abs(rows[name]["share_achieved_first_1000"] - share) <= 0.005
    assert rows["code"]["role"] == "replay" and report["replay_share"] == pytest.approx(0.25)
    assert report["packing"] == {"mode": "concat", "padding_fraction": 0.0, "padding_tokens": 0,
                                 "dropped_tokens": report["packing"]["dropped_tokens"]}
    assert report["packing"]["dropped_tokens"] > 0
    assert [s["index"] for s in report["samples"]] == [0, 1, 2]
    for sample in report["samples"]:
        assert sample["source"] in rows
        assert sum(d["tokens"] for d in sample["documents"]) == 64
        assert "".join(d["text"] for d in sample["documents"])


def test_dropped_and_padding_tokens_follow_the_packing(mix_recipe: dict[str, Any],
                                                       write_recipe: Any) -> None:
    recipe = load_recipe(write_recipe(mix_recipe))
    concat = inspect_mix(recipe)
    # Independently: each source's next sequence after the plan starts with the rest of the
    # document the plan cut, up to the first document start.
    from cpt_cli.data.prepare import plan_data, prepare_data

    data = plan_data(recipe, prepare_data(recipe))
    expected = 0
    for stream, row in zip(data.streams, data.plan.sources, strict=True):
        i = row.sequences
        while not stream.sequence(i).doc_starts:
            expected += 64
            i += 1
        expected += stream.sequence(i).doc_starts[0]
    assert concat["packing"]["dropped_tokens"] == expected

    mix_recipe["data"]["packing"] = "best_fit"
    best = inspect_mix(load_recipe(write_recipe(mix_recipe)), samples=4)
    packing = best["packing"]
    assert packing["mode"] == "best_fit" and packing["dropped_tokens"] == 0
    assert 0 < packing["padding_fraction"] < 0.5
    assert packing["padding_tokens"] == round(packing["padding_fraction"] * best["total_tokens"])
    for sample in best["samples"]:
        assert sum(d["tokens"] for d in sample["documents"]) + sample["padding"] == 64


def test_table_samples_and_warnings(mix_recipe: dict[str, Any], write_recipe: Any,
                                    cli: Any) -> None:
    mix_recipe["train"]["steps"] = 900  # qa is small: about 4.8 epochs at this budget
    result = cli("mix", "inspect", write_recipe(mix_recipe), "--samples", "2")
    assert result.exit_code == 0, result.output
    out = result.output
    for header in ("source", "held out", "share planned", "first 1000", "achieved", "epochs"):
        assert header in out.replace("\n", " ") or all(w in out for w in header.split())
    for name in ("prose", "qa", "code"):
        assert name in out
    assert "replay share 25.00%" in out
    assert "packing concat: padding 0.00%, dropped tokens" in out
    assert "warning: source 'qa' is repeated" in out
    assert "sequence 0 from " in out and "sequence 1 from " in out
    assert "<document at 0" in out or "<continued document at 0" in out
    report = inspect_mix(load_recipe(write_recipe(mix_recipe)))
    assert any("source 'qa' is repeated" in w for w in report["warnings"])


def test_train_prints_the_plans_warnings(tiny_recipe: dict[str, Any], tiny_tokenizer: Path,
                                         write_recipe: Any, cli: Any) -> None:
    """The warnings `cpt mix inspect` shows, `cpt train` shows too: here qa's share of the 8
    sequences (1%) rounds to none."""
    tiny_recipe["model"] = {"init": tiny_recipe["model"]["init"], "tokenizer": str(tiny_tokenizer)}
    tiny_recipe["data"]["sources"][1]["weight"] = 0.01
    recipe = write_recipe(tiny_recipe)
    inspected = cli("mix", "inspect", recipe)
    trained = cli("train", recipe)
    assert trained.exit_code == 0, trained.output
    for out in (inspected.output, trained.output):
        assert "warning: source 'qa' gets no sequence" in " ".join(out.split()), out


def test_json_only_on_stdout_in_process(mix_recipe: dict[str, Any], write_recipe: Any,
                                        cli: Any) -> None:
    result = cli("mix", "inspect", write_recipe(mix_recipe), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sequences"] == 1200


def test_bad_recipe_exits_2_without_traceback(mix_recipe: dict[str, Any], write_recipe: Any,
                                              cli: Any) -> None:
    mix_recipe["data"]["sources"][1]["max_epochs"] = 1
    mix_recipe["train"]["steps"] = 600
    result = cli("mix", "inspect", write_recipe(mix_recipe), "--json")
    assert result.exit_code == 2
    assert "source 'qa': the plan repeats it" in result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
