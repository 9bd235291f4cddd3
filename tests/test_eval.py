"""`cpt eval`: agreement with an independent computation, lineage domains, curves, plot, budget."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cpt_cli.cli import app  # noqa: E402
from cpt_cli.config import load_recipe  # noqa: E402
from cpt_cli.errors import UsageError  # noqa: E402
from cpt_cli.training.loop import train  # noqa: E402

runner = CliRunner()

PROSE = [f"The {a} river runs past the {b} hills, and the people of the valley {c} every "
         f"morning before the market opens at {n} o'clock."
         for n, (a, b, c) in enumerate([(a, b, c) for a in ("quiet", "wide", "cold", "slow")
                                        for b in ("green", "stony", "far", "low")
                                        for c in ("sing", "fish", "walk", "trade")])]
CODE = [f"def f{n}(x, y):\n    z = x * {n} + y\n    if z > {n * 3}:\n        return z - {n}\n"
        f"    return [i for i in range(z)]\n" for n in range(120)]


def _write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _recipe(tmp: Path, name: str, body: dict) -> Path:
    base = {"name": name, "seed": 7,
            "data": {"seq_len": 64, "holdout": {"tokens": 600}, "cache_dir": str(tmp / "cache")},
            "train": {"steps": 12, "global_batch_size": 8, "micro_batch_size": 4,
                      "optimizer": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup": 0},
                      "checkpoint": {"every_steps": 4, "keep": 5}},
            "eval": {"every_steps": 4, "bootstrap_samples": 200}}
    for key, value in body.items():
        if isinstance(value, dict) and key in base:
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    prose = _write_jsonl(tmp / "prose.jsonl", PROSE)
    code = _write_jsonl(tmp / "code.jsonl", CODE)
    tiny = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128}
    stage1 = _recipe(tmp, "stage1", {
        "model": {"init": {"config": tiny}, "train_tokenizer": {"vocab_size": 320}},
        "data": {"sources": [{"name": "prose", "path": prose}]},
        "train": {"steps": 30}, "eval": {"every_steps": None}})
    r1 = train(load_recipe(stage1), output_dir=str(tmp / "runs" / "stage1"))
    stage2 = _recipe(tmp, "stage2", {
        "model": {"path": str(r1.final_dir)},
        "data": {"sources": [{"name": "code", "path": code}],
                 "replay": {"ratio": 0.0, "inherit": False}},
        "train": {"steps": 12, "optimizer": {"lr": 1e-2}}})
    r2 = train(load_recipe(stage2), output_dir=str(tmp / "runs" / "stage2"))
    return {"tmp": tmp, "stage1": r1.final_dir, "run2": r2.run_dir, "final2": r2.final_dir,
            "prose": Path(prose), "code": Path(code)}


def _independent_nll(model_dir: Path, texts: list[str]) -> tuple[float, int, int]:
    """Plain transformers: one forward per document over [BOS] + tokens, summed NLL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll, tokens, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([[start] + ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
            nll -= float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
            tokens += len(ids)
            nbytes += len(text.encode("utf-8"))
    return nll, tokens, nbytes


def test_eval_data_agrees_with_plain_forward(two_stage: dict[str, Path], tmp_path: Path) -> None:
    # All shorter than the 128-token context, so one plain forward pass scores each exactly in
    # a window of that size (by default the window is the 64 tokens the run trained on).
    texts = ["naïve café — ünïcode text, scored on its own.", CODE[3], PROSE[5] + " " + PROSE[6]]
    data = _write_jsonl(tmp_path / "hidden.jsonl", texts)
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data", f"hidden={data}",
                                 "--max-length", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (row,) = report["domains"]
    nll, tokens, nbytes = _independent_nll(two_stage["final2"], texts)
    assert row["tokens"] == tokens and row["bytes"] == nbytes
    assert row["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert row["bpb"] == pytest.approx(nll / (nbytes * math.log(2)), rel=1e-4)
    assert row["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_eval_data_reads_every_source_format(two_stage: dict[str, Path], tmp_path: Path) -> None:
    """`--data` reads files as a recipe source does: the same texts score the same in any format."""
    import csv
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = PROSE[:4] + ['a "quoted", comma\nand a second line']
    jsonl = _write_jsonl(tmp_path / "t.jsonl", texts)
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(Path(jsonl).read_bytes()))
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "t.parquet")
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["id", "text"])
        writer.writeheader()
        writer.writerows({"id": i, "text": t} for i, t in enumerate(texts))
    (tmp_path / "plain").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "plain" / f"{i}.txt").write_text(t, encoding="utf-8")
    files = {"jsonl": jsonl, "gz": tmp_path / "t.jsonl.gz", "parquet": tmp_path / "t.parquet",
             "csv": tmp_path / "t.csv", "folder": tmp_path / "plain"}
    args = [a for name, f in files.items() for a in ("--data", f"{name}={f}")]
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), *args, "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["domains"]}
    assert set(rows) == set(files)
    _, tokens, nbytes = _independent_nll(two_stage["final2"], texts)
    for name, row in rows.items():
        assert (row["tokens"], row["bytes"]) == (tokens, nbytes), name
        assert row["loss"] == pytest.approx(rows["jsonl"]["loss"], rel=1e-6), name


