"""cpt_cli.config.resume: every recipe key has a resume rule, and changes are found by key."""

from __future__ import annotations

import copy
import fnmatch

import pytest

from cpt_cli.config import resume


def test_every_schema_key_has_exactly_the_rule_it_matches_first() -> None:
    keys = resume.schema_keys()
    assert "train.optimizer.lr" in keys and "data.sources.*.weight" in keys
    assert "base_dir" not in keys
    for key in keys:
        resume.rule_for(key)  # raises KeyError for a key without a rule


def test_a_key_without_a_rule_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = {k: v for k, v in resume.RULES.items() if k != "train.grad_clip"}
    monkeypatch.setattr(resume, "RULES", rules)
    with pytest.raises(KeyError, match="train.grad_clip"):
        for key in resume.schema_keys():
            resume.rule_for(key)


def test_no_rule_is_dead() -> None:
    keys = resume.schema_keys() + ["data.sources", "data.replay.sources"]
    for pattern in resume.RULES:
        assert any(fnmatch.fnmatchcase(k, pattern) for k in keys), pattern


PLAIN = {
    "name": "x", "seed": 1, "output_dir": None,
    "model": {"path": "models/a", "init": None},
    "data": {"seq_len": 64, "sources": [{"name": "code", "weight": 1.0, "path": "c.jsonl"},
                                        {"name": "qa", "weight": 0.5, "path": "q.jsonl"}],
             "replay": {"ratio": 0.25, "sources": []}},
    "train": {"optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]}, "schedule": {"name": "cosine"},
              "checkpoint": {"keep": 2}},
    "eval": {"every_steps": 5},
}


def changed(**edits: object) -> dict:
    new = copy.deepcopy(PLAIN)
    for key, value in edits.items():
        node = new
        *path, last = key.split("__")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return new


def test_changes_name_each_key_with_both_values_and_its_rule() -> None:
    found = resume.changes(PLAIN, changed(train__optimizer__lr=5e-4, train__checkpoint__keep=3,
                                          model__path="models/b"))
    by_key = {c.key: c for c in found}
    assert set(by_key) == {"train.optimizer.lr", "train.checkpoint.keep", "model.path"}
    assert (by_key["train.optimizer.lr"].old, by_key["train.optimizer.lr"].new) == (1e-3, 5e-4)
    assert by_key["train.optimizer.lr"].action == "apply"
    assert by_key["train.checkpoint.keep"].action == "continue"
    assert by_key["model.path"].action == "refuse"


def test_a_source_is_named_by_its_name() -> None:
    new = copy.deepcopy(PLAIN)
    new["data"]["sources"][1]["weight"] = 0.7
    (change,) = resume.changes(PLAIN, new)
    assert change.key == "data.sources.qa.weight" and change.action == "replan"
    message = resume.refusal([change], "ckpt", step=25)
    assert message is not None and "--replan" in message and "from step 25" in message
    assert resume.refusal([change], "ckpt", replan=True) is None


def test_sources_added_or_reordered_change_the_list() -> None:
    new = copy.deepcopy(PLAIN)
    new["data"]["sources"].reverse()
    (change,) = resume.changes(PLAIN, new)
    assert change.key == "data.sources" and change.new == ["qa", "code"]


def test_no_change_no_refusal_and_a_refusal_names_every_key() -> None:
    assert resume.changes(PLAIN, copy.deepcopy(PLAIN)) == []
    found = resume.changes(PLAIN, changed(seed=2, data__seq_len=128, train__optimizer__lr=1e-4))
    message = resume.refusal(found, "runs/x/checkpoints/step-000025")
    assert message is not None
    assert "seed: 1 -> 2" in message and "data.seq_len: 64 -> 128" in message
    assert "train.optimizer.lr" not in message  # applied, not refused
    assert "new stage" in message
    assert resume.refusal(resume.changes(PLAIN, changed(train__optimizer__lr=1e-4)), "c") is None


def test_the_docs_table_lists_every_key() -> None:
    table = resume.rules_table()
    for key in resume.schema_keys():
        assert f"| `{key}` |" in table
