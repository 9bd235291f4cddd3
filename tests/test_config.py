"""The recipe: YAML + dotted overrides + interpolation, sizes, every problem in one error, frozen
typed dataclasses, defaults in one place, paths relative to the recipe's folder, safe YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_cli.config import (
    Recipe,
    Size,
    load_recipe,
    parse_size,
    recipe_from_config,
    resolve_path,
    save_recipe,
)
from cpt_cli.errors import RecipeError, UsageError

REPO = Path(__file__).resolve().parent.parent


def minimal() -> dict[str, Any]:
    """The fewest keys a valid recipe needs: everything else comes from the schema's defaults."""
    return {"name": "minimal",
            "model": {"path": "models/base"},
            "data": {"sources": [{"name": "web", "path": "data/web.jsonl"}]},
            "train": {"steps": 10, "global_batch_size": 8}}


def problems_of(config: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_config(config, overrides)
    return info.value.problems


def write(tmp: Path, config: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("100k", 100_000), ("100K", 100_000), ("50M", 50_000_000), ("2B", 2_000_000_000),
    ("2G", 2_000_000_000), ("1T", 10**12), ("1.5M", 1_500_000), ("0.25k", 250),
    ("1e6", 1_000_000), ("1_000", 1000), (" 64 ", 64), ("0", 0), (4096, 4096),
    (1e6, 1_000_000),
])
def test_sizes(text: Any, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["10X", "2 MB", "-5k", "1.5", "k", "", "1.0000005k", "2BB",
                                  True, 1.5, None, [1]])
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(ValueError, match="100k, 50M, 2B"):
        parse_size(text)


def test_sizes_in_a_recipe() -> None:
    config = minimal()
    config["data"]["holdout"] = {"tokens": "20k"}
    config["data"]["replay"] = {"buffer_tokens": "1.5M"}
    del config["train"]["global_batch_size"]
    config["train"].update(global_batch_tokens="8k", steps=None, tokens="2B")
    config["data"]["seq_len"] = 1000
    recipe = recipe_from_config(config)
    assert recipe.data.holdout.tokens == 20_000 and isinstance(recipe.data.holdout.tokens, Size)
    assert recipe.data.replay.buffer_tokens == 1_500_000
    assert recipe.train.tokens == 2_000_000_000
    assert recipe.train.global_batch_tokens == 8000
    # Plain integers (what a saved recipe holds) come back as ints, not Size.
    plain = recipe.to_dict()
    assert type(plain["train"]["tokens"]) is int


def test_bad_size_names_key_value_and_forms() -> None:
    config = minimal()
    config["data"]["holdout"] = {"tokens": "10X"}
    (problem,) = problems_of(config)
    assert problem.startswith("data.holdout.tokens: '10X' is not a size")
    assert "100k, 50M, 2B" in problem


# --------------------------------------------------------------------------------------------
# Loading: YAML, overrides, interpolation
# --------------------------------------------------------------------------------------------


def test_yaml_overrides_and_interpolation(tmp_path: Path) -> None:
    config = minimal()
    config["data"]["seq_len"] = 256
    config["eval"] = {"batch_tokens": "${data.seq_len}"}
    config["train"]["optimizer"] = {"lr": 3e-4}
    path = write(tmp_path, config)

    recipe = load_recipe(path)
    assert recipe.eval.batch_tokens == 256
    assert recipe.train.optimizer.lr == 3e-4

    # Overrides are applied before interpolations resolve, so ${data.seq_len} follows them.
    recipe = load_recipe(path, ["data.seq_len=512", "train.optimizer.lr=1e-4",
                                "train.optimizer.betas=[0.8,0.9]", "data.sources.0.weight=0.5",
                                "train.schedule.name=wsd", "data.holdout.tokens=20k"])
    assert recipe.data.seq_len == 512
    assert recipe.eval.batch_tokens == 512
    assert recipe.train.optimizer.lr == 1e-4
    assert recipe.train.optimizer.betas == [0.8, 0.9]
    assert recipe.data.sources[0].weight == 0.5
    assert recipe.train.schedule.name == "wsd"
    assert recipe.data.holdout.tokens == 20_000