def test_eval_data_bad_record_names_its_line(two_stage: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data", f"web={data}"])
    assert result.exit_code == 2
    assert f"--data web={data}: {data}:2 is not a record with a 'text' field" in result.output
    data.write_text('{"text": "cut off\n')
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data", f"web={data}"])
    assert result.exit_code == 2 and f"{data}:1: invalid JSON" in result.output
    assert "Traceback" not in result.output


def test_eval_with_base_fills_start_columns(two_stage: dict[str, Path], tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "p.jsonl", PROSE[:10])
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data", f"prose={data}",
                                 "--base", str(two_stage["stage1"]), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["domains"]
    nll0, _, nbytes = _independent_nll(two_stage["stage1"], PROSE[:10])
    assert row["start_bpb"] == pytest.approx(nll0 / (nbytes * math.log(2)), rel=1e-4)
    assert row["delta_bpb"] == pytest.approx(row["bpb"] - row["start_bpb"], abs=1e-12)
    assert {"ci_low", "ci_high", "significant"} <= set(row)


def test_lineage_domains_signs_and_keys(two_stage: dict[str, Path]) -> None:
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    roles = {d["name"]: d for d in report["domains"]}
    assert roles["code"]["role"] == "target" and roles["prose"]["role"] == "retained"
    # Fine-tuning on code with a high learning rate and no replay: code improves, prose forgets.
    assert roles["code"]["delta_bpb"] < 0 and roles["code"]["gain"] > 0
    assert roles["prose"]["delta_bpb"] > 0 and roles["prose"]["forgetting"] > 0
    for d in report["domains"]:
        assert {"name", "role", "tokens", "bytes", "loss", "ppl", "bpb", "start_bpb",
                "delta_bpb", "ci_low", "ci_high", "significant"} <= set(d)
        assert d["ci_low"] <= d["delta_bpb"] <= d["ci_high"]
    s = report["summary"]
    assert s["mean_forgetting_bpb"] == pytest.approx(roles["prose"]["delta_bpb"])
    assert s["peak_forgetting_bpb"] >= s["max_forgetting_bpb"]


def test_budget_sets_exit_status(two_stage: dict[str, Path]) -> None:
    report = json.loads(runner.invoke(app, ["eval", str(two_stage["final2"]), "--json"]).stdout)
    worst = report["summary"]["max_forgetting_bpb"]
    over = runner.invoke(app, ["eval", str(two_stage["final2"]), "--max-forgetting",
                               str(worst / 2), "--json"])
    assert over.exit_code == 1
    under = runner.invoke(app, ["eval", str(two_stage["final2"]), "--max-forgetting",
                                str(worst * 2 + 1e-3), "--json"])
    assert under.exit_code == 0


def test_run_directory_curves_and_plot(two_stage: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    result = runner.invoke(app, ["eval", str(two_stage["run2"]), "--plot", str(png), "--json",
                                 "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    steps = [p["step"] for p in report["curve"]]
    assert steps[:-1] == sorted(steps[:-1]) and len(steps) >= 2  # checkpoints, then final/
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    # metrics.jsonl carries the forgetting curve the plot draws: prose on every eval line.
    evals = [json.loads(line) for line in (two_stage["run2"] / "metrics.jsonl").read_text()
             .splitlines() if '"eval"' in line]
    assert len(evals) >= 3 and all({"code", "prose"} <= set(e["domains"]) for e in evals)


def test_eval_errors_are_clear(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad = runner.invoke(app, ["eval", str(tmp_path), "--data", "oops"])
    assert bad.exit_code == 2 and "NAME=FILE" in bad.output
    assert "Traceback" not in missing.output + bad.output


def test_lm_eval_local_task(two_stage: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="the lm-eval extra is optional; CI installs it")
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "def f(x):\n    return", "choices": [" x", " the hills"], "answer": 0},
        {"question": "The river runs past the", "choices": [" green", " return"], "answer": 0},
    ]))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({
        "task": "cpt_local_choice", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}]}))
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--lm-eval",
                                 "cpt_local_choice", "--lm-eval-include", str(tmp_path),
                                 "--bootstrap", "0", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["downstream"]
    acc = next(r for r in rows if r["metric"] == "acc")
    assert acc["task"] == "cpt_local_choice" and 0.0 <= acc["now"] <= 1.0
    assert acc["start"] is not None and acc["delta"] == pytest.approx(acc["now"] - acc["start"])


