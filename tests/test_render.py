"""The tables cpt prints fit 100 columns: no cell cut ("…"), no row broken over two lines, on
real reports (a two-stage run: the second replays the first's data by inheritance, on a schedule)
and on forgetting reports built by `forgetting_table` from scores made here."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rich.console import Console

from cpt_cli.cli import render
from cpt_cli.config import load_recipe
from cpt_cli.evaluation.report import forgetting_table
from cpt_cli.evaluation.scoring import DocumentScores

# conftest's TINY_LLAMA: a 2-layer, 32-wide Llama (a module-scoped fixture cannot take tiny_recipe).
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory: pytest.TempPathFactory, quickstart_corpus: dict[str, Path],
               tiny_tokenizer: Path, cpt_cache: Path) -> dict[str, Any]:
    """Stage 1 trains on prose; stage 2 on code and qa (a ramped mix) with stage 1's prose
    replayed by inheritance: its plan, its forgetting report and its run directory."""
    from cpt_cli.inspection import inspect_mix
    from cpt_cli.training.loop import train

    tmp = tmp_path_factory.mktemp("render")
    for name, path in quickstart_corpus.items():
        shutil.copy(path, tmp / f"{name}.jsonl")
    common = {"seed": 3, "data": {"seq_len": 64, "cache_dir": str(cpt_cache),
                                  "holdout": {"tokens": 500}},
              "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2,
                        "checkpoint": {"every_steps": 2, "keep": 2}},
              "eval": {"every_steps": 2, "bootstrap_samples": 100}}

    def stage(name: str, model: dict[str, Any], data: dict[str, Any]) -> Path:
        recipe = {**common, "name": name, "model": model,
                  "data": {**common["data"], **data}, "output_dir": f"runs/{name}"}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    first = train(load_recipe(stage("first", {"init": {"config": TINY_LLAMA},
                                              "tokenizer": str(tiny_tokenizer)},
                                    {"sources": [{"name": "prose", "path": "prose.jsonl"}]})))
    second_recipe = load_recipe(stage("second", {"path": str(first.final_dir)}, {
        "sources": [{"name": "code", "path": "code.jsonl",
                     "weight": {"0%": 0.8, "50%": 0.8, "100%": 0.2}},
                    {"name": "qa", "path": "qa.jsonl",
                     "template": "Question: {question}\nAnswer: {answer}",
                     "weight": {"0%": 0.2, "50%": 0.2, "100%": 0.8}}],
        "replay": {"ratio": 0.25, "inherit": True}}))
    second = train(second_recipe)
    return {"plan": inspect_mix(second_recipe), "report": second.report,
            "run_dir": second.run_dir, "final": second.final_dir, "first": first.final_dir,
            "tmp": tmp}


def _render(draw: Any, width: int) -> str:
    console = Console(width=width, force_terminal=False, record=True)
    draw(console)
    return console.export_text()


def _one_line(text: str, cells: list[str]) -> None:
    """A line holding exactly these cells, in order, whole: the row neither wrapped nor cut."""
    pattern = r"\s+".join(re.escape(c) for c in cells if c)
    assert re.search(rf"^\s*{pattern}\s*$", text, re.M), f"no line {cells} in:\n{text}"


def _change(d: dict[str, Any]) -> list[str]:
    """The change cell and the interval cell a domain's row should show, from its figures."""
    delta = d["delta_bpb"]
    words = {"target": ("gain", "worse"), "retained": ("improved", "forgot")}[d["role"]]
    word = words[0] if delta < 0 else words[1]
    change = f"{word} {abs(delta):.4f}" + (" n.s." if d.get("significant") is False else "")
    if d.get("ci_low") is None:
        return [change, "-"]
    low, high = (-d["ci_high"], -d["ci_low"]) if delta < 0 else (d["ci_low"], d["ci_high"])
    return [change, f"{low:.3f} to {high:.3f}"]


def _forgetting_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[d["name"], d["role"], render._count(d["tokens"]), f"{d['loss']:.3f}",
             render._ppl(d["ppl"]),
             f"{d['bpb']:.4f}", f"{d['start_bpb']:.4f}", *_change(d)] for d in report["domains"]]