def test_override_adds_a_section_the_yaml_left_out(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, minimal()), ["data.replay.ratio=0.25",
                                                      "data.replay.inherit=true"])
    assert recipe.data.replay.ratio == 0.25


@pytest.mark.parametrize("override, expect", [
    ("data.seq_len", "KEY=VALUE"),
    ("=3", "KEY=VALUE"),
    ("data.sources.7.weight=0.5", "list items by index"),
    ("train.optimizer.lr=[1,", "KEY=VALUE"),
    ("train.optimizer.lrr=1e-4", "did you mean 'lr'"),
    ("data.seq_len=long", "expected an integer"),
])
def test_bad_overrides(tmp_path: Path, override: str, expect: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, minimal()), [override])
    assert len(info.value.problems) == 1
    assert expect in info.value.problems[0]


def test_interpolation_to_a_missing_key_names_it(tmp_path: Path) -> None:
    config = minimal()
    config["data"]["seq_len"] = "${data.context}"
    with pytest.raises(RecipeError, match=r"interpolation.*data\.context"):
        load_recipe(write(tmp_path, config))
    # Schema defaults are not visible to interpolations: the message says so.
    config["data"]["seq_len"] = 128
    config["eval"] = {"batch_tokens": "${train.micro_batch_size}"}
    with pytest.raises(RecipeError, match="schema defaults are not visible"):
        load_recipe(write(tmp_path, config))


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    assert issubclass(RecipeError, UsageError)  # exit status 2 in the CLI


