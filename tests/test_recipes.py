"""Every shipped recipe validates, opens with the command that runs it, and the ones whose model
and data can be local are planned for real by `cpt mix inspect`.

The real-world templates (Llama, Qwen, SmolLM, FSDP) need the Hugging Face Hub, which tests do not
reach: they are validated only, and the test checks that what they need from the Hub is indeed a
Hub id. The local ones are copied, with their relative layout, into a temporary folder next to a
small quickstart corpus, so nothing is written into the repository.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_cli.config import load_recipe, resolve_path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
ACCELERATE_CONFIGS = RECIPES / "accelerate"
ALL = sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml")
             if ACCELERATE_CONFIGS not in p.parents)

# Local model (built from a config) and local data: planned by `cpt mix inspect` below, with a
# smaller budget and holdout so that a corpus of a few hundred documents suffices.
LOCAL = {
    "quickstart/base.yaml": ["train.tokens=100k", "data.holdout.tokens=2k"],
    "scratch-tiny.yaml": ["train.tokens=100k", "data.holdout.tokens=2k"],
    "experiments/one-flow/base.yaml": ["train.tokens=100k", "data.holdout.tokens=2k"],
}
# Continue a cpt run that must be trained first: the quickstart pair is planned against a
# tiny stand-in of quickstart-base (test_quickstart_stage_two_inherits_the_base_lineage).
NEEDS_A_PARENT_RUN = {
    "quickstart/cpt.yaml": "runs/quickstart-base/final",
    "quickstart/finetune.yaml": "runs/quickstart-base/final",
    "three-stage/stage2.yaml": "runs/three-stage-1-science/final",
    "three-stage/stage3.yaml": "runs/three-stage-2-code/final",
    # The one-flow experiment (experiments/one_flow.py): every arm starts from its base.
    **{f"experiments/one-flow/{arm}.yaml": "runs/one-flow-base/final"
       for arm in ("staged-ft-code", "staged-replay-code", "flow-constant", "flow-scheduled",
                   "flow-anneal")},
    "experiments/one-flow/staged-ft-qa.yaml": "runs/one-flow-staged-ft-code/final",
    "experiments/one-flow/staged-replay-qa.yaml": "runs/one-flow-staged-replay-code/final",
}
# The model (and replay data) come from the Hub.
NEEDS_THE_HUB = {
    "llama-3.2-1b-code.yaml": "meta-llama/Llama-3.2-1B",
    "qwen2.5-0.5b-domain.yaml": "Qwen/Qwen2.5-0.5B",
    "three-stage/stage1.yaml": "HuggingFaceTB/SmolLM2-360M",
    "fsdp-8gpu.yaml": "meta-llama/Llama-3.1-8B",
    "instruct-mix.yaml": "Qwen/Qwen2.5-0.5B",
}


def test_every_recipe_is_classified() -> None:
    """A new recipe must say here how it is tested."""
    assert sorted([*LOCAL, *NEEDS_A_PARENT_RUN, *NEEDS_THE_HUB]) == ALL


@pytest.mark.parametrize("name", ALL)
def test_recipe_validates(name: str) -> None:
    recipe = load_recipe(RECIPES / name)
    assert recipe.name and recipe.data.sources
    if name in NEEDS_THE_HUB:
        assert recipe.model.path == NEEDS_THE_HUB[name]
        assert not resolve_path(recipe, recipe.model.path).exists()
    if name in NEEDS_A_PARENT_RUN:
        assert recipe.model.path is not None
        assert recipe.model.path.endswith(NEEDS_A_PARENT_RUN[name])
        # Relative to the recipe's folder, the parent lands in runs/ at the repository root,
        # where `cpt train` run from the root writes it.
        assert resolve_path(recipe, recipe.model.path).resolve() == \
            (ROOT / NEEDS_A_PARENT_RUN[name]).resolve()
    if name in LOCAL:
        assert recipe.model.init is not None


@pytest.mark.parametrize("name", ALL)
def test_recipe_opens_with_the_command_that_runs_it(name: str) -> None:
    text = (RECIPES / name).read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{name} does not open with a comment"
    comment = "\n".join(header)
    assert re.search(rf"cpt (train|mix inspect) recipes/{re.escape(name)}\b", comment), \
        f"{name}: the opening comment lacks the command that runs it"
    assert "Assumes" in comment or "assumes" in comment.lower(), \
        f"{name}: the opening comment does not say what it assumes"


def test_instruct_mix_streams_chat_trained_on_the_assistant() -> None:
    """The instruct mix's data all comes streamed from the Hub; its chat source is trained on
    the assistant's replies (end-of-turn included, header not), in ChatML with no system turn
    added."""
    from cpt_cli.data.records import ChatRenderer

    recipe = load_recipe(RECIPES / "instruct-mix.yaml")
    every = [*recipe.data.sources, *recipe.data.replay.sources]
    assert all(s.hf is not None and s.hf.streaming and s.hf.max_documents for s in every)
    (chat,) = [s for s in every if s.format == "chat"]
    assert chat.loss_on == "assistant" and chat.messages_field == "messages"
    assert chat.chat_template is not None
    segments = ChatRenderer(chat.chat_template, {}).segments(
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "assistant", "instruct-mix")
    assert segments == [("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False),
                        ("Hello.<|im_end|>\n", True)]


def test_accelerate_configs_are_referenced_and_well_formed() -> None:
    configs = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    assert configs
    referenced = set()
    for name in ALL:
        recipe = load_recipe(RECIPES / name)
        if recipe.launch.accelerate_config:
            path = resolve_path(recipe, recipe.launch.accelerate_config)
            assert path.is_file(), f"{name}: launch.accelerate_config {path} does not exist"
            referenced.add(path.resolve())
    for config in configs:
        assert config.resolve() in referenced, f"{config.name} is used by no recipe"
        data = yaml.safe_load(config.read_text())
        assert data["distributed_type"] in ("FSDP", "DEEPSPEED", "MULTI_GPU")
        assert data["num_processes"] >= 1 and data["num_machines"] >= 1
        if data["distributed_type"] == "FSDP":
            # cpt writes Hugging Face folders from a full state dict on the main process.
            assert data["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_fsdp_recipe_batch_divides_over_eight_gpus() -> None:
    from cpt_cli.data.prepare import batch_geometry

    recipe = load_recipe(RECIPES / "fsdp-8gpu.yaml")
    config = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp-8gpu.yaml").read_text())
    global_batch, accumulation, steps = batch_geometry(recipe, config["num_processes"])
    assert global_batch == 256 and accumulation == 16 and steps > 100


# --------------------------------------------------------------------------------------------
# Planning the local recipes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/ beside data/quickstart (600 documents per domain), as in the repo."""
    from cpt_cli.data.corpus import build_quickstart_corpus

    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(RECIPES, root / "recipes")
    build_quickstart_corpus(root / "data" / "quickstart", max_documents=600)
    return root