def _made_report() -> dict[str, Any]:
    """Every wording at once, from scores made here: a target that gained and one that got
    worse, a retained domain that forgot, one that improved, one within its noise."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2_000, 40_000, size=60)
    shifts = {"code": ("target", -0.30), "maths-proofs": ("target", 0.08),
              "wikipedia-en": ("retained", 0.10), "prose": ("retained", -0.05),
              "web": ("retained", 0.0)}

    def scores(shift: float, noise: float) -> DocumentScores:
        nll = tokens * (2.0 + shift + rng.normal(0, noise, size=len(tokens)))
        return DocumentScores(nll=nll, tokens=tokens, bytes=tokens * 4)

    start = {name: scores(0.0, 0.0) for name in shifts}
    now = {name: scores(shift, 0.05) for name, (_, shift) in shifts.items()}
    report = forgetting_table(now, start, {n: role for n, (role, _) in shifts.items()},
                              bootstrap_samples=200, peak_forgetting=0.04)
    report["model"] = "runs/llama-3.2-1b-code/checkpoints/step-001000"
    return report


@pytest.mark.parametrize("width", [100, 120])
def test_the_forgetting_table_fits_without_wrapping_or_cutting(two_stages: dict[str, Any],
                                                               width: int) -> None:
    made = _made_report()
    by_name = {d["name"]: d for d in made["domains"]}
    # The report covers every wording, and the n.s. one is truly within its noise.
    assert by_name["prose"]["delta_bpb"] < 0 and by_name["maths-proofs"]["delta_bpb"] > 0
    assert by_name["web"]["significant"] is False
    for report in (two_stages["report"], made):
        text = _render(lambda c, r=report: render.forgetting(r, c), width)
        assert "…" not in text
        for cells in _forgetting_rows(report):
            _one_line(text, cells)
    text = _render(lambda c: render.forgetting(made, c), width)
    assert "improved " in text and "forgot -" not in text and "gain -" not in text


@pytest.mark.parametrize("width", [100, 120, 140])
def test_mix_inspect_fits_without_wrapping_or_cutting(two_stages: dict[str, Any],
                                                      width: int) -> None:
    plan = two_stages["plan"]

    def draw(console: Console) -> None:
        render.plan(plan, console, "second")
        render.phases(plan, console)

    text = _render(draw, width)
    assert "…" not in text
    roles = {s["name"]: s["role"] + ("*" if s.get("inherited") else "") for s in plan["sources"]}
    assert roles["prose"] == "replay*"  # replayed by inheritance: abbreviated, with its legend
    assert "* inherited: data of an earlier stage of model.path's lineage" in text
    for s in plan["sources"]:
        _one_line(text, [s["name"], roles[s["name"]], f"{s['documents']:,}",
                         f"{s['tokens_available']:,}", f"{s['holdout_tokens']:,}",
                         f"{s['tokens_planned']:,}", f"{s['epochs']:.2f}"])
        weight = s["weight"] if isinstance(s["weight"], dict) else {"": s["weight"]}
        _one_line(text, [s["name"], " -> ".join(f"{k}: {v:g}" if k else f"{v:g}"
                                                for k, v in weight.items()),
                         *(f"{s[k]:.2%}" for k in ("share_requested", "share_planned",
                                                    "share_achieved_first_1000",
                                                    "share_achieved"))])
    assert len(plan["phases"]) > 1
    for ph in plan["phases"]:
        for i, s in enumerate(ph["sources"]):
            lead = [f"{ph['start_step']:,}-{ph['end_step']:,}",
                    f"{ph['lr_start']:.2f}-{ph['lr_end']:.2f}"] if i == 0 else []
            _one_line(text, [*lead, s["name"], f"{s['share_planned']:.1%}",
                             f"{s['share_scheduled']:.1%}", f"{s['tokens_planned']:,}"])


def test_large_counts_are_shortened_not_cut() -> None:
    assert render._count(999_999) == "999,999" and render._count(1_260_235) == "1.26M"
    assert render._count(12_345_678) == "12.3M" and render._count(2_049_000_000) == "2.05B"
    assert [render._ppl(x) for x in (5.5712, 9.999, 38.14, 291.4, 32_011.4)] == \
        ["5.57", "10.0", "38.1", "291", "32,011"]



def test_the_peak_is_said_to_be_during_training_only_with_a_training_peak(
        two_stages: dict[str, Any], tmp_path: Path) -> None:
    """`cpt eval MODEL --data ... --base OTHER` trained nothing: its peak is the worst forgetting
    of the one model scored, not "peak forgetting during training"."""
    from typer.testing import CliRunner

    from cpt_cli.cli import app

    prose = (two_stages["tmp"] / "prose.jsonl").read_text().splitlines()[:12]
    data = tmp_path / "prose.jsonl"
    data.write_text("\n".join(prose) + "\n")
    runner = CliRunner()

    def evaluate(*args: Any) -> tuple[str, dict[str, Any]]:
        shown = runner.invoke(app, ["eval", *map(str, args), "--bootstrap", "0"])
        as_json = runner.invoke(app, ["eval", *map(str, args), "--bootstrap", "0", "--json"])
        assert shown.exit_code == 0 and as_json.exit_code == 0, shown.output + as_json.output
        return " ".join(shown.output.split()), json.loads(as_json.stdout)["summary"]

    text, summary = evaluate(two_stages["final"], "--data", f"prose={data}",
                             "--base", two_stages["first"])
    assert summary["peak_forgetting_from"] == "model"
    assert summary["peak_forgetting_bpb"] == summary["max_forgetting_bpb"]
    assert "during training" not in text and "(prose)" in text
    text, summary = evaluate(two_stages["run_dir"], "--data", f"prose={data}",
                             "--base", two_stages["first"])  # step 2, then final/
    assert summary["peak_forgetting_from"] == "checkpoints"
    assert "during training" not in text
    assert f"peak forgetting over the 2 models evaluated {summary['peak_forgetting_bpb']:+.4f}" \
        in text
    text, summary = evaluate(two_stages["final"])  # the lineage's held-out sets
    assert summary["peak_forgetting_from"] == "training"
    assert f"peak forgetting during training {summary['peak_forgetting_bpb']:+.4f}" in text
    assert two_stages["report"]["summary"]["peak_forgetting_from"] == "training"


def test_the_legend_leaves_the_target_curves_uncovered(two_stages: dict[str, Any]) -> None:
    from cpt_cli.evaluation.plotting import draw_curves, read_curves

    report = two_stages["report"]
    roles = {d["name"]: d["role"] for d in report["domains"]}
    curves = read_curves(two_stages["run_dir"], report)
    assert {"code", "qa", "prose"} <= set(curves)
    fig = draw_curves(curves, roles)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        (legend,) = [*fig.legends, *filter(None, [ax.get_legend()])]
        box = legend.get_window_extent(renderer)
        targets = [line for line in ax.get_lines() if line.get_label().endswith("(target)")]
        assert len(targets) == 2
        for line in targets:
            points = ax.transData.transform(line.get_xydata())
            assert not any(box.contains(x, y) for x, y in points), line.get_label()
        # Outside the axes altogether, so no curve of any run can fall under it.
        assert not box.overlaps(ax.get_window_extent(renderer))
        assert box.x1 <= fig.bbox.x1  # and still inside the saved figure
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
