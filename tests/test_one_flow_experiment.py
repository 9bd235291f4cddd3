"""experiments/one_flow.py (`make experiment`) on a tiny budget: every arm trains at the same
tokens, from the same base, is scored against that base, and the table, figures and curves come
out. The recipes are copied beside a small quickstart corpus and shrunk (a 2-layer model, 64-token
sequences), so nothing is written into the repository."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import one_flow  # noqa: E402

TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": True}


def shrink(path: Path) -> None:
    recipe = yaml.safe_load(path.read_text())
    recipe["data"] |= {"seq_len": 64, "holdout": {"tokens": "3k"}}  # 2+ documents each
    recipe["train"] |= {"global_batch_tokens": 512, "micro_batch_size": 8}
    recipe["eval"] = {"every_steps": 3}
    if "init" in recipe["model"]:
        recipe["model"] = {"init": {"config": TINY_MODEL}, "train_tokenizer": {"vocab_size": 300}}
        recipe["train"]["tokens"] = "4k"
    path.write_text(yaml.safe_dump(recipe))


@pytest.mark.slow
def test_every_arm_trains_equal_tokens_from_one_base(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from cpt_cli.data.corpus import build_quickstart_corpus

    recipes = tmp_path / one_flow.RECIPES
    shutil.copytree(ROOT / one_flow.RECIPES, recipes)
    for path in recipes.glob("*.yaml"):
        shrink(path)
    build_quickstart_corpus(tmp_path / "data" / "quickstart", max_documents=300)
    arms = ["staged-replay", "flow-constant", "flow-scheduled"]
    assert one_flow.main(["--root", str(tmp_path), "--tokens", "8192",
                          "--arms", ",".join(arms)]) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    results = json.loads((runs / "one-flow-results.json").read_text())
    assert list(results["arms"]) == arms
    for arm, row in results["arms"].items():
        assert set(row) == set(one_flow.DOMAINS), arm
        for cell in row.values():
            assert cell["low"] <= cell["delta"] <= cell["high"]
            assert cell["delta"] == pytest.approx(cell["bpb"] - cell["start"])
        assert arm in out
    # The same start for every arm: the base's figures on the same held-out documents.
    starts = {arm: {d: c["start"] for d, c in row.items()} for arm, row in results["arms"].items()}
    assert len({json.dumps(s, sort_keys=True) for s in starts.values()}) == 1
    # Equal compute: each arm trained 16 steps of 512 tokens, the staged one in two halves, the
    # second stage continuing from the first stage's final model.
    trained = {}
    for arm in arms:
        names = [n for n, _ in one_flow.stage_recipes(tmp_path, arm, 8192)]
        ends = [[json.loads(line) for line in (runs / n / "metrics.jsonl").read_text()
                 .splitlines() if '"train"' in line][-1]["tokens"] for n in names]
        trained[arm] = sum(ends)
        if len(names) == 2:
            second = yaml.safe_load((runs / names[1] / "recipe.yaml").read_text())
            assert Path(second["model"]["path"]) == runs / names[0] / "final"
    assert set(trained.values()) == {8192}
    assert "flow-scheduled - flow-constant" in results["paired"]
    assert "paired" in out and (runs / "one-flow-curves.png").read_bytes()[:4] == b"\x89PNG"