def _documented_mix_keys() -> set[str]:
    """The JSON keys docs/cli.md promises for `cpt mix inspect --json`."""
    page = (ROOT / "docs" / "cli.md").read_text()
    paragraph = page.split("**`cpt mix inspect RECIPE`**", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r'"([a-z_0-9]+)"', paragraph))


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_local_recipe_is_planned_by_mix_inspect(name: str, layout: Path) -> None:
    from cpt_cli.inspection import inspect_mix

    recipe = load_recipe(layout / "recipes" / name, LOCAL[name])
    result = inspect_mix(recipe, samples=1)
    names = [s["name"] for s in result["sources"]]
    assert names == [s.name for s in recipe.data.sources]
    assert result["replay_share"] == 0.0
    weights = {s.name: s.weight for s in recipe.data.sources}
    total = sum(weights.values())
    for source in result["sources"]:
        assert abs(source["share_planned"] - weights[source["name"]] / total) < 0.005
        assert source["tokens_available"] > 0 and source["holdout_tokens"] > 0
        assert source["epochs"] < 4  # the overridden budget repeats no source
    assert result["total_tokens"] <= 100_000
    assert result["samples"] and result["samples"][0]["documents"]
    missing = _documented_mix_keys() - _keys(result)
    assert not missing, f"docs/cli.md documents mix inspect keys that do not exist: {missing}"


def test_quickstart_stage_two_inherits_the_base_lineage(layout: Path) -> None:
    """Train a 2-step stand-in of quickstart-base (tiny model, same data), then plan cpt.yaml and
    finetune.yaml against it as written: replay comes from the lineage, and the fine-tune still
    evaluates the base's domains as retained ones."""
    from cpt_cli.inspection import inspect_mix
    from cpt_cli.training.loop import train

    tiny = ["model.init.config.hidden_size=32", "model.init.config.intermediate_size=64",
            "model.init.config.num_hidden_layers=2", "model.init.config.num_attention_heads=2",
            "model.init.config.num_key_value_heads=2", "model.train_tokenizer.vocab_size=300",
            "data.seq_len=64", "data.holdout.tokens=1k", "train.tokens=null", "train.steps=2",
            "train.global_batch_tokens=512", "train.micro_batch_size=8",
            "train.checkpoint.every_steps=null", "eval.every_steps=null",
            "train.compile=false"]
    base = load_recipe(layout / "recipes" / "quickstart" / "base.yaml", tiny)
    train(base, output_dir=str(layout / "runs" / "quickstart-base"))
    assert (layout / "runs" / "quickstart-base" / "final" / "manifest.json").is_file()

    stage2 = ["data.seq_len=64", "data.holdout.tokens=1k", "train.tokens=20k"]
    cpt = inspect_mix(load_recipe(layout / "recipes" / "quickstart" / "cpt.yaml", stage2))
    roles = {s["name"]: (s["role"], s["inherited"]) for s in cpt["sources"]}
    assert roles == {"code": ("new", False), "prose": ("replay", True), "qa": ("replay", True)}
    # The base trained qa on its answers; replayed through the lineage, it still is.
    assert {s["name"]: s["loss_on"] for s in cpt["sources"]} == \
        {"code": "all", "prose": "all", "qa": "completion"}
    assert abs(cpt["replay_share"] - 0.25) < 0.01

    finetune = inspect_mix(load_recipe(layout / "recipes" / "quickstart" / "finetune.yaml",
                                       stage2))
    assert [s["name"] for s in finetune["sources"]] == ["code"]
    assert finetune["replay_share"] == 0.0
    assert sorted(finetune["retained_only_domains"]) == ["prose", "qa"]