# --------------------------------------------------------------------------------------------
# Safe YAML: no Python object is ever built from a recipe
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tagged", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:builtins.open ['{marker}', 'w']",
    "!!python/object:pathlib.PosixPath {{}}",
    "!!python/name:os.system",
])
def test_python_tags_are_refused(tmp_path: Path, tagged: str) -> None:
    marker = tmp_path / "constructed"
    config = yaml.safe_dump(minimal()).replace("name: minimal",
                                               "name: " + tagged.format(marker=marker))
    assert "!!python" in config
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, config))
    assert "python/" in str(info.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Validation: every problem at once, each naming key, value and what is accepted
# --------------------------------------------------------------------------------------------


def test_every_problem_in_one_error() -> None:
    config = minimal()
    config["data"]["seq_lenn"] = 64                              # unknown key
    config["data"]["sources"][0]["weight"] = 0                   # bad value
    config["data"]["replay"] = {"ratio": 1.0}                    # out of range
    config["train"]["optimizer"] = {"lr": -1, "betas": [0.9]}   # two bad values
    config["train"]["schedule"] = {"name": "cosin"}              # not an accepted name
    config["train"]["precision"] = 16                            # wrong type
    config["launch"] = {"num_processes": 0}
    with pytest.raises(RecipeError) as info:
        recipe_from_config(config, origin="r.yaml")
    problems = info.value.problems
    expected = {
        "data.seq_lenn": "did you mean 'seq_len'",
        "data.sources[0].weight": "0.0 must be a positive number",
        "data.replay.ratio": "1.0 must be at least 0 and below 1",
        "train.optimizer.lr": "-1.0 must be positive",
        "train.optimizer.betas": "[0.9] must be two numbers in [0, 1)",
        "train.schedule.name": "'cosin' is not accepted; use one of 'cosine', 'wsd', 'linear', "
                               "'constant' (did you mean 'cosine'?)",
        "train.precision": "16 is not accepted",
        "launch.num_processes": "0 must be at least 1",
    }
    for key, text in expected.items():
        assert any(p.startswith(f"{key}:") and text in p for p in problems), (key, problems)
    assert len(problems) == len(expected), problems
    message = str(info.value)
    assert message.startswith(f"r.yaml has {len(expected)} problems:")
    assert all(f"  - {p}" in message for p in problems)


def test_a_wrong_type_is_reported_once() -> None:
    """A field that fails its type check is not reported again by the checks across fields
    (train.steps: 'many' is not also 'set exactly one of tokens and steps')."""
    config = minimal()
    config["train"]["steps"] = "many"
    assert problems_of(config) == ["train.steps: expected an integer, got 'many'"]


def test_required_keys() -> None:
    problems = problems_of({"model": {"path": "m"}, "train": {"steps": 1,
                                                              "global_batch_size": 1}})
    assert any(p.startswith("name: required") for p in problems), problems
    assert any(p.startswith("data: required") for p in problems), problems


@pytest.mark.parametrize("change, key, expect", [
    ({"data": {"sources": []}}, "data.sources", "at least one source"),
    ({"model": {"path": "m", "init": {"config": {"model_type": "llama"}}}}, "model",
     "exactly one of model.path"),
    ({"model": {"init": {"config": {"hidden_size": 8}}, "train_tokenizer": {}}},
     "model.init.config.model_type", "required"),
    ({"model": {"init": {"config": {"model_type": "llama"}}}}, "model",
     "model.train_tokenizer"),
    ({"train": {"steps": 1, "tokens": "1M", "global_batch_size": 8}}, "train", "exactly one"),
    ({"train": {"steps": 1}}, "train", "global_batch_tokens"),
    ({"train": {"steps": 1, "global_batch_tokens": 10}, "data": {
        "seq_len": 64, "sources": [{"name": "a", "path": "a"}]}}, "train.global_batch_tokens",
     "less than one sequence of data.seq_len (64)"),
    ({"name": "a/b"}, "name", "folder name"),
    ({"data": {"sources": [{"name": "a", "path": "a", "template": "{q"}]}},
     "data.sources[0].template", "format string"),
    ({"data": {"sources": [{"name": "a", "path": "a", "max_chars": 0}]}},
     "data.sources[0].max_chars", "at least"),
    ({"data": {"sources": [{"name": "a", "path": "a", "hf": {"path": "x"}}]}},
     "data.sources[0]", "exactly one of path"),
    ({"data": {"sources": [{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]}},
     "data.sources[1].name", "unique"),
    ({"train": {"steps": 1, "global_batch_size": 1, "freeze": ["("]}}, "train.freeze[0]",
     "regular expression"),
])
def test_checks_across_fields(change: dict[str, Any], key: str, expect: str) -> None:
    config = {**minimal(), **change}
    problems = problems_of(config)
    assert any(p.startswith(f"{key}:") and expect in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# The result: frozen, typed, defaults from the schema
# --------------------------------------------------------------------------------------------


def test_frozen() -> None:
    recipe = recipe_from_config(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.optimizer.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.data.sources[0].weight = 2.0  # type: ignore[misc]
    # Changing a recipe means a new one.
    changed = dataclasses.replace(recipe, seed=7)
    assert changed.seed == 7 and recipe.seed == 1234


def test_defaults() -> None:
    r = recipe_from_config(minimal())
    assert isinstance(r, Recipe)
    assert (r.seed, r.output_dir, r.launch.num_processes) == (1234, None, 1)
    assert r.model.trust_remote_code is False  # no shipped code runs unless the recipe says so
    assert r.model.tokenizer is None and r.model.init is None
    d = r.data
    assert (d.seq_len, d.packing, d.cross_document_attention, d.max_epochs) == \
        (2048, "concat", False, 16.0)
    assert (d.replay.ratio, d.replay.inherit, d.replay.sources) == (0.0, True, [])
    assert (d.holdout.tokens, d.holdout.max_fraction) == (100_000, 0.5)
    src = d.sources[0]
    assert (src.text_field, src.weight, src.min_chars, src.max_chars, src.on_error) == \
        ("text", 1.0, 1, 10_000_000, "raise")
    t = r.train
    assert (t.micro_batch_size, t.precision, t.grad_clip, t.max_bad_steps) == (8, "auto", 1.0, 0)
    assert (t.optimizer.lr, t.optimizer.betas, t.optimizer.weight_decay) == \
        (3e-4, [0.9, 0.95], 0.1)
    assert (t.schedule.name, t.schedule.warmup) == ("cosine", 0.01)
    assert (t.checkpoint.every_steps, t.checkpoint.keep) == (1000, 3)
    assert (r.eval.every_steps, r.eval.max_forgetting_bpb) == (None, None)


def test_numbers_are_converted_to_the_schema_types() -> None:
    config = minimal()
    config["train"]["optimizer"] = {"lr": "1e-4", "weight_decay": 0}
    config["train"]["steps"] = "2k"
    r = recipe_from_config(config)
    assert r.train.optimizer.lr == 1e-4 and isinstance(r.train.optimizer.weight_decay, float)
    assert r.train.steps == 2000


def test_saved_recipe_loads_back_identical(tmp_path: Path) -> None:
    """recipe.yaml in a run directory is the resolved recipe: loading it gives the same one."""
    config = minimal()
    config["data"]["seq_len"] = 128
    config["eval"] = {"batch_tokens": "${data.seq_len}"}
    original = load_recipe(write(tmp_path, config), ["train.optimizer.lr=1e-4"])
    run = tmp_path / "run"
    run.mkdir()
    save_recipe(original, run / "recipe.yaml")
    assert load_recipe(run / "recipe.yaml") == original


# --------------------------------------------------------------------------------------------
# Relative paths start at the recipe's folder, wherever cpt runs from
# --------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from cpt_cli.config import model_location
    from cpt_cli.data.sources import expand_paths
    from cpt_cli.runs.layout import run_dir_for

    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "data" / "web.jsonl").write_text('{"text": "hello"}\n')
    (project / "models" / "base").mkdir(parents=True)
    config = minimal()
    config["data"]["sources"][0]["path"] = "../data/*.jsonl"
    config["model"]["path"] = "../models/base"
    config["output_dir"] = "../runs/minimal"
    path = write(project / "recipes", config)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(Path("..") / "project" / "recipes" / "recipe.yaml")
    assert Path(recipe.base_dir) == path.parent.resolve()
    assert resolve_path(recipe, "../data/web.jsonl").resolve() == \
        (project / "data" / "web.jsonl").resolve()
    assert [p.resolve() for p in expand_paths(recipe.data.sources[0], recipe.base_dir)] == \
        [(project / "data" / "web.jsonl").resolve()]
    assert Path(model_location(recipe) or "").resolve() == (project / "models" / "base").resolve()
    assert run_dir_for(recipe, None).resolve() == (project / "runs" / "minimal").resolve()
    # Absolute paths and ~ are left as they are.
    assert resolve_path(recipe, str(tmp_path)) == tmp_path
    assert resolve_path(recipe, "~/x") == Path.home() / "x"


def test_quickstart_recipes_load() -> None:
    for path in sorted((REPO / "recipes" / "quickstart").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.name.startswith("quickstart-"), path
        assert Path(recipe.base_dir) == path.parent.resolve()


@pytest.mark.parametrize("template, ok", [
    ("Question: {question}\nAnswer: {answer}", True),
    ("{first-name} {score:>5} {title!r}", True),   # any record key; format specs and conversions
    ("{question.__class__}", False),               # attribute access reaches Python objects
    ("{answers[0]}", False),
    ("{}", False),
    ("{0}", False),
    ("no placeholder", False),
    ("{unclosed", False),
])
def test_templates(template: str, ok: bool) -> None:
    config = minimal()
    config["data"]["sources"][0]["template"] = template
    if ok:
        assert recipe_from_config(config).data.sources[0].template == template
    else:
        (problem,) = problems_of(config)
        assert problem.startswith("data.sources[0].template:")