def test_missing_base_names_the_option(two_stage: dict[str, Path], tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "p.jsonl", PROSE[:3])
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data", f"p={data}",
                                 "--base", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "--base" in result.output
    assert "Traceback" not in result.output


def test_a_lineage_domain_whose_held_out_text_is_all_trained_on_is_left_out(
        two_stage: dict[str, Path], tmp_path: Path) -> None:
    """A new source holding every held-out prose document of the lineage: scoring prose would
    measure memorization, so it is left out with a warning (never a NaN row); a new source named
    like a lineage domain but holding none of its held-out text is warned about too."""
    from cpt_cli.runs.lineage import read_heldout

    held = [d["text"] for d in read_heldout(two_stage["stage1"] / "heldout" / "prose.jsonl")]
    # Held-out sets take the documents of smallest hash: one below all of prose's, and a budget
    # of one document, make the new source hold out that one and train on all of prose's.
    from cpt_cli.data.cache import document_hash

    lowest = min(document_hash(t) for t in held)
    first = next(t for t in (f"A note, number {i}." for i in range(10**6))
                 if document_hash(t) < lowest)
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [first] + held + CODE)
    recipe = _recipe(tmp_path, "swallow", {
        "model": {"path": str(two_stage["stage1"])},
        "data": {"sources": [{"name": "mixed", "path": mixed}], "holdout": {"tokens": 1},
                 "replay": {"ratio": 0.0, "inherit": False}}})
    result = runner.invoke(app, ["mix", "inspect", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert any("domain 'prose': every held-out document is also in this stage's training data"
               in w for w in plan["warnings"]), plan["warnings"]
    recipe = _recipe(tmp_path, "renamed", {
        "model": {"path": str(two_stage["stage1"])},
        "data": {"sources": [{"name": "prose", "path": str(two_stage["code"])}],
                 "replay": {"ratio": 0.0, "inherit": False}}})
    result = runner.invoke(app, ["mix", "inspect", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    assert any("source 'prose' is named like the lineage's domain but holds none of its "
               "held-out documents" in w for w in json.loads(result.stdout)["warnings"])


def test_damaged_lineage_files_are_named(two_stage: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(two_stage["final2"], model)
    (model / "manifest.json").write_text('{"x')
    result = runner.invoke(app, ["eval", str(model)])
    assert result.exit_code == 2 and "manifest.json is damaged" in result.output, result.output
    shutil.copy(two_stage["final2"] / "manifest.json", model / "manifest.json")
    with open(model / "heldout" / "prose.jsonl", "a") as fh:
        fh.write("not json\n")
    result = runner.invoke(app, ["eval", str(model)])
    assert result.exit_code == 2 and "prose.jsonl is missing or damaged" in result.output
    assert "Traceback" not in result.output


def test_eval_data_without_documents_is_refused(two_stage: dict[str, Path],
                                                tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data",
                                 f"x={tmp_path / 'empty.jsonl'}"])
    assert result.exit_code == 2 and "no text to score" in result.output, result.output


def test_json_outputs_hold_no_nan() -> None:
    from cpt_cli.runs.lineage import json_safe

    payload = {"loss": float("nan"), "rows": [{"bpb": float("inf")}, 1.5], "n": 3}
    assert json.loads(json.dumps(json_safe(payload), allow_nan=False)) == \
        {"loss": None, "rows": [{"bpb": None}, 1.5], "n": 3}


def test_an_unwritable_plot_is_refused_before_the_evaluation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cpt_cli.evaluation import evaluate as evaluate_module

    def evaluate(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation ran before the plot's destination was checked")

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    # /sys refuses new files even to root, for whom a folder's permission bits would not.
    result = runner.invoke(app, ["eval", str(tmp_path), "--plot", "/sys/curves.png"])
    assert result.exit_code == 2, result.output
    assert "--plot /sys/curves.png: cannot write there (Permission denied)" in result.output
    assert "Traceback" not in result.output


def test_a_metrics_line_cut_short_by_a_kill_is_skipped(two_stage: dict[str, Path],
                                                       tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_stage["run2"], run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "train", "step": 1')
    result = runner.invoke(app, ["eval", str(run / "final"), "--json", "--bootstrap", "0",
                                 "--plot", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["peak_forgetting_bpb"] is not None
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_base_scores_are_cached_per_model_not_per_name(two_stage: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """`--base` names a folder; retrained in place, it is scored anew, not read from the cache."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(two_stage["stage1"], base)
    data = _write_jsonl(tmp_path / "p.jsonl", PROSE[:6])
    args = ["eval", str(two_stage["final2"]), "--data", f"prose={data}", "--base", str(base),
            "--json", "--bootstrap", "0"]
    first = json.loads(runner.invoke(app, args).stdout)["domains"][0]["start_bpb"]
    time.sleep(0.01)
    shutil.copy(two_stage["final2"] / "model.safetensors", base / "model.safetensors")
    second = json.loads(runner.invoke(app, args).stdout)["domains"][0]["start_bpb"]
    nll, _, nbytes = _independent_nll(two_stage["final2"], PROSE[:6])
    assert first != pytest.approx(second)
    assert second == pytest.approx(nll / (nbytes * math.log(2)), rel=1e-4)


def test_a_forgetting_gate_with_nothing_to_compare_is_refused(two_stage: dict[str, Path],
                                                              tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "p.jsonl", PROSE[:6])
    result = runner.invoke(app, ["eval", str(two_stage["stage1"]), "--data", f"prose={data}",
                                 "--max-forgetting", "0.01"])
    assert result.exit_code == 2, result.output
    assert "--max-forgetting: there is no forgetting figure to check" in result.output


def test_overwrite_never_deletes_the_model_it_starts_from(two_stage: dict[str, Path],
                                                          tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "c1"
    shutil.copytree(two_stage["stage1"].parent, run)
    recipe = _recipe(tmp_path, "self", {
        "model": {"path": str(run / "final")},
        "data": {"sources": [{"name": "code", "path": str(two_stage["code"])}],
                 "replay": {"ratio": 0.0, "inherit": False}}})
    with pytest.raises(UsageError, match="--overwrite would delete .*c1, which holds this "
                                         "recipe's model.path"):
        train(load_recipe(recipe), output_dir=str(run), overwrite=True)
    assert (run / "final" / "model.safetensors").is_file()


def test_eval_data_reads_a_saved_dataset_folder(two_stage: dict[str, Path],
                                                tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": PROSE[:5]}).save_to_disk(str(tmp_path / "ds"))
    jsonl = _write_jsonl(tmp_path / "p.jsonl", PROSE[:5])
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data",
                                 f"saved={tmp_path / 'ds'}", "--data", f"jsonl={jsonl}",
                                 "--json", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["domains"]}
    assert rows["saved"]["tokens"] == rows["jsonl"]["tokens"]
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["eval", str(two_stage["final2"]), "--data",
                                 f"x={tmp_path / 'empty'}"])
    assert result.exit_code == 2 and "the folder holds no file" in result.output


def test_a_copied_final_folder_keeps_its_training_peak(two_stage: dict[str, Path],
                                                       tmp_path: Path) -> None:
    import shutil

    in_run = json.loads(runner.invoke(app, ["eval", str(two_stage["final2"]), "--json",
                                            "--bootstrap", "0"]).stdout)
    shutil.copytree(two_stage["final2"], tmp_path / "moved")
    moved = json.loads(runner.invoke(app, ["eval", str(tmp_path / "moved"), "--json",
                                           "--bootstrap", "0"]).stdout)
    assert moved["summary"]["peak_forgetting_bpb"] == \
        pytest.approx(in_run["summary"]["peak_forgetting_bpb"])


def test_a_source_redefined_under_its_name_is_still_known_as_trained(
        two_stage: dict[str, Path], tmp_path: Path) -> None:
    """Stage 1 trained `prose` on prose.jsonl; stage 2 re-lists `prose` on other files. Stage 3's
    held-out set must still leave out what stage 1 trained on."""
    other = _write_jsonl(tmp_path / "other.jsonl", CODE[:40])
    stage2 = _recipe(tmp_path, "redefine", {
        "model": {"path": str(two_stage["stage1"])},
        "data": {"sources": [{"name": "code", "path": str(two_stage["code"])}],
                 "replay": {"ratio": 0.25, "sources": [{"name": "prose", "path": other}]}},
        "train": {"steps": 4}, "eval": {"every_steps": None}})
    final = train(load_recipe(stage2), output_dir=str(tmp_path / "runs" / "redefine")).final_dir
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["sources"]["prose"]["earlier"][0]["stage"] == 0
    stage3 = _recipe(tmp_path, "after", {
        "model": {"path": str(final)},
        "data": {"sources": [{"name": "again", "path": str(two_stage["prose"])}],
                 "holdout": {"tokens": 1000}, "replay": {"ratio": 0.0, "inherit": False}}})
    result = runner.invoke(app, ["mix", "inspect", str(stage3), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = [s for s in json.loads(result.stdout)["sources"] if s["name"] == "again"]
    # Held-out sets take the documents of smallest hash: stage 1's own (600 tokens, never
    # trained), then, for 1,000 tokens, documents stage 1 trained on, which must be dropped.
    assert row["dropped_duplicates"] > 0, row


def test_disjoint_windows_match_lm_eval_rolling_loglikelihood(two_stage: dict[str, Path],
                                                               tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="the lm-eval extra is optional; CI installs it")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    model_dir = two_stage["final2"]
    # Documents several windows long (the run trained on 64-token sequences), one shorter.
    texts = [" ".join(PROSE[i:i + 6]) for i in (0, 10, 20)] + ["\n".join(CODE[:5]), PROSE[40]]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert max(lengths) > 3 * 64 and min(lengths) < 64
    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=4, dtype="float32",
              max_length=64)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    loglik = sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
    lm_eval_bpb = -loglik / (sum(len(t.encode("utf-8")) for t in texts) * math.log(2))

    data = _write_jsonl(tmp_path / "long.jsonl", texts)
    scored = {}
    for stride in ("disjoint", None):
        args = ["eval", str(model_dir), "--data", f"long={data}", "--json", "--bootstrap", "0"]
        result = runner.invoke(app, args + (["--stride", stride] if stride else []))
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["window"]["max_length"] == 64  # the run's data.seq_len, by default
        scored[stride] = report["domains"][0]["bpb"]
    assert scored["disjoint"] == pytest.approx(lm_eval_bpb, abs=1e-4)
    # Overlapping windows give each later token more context than lm-eval's disjoint ones.
    assert scored[None] < scored["disjoint"]


def test_window_options_are_checked(two_stage: dict[str, Path], tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "one.jsonl", [PROSE[0]])
    final = str(two_stage["final2"])
    for args, message in [(["--max-length", "0"], "--max-length 0: must be positive"),
                          (["--max-length", "129"], "above the model's context of 128"),
                          (["--stride", "sideways"], "--stride sideways: must be"),
                          (["--max-length", "32", "--stride", "33"], "--stride 33")]:
        result = runner.invoke(app, ["eval", final, "--data", f"d={data}", *args])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    # The run's start figures were scored in 64-token windows: other windows do not compare.
    result = runner.invoke(app, ["eval", final, "--max-length", "32"])
    assert result.exit_code == 2 and "--base" in result.output, result.output


def test_the_plot_marks_a_scheduled_runs_phase_boundaries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval events' `phase` (steps A-B) gives the boundaries: a dotted line where a phase
    an evaluation saw begins, none for a run without phases."""
    import matplotlib.axes

    from cpt_cli.evaluation.plotting import phase_boundaries, plot_run

    def run_with(phases: list[str | None]) -> Path:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        events = [{"event": "eval", "step": 25 * i, "tokens": 100 * i,
                   "domains": {"code": {"role": "target", "bpb": 2.0 - i / 10}}}
                  | ({"phase": p} if p else {}) for i, p in enumerate(phases)]
        events.insert(1, {"event": "train", "step": 10, "loss": 3.0})
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        return run

    lines: list[float] = []
    original = matplotlib.axes.Axes.axvline

    def axvline(self: matplotlib.axes.Axes, x: float = 0, *args: object, **kwargs: object):
        lines.append(x)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", axvline)
    report = {"domains": [{"name": "code", "role": "target"}]}
    scheduled = run_with(["steps 0-60", "steps 0-60", "steps 0-60", "steps 60-80",
                          "steps 80-100"])
    assert phase_boundaries(scheduled) == [60, 80]
    plot_run(scheduled, report, tmp_path / "scheduled.png")
    assert lines == [60, 80]
    assert (tmp_path / "scheduled.png").read_bytes()[:4] == b"\x89PNG"
    lines.clear()
    plot_run(run_with([None, None, None]), report, tmp_path / "constant.png")
    assert lines == []
