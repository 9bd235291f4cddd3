"""The loader: disjoint sequences per process that together make the one-process global batch (in
a loader built per rank and in a real 2-process `accelerate launch`), resuming at a step equal to
never stopping, and a state that is the plan's fingerprint plus the sequences consumed."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cpt_cli.config import recipe_from_config
from cpt_cli.data.loader import PackedLoader
from cpt_cli.data.prepare import PreparedData, plan_data, prepare_data

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128}


def write_sources(tmp: Path) -> None:
    rng = random.Random(0)
    for name, n in (("web", 90), ("code", 60), ("old", 70)):
        with open(tmp / f"{name}.jsonl", "w") as fh:
            for i in range(n):
                words = " ".join(f"{name}{rng.randint(0, 999)}" for _ in range(rng.randint(5, 40)))
                fh.write(json.dumps({"text": f"{i} {words}"}) + "\n")


def recipe_dict(tmp: Path, tokenizer: Path, **data: Any) -> dict[str, Any]:
    return {"name": "loader", "seed": 3,
            "model": {"init": {"config": TINY_LLAMA}, "tokenizer": str(tokenizer)},
            "data": {"seq_len": 32, "cache_dir": str(tmp / "cache"), "holdout": {"tokens": 100},
                     "sources": [{"name": "web", "path": "web.jsonl", "weight": 0.6},
                                 {"name": "code", "path": "code.jsonl", "weight": 0.4}],
                     "replay": {"ratio": 0.25, "sources": [{"name": "old",
                                                            "path": "old.jsonl"}]},
                     "max_epochs": 100} | data,
            "train": {"steps": 12, "global_batch_size": 8, "micro_batch_size": 2}}


def planned(tmp: Path, tokenizer: Path, processes: int = 1, **data: Any) -> PreparedData:
    r = recipe_from_config(recipe_dict(tmp, tokenizer, **data), base_dir=tmp)
    return plan_data(r, prepare_data(r), processes)


def make_loader(data: PreparedData, processes: int, rank: int, micro: int = 2,
                **kwargs: Any) -> PackedLoader:
    accum = data.global_batch // (micro * processes)
    return PackedLoader(data.plan, data.streams, micro_batch_size=micro, grad_accum=accum,
                        num_processes=processes, rank=rank, **kwargs)


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    write_sources(tmp_path)
    return tmp_path


def test_two_processes_see_disjoint_sequences_making_the_global_batch(
        sources: Path, tiny_tokenizer: Path) -> None:
    data = planned(sources, tiny_tokenizer)
    single = make_loader(data, 1, 0)
    ranks = [make_loader(data, 2, r) for r in (0, 1)]
    assert single.steps == ranks[0].steps == 12
    for step in range(single.steps):
        one = [i for a in range(single.accum) for i in single.sequence_indices(step, a)]
        per_rank = [[i for a in range(ld.accum) for i in ld.sequence_indices(step, a)]
                    for ld in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(one) == \
            list(range(step * 8, step * 8 + 8))
        # And the data itself: the rows of both ranks are the rows of the one process.
        rows_one = {i: r for a in range(single.accum) for i, r in zip(
            single.sequence_indices(step, a), single.micro_batch(step, a).input_ids, strict=True)}
        for ld in ranks:
            for a in range(ld.accum):
                batch = ld.micro_batch(step, a)
                for i, row in zip(ld.sequence_indices(step, a), batch.input_ids, strict=True):
                    assert torch.equal(row, rows_one[i])


def test_resume_at_a_step_yields_the_same_batches(sources: Path, tiny_tokenizer: Path) -> None:
    data = planned(sources, tiny_tokenizer)
    uninterrupted = list(make_loader(data, 1, 0).iter_steps(0))
    k = 5
    state = make_loader(data, 1, 0).state(k)
    assert state == {"plan": data.plan.fingerprint(), "sequences_consumed": k * 8}
    # A new process: everything rebuilt from the recipe (caches read again, streams fresh).
    again = planned(sources, tiny_tokenizer)
    assert again.plan.fingerprint() == state["plan"]
    resumed = make_loader(again, 1, 0)
    start = state["sequences_consumed"] // resumed.global_batch
    got = list(resumed.iter_steps(start))
    assert [s for s, _ in got] == list(range(k, 12))
    for (step, batches), (step_u, batches_u) in zip(got, uninterrupted[k:], strict=True):
        assert step == step_u
        for mb, mb_u in zip(batches, batches_u, strict=True):
            assert torch.equal(mb.input_ids, mb_u.input_ids)
            assert torch.equal(mb.labels, mb_u.labels)
            assert torch.equal(mb.position_ids, mb_u.position_ids)
            assert np.array_equal(mb.sources, mb_u.sources)


def test_resume_with_two_processes(sources: Path, tiny_tokenizer: Path) -> None:
    data = planned(sources, tiny_tokenizer, processes=2)
    for rank in (0, 1):
        full = list(make_loader(data, 2, rank).iter_steps(0))
        tail = list(make_loader(planned(sources, tiny_tokenizer, processes=2), 2, rank)
                    .iter_steps(7))
        for (_, a), (_, b) in zip(full[7:], tail, strict=True):
            assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))


def test_fingerprint_follows_the_data_section(sources: Path, tiny_tokenizer: Path) -> None:
    base = planned(sources, tiny_tokenizer).plan.fingerprint()
    assert planned(sources, tiny_tokenizer).plan.fingerprint() == base
    changed = {
        "weights": {"sources": [{"name": "web", "path": "web.jsonl", "weight": 0.5},
                                {"name": "code", "path": "code.jsonl", "weight": 0.5}]},
        "seq_len": {"seq_len": 16},
        "packing": {"packing": "best_fit"},
        "replay": {"replay": {"ratio": 0.5, "sources": [{"name": "old", "path": "old.jsonl"}]}},
        "holdout": {"holdout": {"tokens": 300}},
        "buffer": {"replay": {"ratio": 0.25, "buffer_tokens": 500,
                              "sources": [{"name": "old", "path": "old.jsonl"}]}},
    }
    prints = {name: planned(sources, tiny_tokenizer, **data).plan.fingerprint()
              for name, data in changed.items()}
    assert base not in prints.values() and len(set(prints.values())) == len(prints)
    # Content: the same number of documents and tokens, different text.
    text = (sources / "code.jsonl").read_text()
    (sources / "code.jsonl").write_text(text.replace("code1", "code2"))
    assert planned(sources, tiny_tokenizer).plan.fingerprint() != base
    (sources / "code.jsonl").write_text(text)
    # The global batch: the same sequences split into other steps.
    r = recipe_dict(sources, tiny_tokenizer)
    r["train"] = {"steps": 6, "global_batch_size": 16, "micro_batch_size": 2}
    other = recipe_from_config(r, base_dir=sources)
    data = plan_data(other, prepare_data(other))
    assert data.plan.total_sequences == 96 and data.plan.fingerprint() != base


def test_position_ids_and_label_tokens(sources: Path, tiny_tokenizer: Path) -> None:
    data = planned(sources, tiny_tokenizer)
    masked = make_loader(data, 1, 0).micro_batch(3, 1)
    plain = make_loader(data, 1, 0, document_masking=False).micro_batch(3, 1)
    assert torch.equal(masked.input_ids, plain.input_ids)
    assert torch.equal(plain.position_ids, torch.arange(32).expand(2, 32))
    assert masked.position_ids[:, 0].tolist() == [0, 0]
    loader = make_loader(data, 1, 0)
    restarts = sum(int((mb.position_ids[:, 1:] == 0).sum()) for _, batches in
                   loader.iter_steps(0) for mb in batches)
    assert restarts > 10  # documents start inside rows, and their positions restart there
    assert masked.label_tokens == 2 * 31
    best = planned(sources, tiny_tokenizer, packing="best_fit")
    loader = make_loader(best, 1, 0)
    total = 0
    for a in range(loader.accum):
        mb = loader.micro_batch(2, a)
        assert mb.label_tokens == int((mb.labels[:, 1:] != -100).sum())
        total += mb.label_tokens
    assert loader.step_label_tokens(2) == total
    assert best.plan.packing == "best_fit"


SCRIPT = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from cpt_cli.config import load_recipe
    from cpt_cli.data.loader import PackedLoader
    from cpt_cli.data.prepare import batch_geometry, plan_data, prepare_data

    accelerator = Accelerator(cpu=True)
    recipe = load_recipe(sys.argv[1])
    P, rank = accelerator.num_processes, accelerator.process_index
    with accelerator.main_process_first():
        data = plan_data(recipe, prepare_data(recipe), P)
    _, accum, _ = batch_geometry(recipe, P)
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=2, grad_accum=accum,
                          num_processes=P, rank=rank)
    seen = {}
    for step, batches in loader.iter_steps(0):
        for a, mb in enumerate(batches):
            for i, row in zip(loader.sequence_indices(step, a), mb.input_ids.tolist()):
                seen[i] = row
    with open(f"{sys.argv[2]}/rank{rank}.json", "w") as fh:
        json.dump({"processes": P, "plan": data.plan.fingerprint(), "seen": seen}, fh)
""")


@pytest.mark.slow
def test_real_two_process_launch_sees_disjoint_data(sources: Path, tiny_tokenizer: Path) -> None:
    import yaml

    (sources / "script.py").write_text(SCRIPT)
    recipe = sources / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(sources, tiny_tokenizer)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port),
           str(sources / "script.py"), str(recipe), str(sources)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((sources / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]  # a real group, not two lone processes
    seen = [{int(i): row for i, row in r["seen"].items()} for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    data = planned(sources, tiny_tokenizer, processes=2)
    assert ranks[0]["plan"] == ranks[1]["plan"] == data.plan.fingerprint()
    assert sorted(set(seen[0]) | set(seen[1])) == list(range(data.plan.total_sequences))
    # Each rank's rows are exactly the one-process loader's rows for those sequence numbers.
    single = make_loader(planned(sources, tiny_tokenizer), 1, 0)
    for step in range(single.steps):
        for a in range(single.accum):
            batch = single.micro_batch(step, a)
            for i, row in zip(single.sequence_indices(step, a), batch.input_ids.tolist(),
                              strict=True):
                assert (seen[0].get(i) or seen[1][i]) == row
