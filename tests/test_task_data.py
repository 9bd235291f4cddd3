"""Task data inside pre-training (issue #14): prompt/completion and chat records, the trained
spans the cache keeps beside the tokens, labels of -100 outside them in both packing modes and
across sequence boundaries, and the cache key that follows loss_on and the templates."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from cpt_cli.config import SourceConfig, recipe_from_config
from cpt_cli.data import cache as cache_module
from cpt_cli.data.cache import prepare_source
from cpt_cli.data.loader import PackedLoader
from cpt_cli.data.packing import PAD_LABEL, BestFitStream, ConcatStream, TrainedSpans
from cpt_cli.data.prepare import batch_geometry, plan_data, prepare_data
from cpt_cli.data.tokenization import load_tokenizer, tokenizer_fingerprint

EOS, PAD, L = 1, 0, 32
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128}


# ---------------------------------------------------------------- packing on synthetic tokens


def masked_token_file(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents whose trained tokens are odd ids and untrained ones even ids (never EOS or
    PAD), so every label can be checked from its token alone: a prompt then a completion, or a
    conversation of several turns that ends untrained. Lengths are never a multiple of L, so an
    EOS is never alone in a best_fit chunk. Returns tokens, offsets and the trained spans."""
    rng = np.random.default_rng(seed)
    docs, spans, start = [], [], 0
    for d in range(40):
        parts = [(int(rng.integers(1, 45)), False), (int(rng.integers(1, 12)), True)]
        if d % 3 == 0:  # a conversation: more turns, ending on an untrained one
            parts += [(int(rng.integers(1, 6)), False), (int(rng.integers(1, 9)), True),
                      (int(rng.integers(1, 4)), False)]
        if sum(n for n, _ in parts) % L == 0:
            parts[0] = (parts[0][0] + 1, False)
        ids = []
        for n, trained in parts:
            values = rng.integers(5, 250, n) * 2 + (1 if trained else 0) + 10
            if trained:
                spans.append((start + len(ids), start + len(ids) + n))
            ids.extend(values.tolist())
        docs.append(ids)
        start += len(ids)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return (np.concatenate(docs).astype(np.uint16), offsets,
            np.asarray(spans, dtype=np.int64))


def expected_label(token: int, before: int | None) -> int:
    """The label a token must have: itself when trained (odd), -100 when not (even); an EOS is
    trained when the token it ends is (`before`: the token preceding it)."""
    if token == EOS:
        assert before is not None
        return EOS if before % 2 == 1 else PAD_LABEL
    return token if token % 2 == 1 else PAD_LABEL


def streams() -> list[Any]:
    tokens, offsets, spans = masked_token_file()
    trained = TrainedSpans(spans, offsets)
    ids = np.arange(len(offsets) - 1)
    return [ConcatStream("qa", tokens, offsets, ids, EOS, L, 3, trained),
            BestFitStream("qa", tokens, offsets, ids, EOS, PAD, L, 3, trained)]


@pytest.mark.parametrize("kind", [0, 1], ids=["concat", "best_fit"])
def test_labels_are_masked_at_exactly_the_untrained_positions(kind: int) -> None:
    stream = streams()[kind]
    sequences = int(stream.sequences_per_epoch * 2)  # two epochs: reshuffled documents too
    previous_last: int | None = None
    split_with_trained_tail = 0
    for i in range(sequences):
        seq = stream.sequence(i)
        real = len(seq.input_ids) - seq.padding
        for p in range(real):
            token = int(seq.input_ids[p])
            before = int(seq.input_ids[p - 1]) if p else previous_last
            assert seq.labels[p] == expected_label(token, before), (i, p)
        assert (seq.labels[real:] == PAD_LABEL).all()
        # A document cut by the previous sequence whose continuation holds trained tokens.
        if kind == 0 and 0 in seq.continued and (seq.labels[:seq.doc_starts[0] if seq.doc_starts
                                                             else L] != PAD_LABEL).any():
            split_with_trained_tail += 1
        assert stream.label_tokens(i) == int((seq.labels[1:] != PAD_LABEL).sum()), i
        previous_last = int(seq.input_ids[-1])
    if kind == 0:
        assert split_with_trained_tail > 3  # the case this test is about did occur


def test_unmasked_streams_are_unchanged_by_the_masking_code() -> None:
    tokens, offsets, _ = masked_token_file()
    ids = np.arange(len(offsets) - 1)
    for stream in (ConcatStream("a", tokens, offsets, ids, EOS, L, 3),
                   BestFitStream("a", tokens, offsets, ids, EOS, PAD, L, 3)):
        for i in range(10):
            seq = stream.sequence(i)
            real = len(seq.input_ids) - seq.padding
            assert (seq.labels[:real] == seq.input_ids[:real]).all()
            assert stream.label_tokens(i) == int((seq.labels[1:] != PAD_LABEL).sum())


def test_trained_span_counts_match_a_brute_force_count() -> None:
    tokens, offsets, spans = masked_token_file(seed=4)
    trained = TrainedSpans(spans, offsets)
    truth = np.zeros(len(tokens), dtype=bool)
    for a, b in spans:
        truth[a:b] = True
    rng = random.Random(0)
    for _ in range(500):
        a = rng.randrange(len(tokens))
        b = rng.randrange(a, len(tokens) + 1)
        assert int(trained.count(a, b)) == int(truth[a:b].sum())
        assert (trained.mask(a, b) == truth[a:b]).all()
    firsts = trained.first_trained(offsets)
    for d in range(len(offsets) - 1):
        where = np.flatnonzero(truth[offsets[d]:offsets[d + 1]])
        assert firsts[d] == where[0]
        assert trained.last_trained[d] == truth[offsets[d + 1] - 1]


# ------------------------------------------------------------- the cache, with a real tokenizer


QA = [{"question": f"What is {i} times {i % 7 + 2}?", "answer": f"It is {i * (i % 7 + 2)}.",
       "prompt": f"Q{i}: name colour {i}.\nA:", "completion": f" colour {['red', 'blue'][i % 2]}"}
      for i in range(60)]


@pytest.fixture
def tokenizer(tiny_tokenizer: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(tiny_tokenizer))


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


def prepare(tmp_path: Path, tok: PreTrainedTokenizerBase, **source: Any) -> Any:
    config = SourceConfig(name="qa", **({"path": "qa.jsonl", "format": "prompt_completion",
                                         "loss_on": "completion"} | source))
    return prepare_source(config, tmp_path, tok, tokenizer_fingerprint(tok), tmp_path / "cache",
                          pool_tokens=200)


def encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_tokens_and_spans(tmp_path: Path, qa_file: Path,
                                            tokenizer: PreTrainedTokenizerBase) -> None:
    entry = prepare(tmp_path, tokenizer)
    assert entry.num_documents == len(QA)
    spans = entry.spans.tolist()
    assert len(spans) == len(QA)  # one completion each
    for d, record in enumerate(QA):
        prompt, completion = encode(tokenizer, record["prompt"]), \
            encode(tokenizer, record["completion"])
        a, b = int(entry.offsets[d]), int(entry.offsets[d + 1])
        assert entry.tokens[a:b].tolist() == prompt + completion
        assert spans[d] == [a + len(prompt), b]  # exactly the completion's tokens
    assert entry.meta["trained_tokens"] == sum(b - a for a, b in spans)


def test_template_cuts_at_the_completion_and_moves_the_space(
        tmp_path: Path, qa_file: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    entry = prepare(tmp_path, tokenizer, template="Question: {question}\nAnswer: {answer}",
                    completion_field="answer")
    pool = {p["index"]: p for p in entry.pool()}
    some = next(iter(pool.values()))
    record = QA[some["index"]]
    prompt_text = f"Question: {record['question']}\nAnswer:"
    assert some["text"] == prompt_text + f" {record['answer']}"
    # Lengths into the text: the prompt, then the answer with the space moved to it.
    assert some["segments"] == [[len(prompt_text), False], [len(record["answer"]) + 1, True]]
    prompt = encode(tokenizer, f"Question: {record['question']}\nAnswer:")
    a = int(entry.offsets[some["index"]])
    span = entry.spans[some["index"]].tolist()
    assert span[0] == a + len(prompt)


def test_loss_on_all_trains_everything_with_the_same_tokens(
        tmp_path: Path, qa_file: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    masked = prepare(tmp_path, tokenizer)
    plain = prepare(tmp_path, tokenizer, loss_on="all")
    assert plain.key != masked.key
    assert plain.spans is None and masked.spans is not None
    assert plain.tokens.tolist() == masked.tokens.tolist()


def count_tokenizations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = cache_module._tokenize_into

    def counting(folder: Path, source: SourceConfig, *args: Any, **kwargs: Any) -> Any:
        calls.append(source.loss_on)
        return original(folder, source, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_tokenize_into", counting)
    return calls


def test_cache_is_rebuilt_when_loss_on_or_template_changes_and_not_otherwise(
        tmp_path: Path, qa_file: Path, tokenizer: PreTrainedTokenizerBase,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_tokenizations(monkeypatch)
    first = prepare(tmp_path, tokenizer)
    assert calls == ["completion"]
    # Settings that do not change the tokens or the mask: the same entry.
    assert prepare(tmp_path, tokenizer, weight=3.0, max_epochs=2.0).key == first.key
    assert len(calls) == 1
    prepare(tmp_path, tokenizer, loss_on="all")
    assert len(calls) == 2
    templated = prepare(tmp_path, tokenizer, template="Q: {question}\nA: {answer}",
                        completion_field="answer")
    assert len(calls) == 3
    other = prepare(tmp_path, tokenizer, template="Question: {question}\nA: {answer}",
                    completion_field="answer")
    assert len(calls) == 4 and other.key != templated.key
    prepare(tmp_path, tokenizer, template="Q: {question}\nA: {answer}",
            completion_field="answer")
    assert len(calls) == 4  # back to a template seen before: its entry is there


# ------------------------------------------------------------ end to end: prepare, plan, loader


def task_recipe(tmp: Path, tokenizer: Path, packing: str, seq_len: int = 48) -> Any:
    rng = random.Random(2)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma"]
    (tmp / "qa.jsonl").write_text("".join(json.dumps({
        "question": " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))),
        "answer": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}) + "\n"
        for _ in range(150)))
    (tmp / "prose.jsonl").write_text("".join(json.dumps({
        "text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 60)))}) + "\n"
        for _ in range(150)))
    return recipe_from_config({
        "name": "task", "seed": 5,
        "model": {"init": {"config": TINY_LLAMA}, "tokenizer": str(tokenizer)},
        "data": {"seq_len": seq_len, "cache_dir": str(tmp / "cache"), "packing": packing,
                 "holdout": {"tokens": 300}, "max_epochs": 100,
                 "sources": [{"name": "prose", "path": "prose.jsonl"},
                             {"name": "qa", "path": "qa.jsonl", "format": "prompt_completion",
                              "template": "Q: {question}\nA: {answer}",
                              "completion_field": "answer", "loss_on": "completion"}]},
        "train": {"steps": 12, "global_batch_size": 8, "micro_batch_size": 2}}, base_dir=tmp)


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_loader_masks_exactly_the_prompts(tmp_path: Path, tiny_tokenizer: Path,
                                          packing: str) -> None:
    r = task_recipe(tmp_path, tiny_tokenizer, packing)
    data = plan_data(r, prepare_data(r))
    qa = next(d for d in data.domains if d.name == "qa")
    truth = np.zeros(qa.entry.num_tokens, dtype=bool)
    for a, b in qa.entry.spans:
        truth[a:b] = True
    # Every trained token is an answer's: the prompt's tokens are never trained.
    tok = data.tokenizer
    answer_ids = {tuple(encode(tok, " " + json.loads(line)["answer"]))
                  for line in (tmp_path / "qa.jsonl").read_text().splitlines()}
    for a, b in qa.entry.spans:
        assert tuple(qa.entry.tokens[a:b].tolist()) in answer_ids
    _, accum, _ = batch_geometry(r, 1)
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=2, grad_accum=accum)
    qa_index = [d.name for d in data.domains].index("qa")
    masked_rows = with_prompt = 0
    for step, batches in loader.iter_steps():
        assert loader.step_label_tokens(step) == sum(b.label_tokens for b in batches)
        for b in batches:
            for row in range(len(b.sources)):
                labels = b.labels[row]
                if b.sources[row] != qa_index:
                    continue
                masked_rows += 1
                kept = labels != PAD_LABEL
                assert (labels[kept] == b.input_ids[row][kept]).all()
                with_prompt += int((~kept).any())
    assert masked_rows > 10 and with_prompt > 0.8 * masked_rows
    row = next(s for s in data.plan.as_dict()["sources"] if s["name"] == "qa")
    assert 0 < row["tokens_trained_planned"] < 0.6 * row["tokens_planned"]


def test_a_prompt_longer_than_the_sequence_is_counted_and_left_out(
        tmp_path: Path, tiny_tokenizer: Path) -> None:
    r = task_recipe(tmp_path, tiny_tokenizer, "best_fit", seq_len=24)
    data = plan_data(r, prepare_data(r))
    qa = next(d for d in data.domains if d.name == "qa")
    trained = TrainedSpans(qa.entry.spans, qa.entry.offsets)
    lead = trained.first_trained(qa.entry.offsets)[qa.train_docs]
    too_long = int((lead >= 24).sum())
    assert too_long > 0
    row = next(s for s in data.plan.sources if s.name == "qa")
    assert row.beyond_seq_len == too_long
    assert row.documents == len(qa.train_docs) - too_long
    assert any("left out of training" in w and "'qa'" in w for w in data.plan.warnings)


# ------------------------------------------------------------------------- recipe checks


def test_every_bad_combination_is_named_at_once(tmp_path: Path) -> None:
    from cpt_cli.errors import RecipeError

    sources = [
        {"name": "a", "path": "a.jsonl", "loss_on": "completion"},
        {"name": "b", "path": "b.jsonl", "format": "prompt_completion", "loss_on": "assistant"},
        {"name": "c", "path": "c.jsonl", "format": "chat", "template": "{text}"},
        {"name": "d", "path": "d.jsonl", "chat_template": "{{ messages }}"},
        {"name": "e", "path": "e.jsonl", "format": "prompt_completion",
         "template": "Q: {question}"},
        {"name": "f", "path": "f.jsonl", "format": "chat", "chat_template": "{% for m in %}"},
    ]
    with pytest.raises(RecipeError) as info:
        recipe_from_config({"name": "bad", "model": {"path": "m"},
                            "data": {"sources": sources}, "train": {"steps": 1}},
                           base_dir=tmp_path)
    text = str(info.value)
    for needle in ("data.sources[0].loss_on: 'completion'", "set format: prompt_completion",
                   "data.sources[1].loss_on: 'assistant'", "use loss_on: completion",
                   "data.sources[2].template: chat records",
                   "data.sources[3].chat_template: only chat records",
                   "data.sources[4].template: a prompt_completion template holds the "
                   "completion field {completion}",
                   "data.sources[5].chat_template: not a valid Jinja template"):
        assert needle in text, needle


# ------------------------------------------------------------------- scoring on the answers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory,
               random_llama: Callable[[Path, int], Path]) -> Path:
    """A randomly initialized 2-layer Llama with the tiny tokenizer, saved as a model folder."""
    return random_llama(tmp_path_factory.mktemp("model"), 0)


def independent_answer_score(model_dir: Path, records: list[dict[str, str]]
                             ) -> tuple[float, int, int]:
    """lm-evaluation-harness's loglikelihood by hand: whitespace ending the prompt moves to the
    completion; one forward over [BOS] + prompt + completion; -log p summed over the
    completion's tokens; its UTF-8 bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll, tokens, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for r in records:
            context, continuation = r["prompt"], r["completion"]
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
            x = torch.tensor([[start] + ctx + cont])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
            logp = logp[len(ctx):]  # the positions predicting the continuation
            nll -= float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
            tokens += len(cont)
            nbytes += len(continuation.encode("utf-8"))
    return nll, tokens, nbytes


def test_eval_of_a_completion_domain_equals_an_independent_computation(
        tiny_model: Path, tmp_path: Path, cli: Any) -> None:
    import math

    records = [{"prompt": "Question: what colour is the sky?\nAnswer: ",
                "completion": "blue, on a clear day."},
               {"prompt": "Q: naïve café?\nA:", "completion": " ünïcode — answered."},
               {"prompt": "Translate 'river' to French.", "completion": "\nrivière"}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = cli("eval", tiny_model, "--data", f"qa={data}", "--base", tiny_model,
                 "--max-length", "128", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["domains"]
    nll, tokens, nbytes = independent_answer_score(tiny_model, records)
    assert row["scored_on"] == "answers"
    assert row["tokens"] == tokens and row["bytes"] == nbytes
    assert row["bpb"] == pytest.approx(nll / (nbytes * math.log(2)), rel=1e-6, abs=1e-6)
    assert row["loss"] == pytest.approx(nll / tokens, rel=1e-6, abs=1e-6)


def test_held_out_sets_record_prompt_and_completion(tmp_path: Path, tiny_tokenizer: Path
                                                    ) -> None:
    r = task_recipe(tmp_path, tiny_tokenizer, "concat")
    data = prepare_data(r)
    qa = next(d for d in data.domains if d.name == "qa")
    records = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    pairs = {(f"Q: {x['question']}\nA:", f" {x['answer']}") for x in records}
    assert qa.heldout
    for h in qa.heldout:
        (prompt, p_trained), (completion, c_trained) = h["segments"]
        assert (prompt, completion) in pairs and not p_trained and c_trained
        assert h["text"] == prompt + completion
    by_name = {d.name: d for d in data.eval_domains}
    assert by_name["qa"].scored_on_answers and not by_name["prose"].scored_on_answers


# ------------------------------------------------------------------------------ chat records


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# The same words from the user and twice from the assistant: searching the rendering for the
# reply's text would mark the user's "yes" too, or the first "yes" twice.
CONVERSATIONS = [[{"role": "system", "content": "Answer yes or no."},
                  {"role": "user", "content": "yes"},
                  {"role": "assistant", "content": "yes"},
                  {"role": "user", "content": "Again?"},
                  {"role": "assistant", "content": "yes"}],
                 [{"role": "user", "content": "Is water wet?"},
                  {"role": "assistant", "content": "It is, mostly."},
                  {"role": "user", "content": "Thanks."}]]


def chat_entry(tmp_path: Path, tok: PreTrainedTokenizerBase, **source: Any) -> Any:
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n"
                                                 for c in CONVERSATIONS * 10))
    config = SourceConfig(name="chat", **({"path": "chat.jsonl", "format": "chat",
                                           "loss_on": "assistant",
                                           "chat_template": CHAT_TEMPLATE} | source))
    return prepare_source(config, tmp_path, tok, tokenizer_fingerprint(tok), tmp_path / "cache",
                          pool_tokens=200)


def test_chat_trains_exactly_the_assistant_turns(tmp_path: Path,
                                                 tokenizer: PreTrainedTokenizerBase) -> None:
    entry = chat_entry(tmp_path, tokenizer)
    for d, conversation in enumerate(CONVERSATIONS):
        a, b = int(entry.offsets[d]), int(entry.offsets[d + 1])
        spans = [(s, e) for s, e in entry.spans.tolist() if a <= s < b]
        replies = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert len(spans) == len(replies)
        for (s, e), reply in zip(spans, replies, strict=True):
            # The reply and its end-of-turn markup, tokenized on their own.
            assert entry.tokens[s:e].tolist() == encode(tokenizer, reply + "<|end|>\n")
        untrained = np.ones(b - a, dtype=bool)
        for s, e in spans:
            untrained[s - a:e - a] = False
        rendered = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in conversation)
        assert tokenizer.decode(entry.tokens[a:b].tolist()) == rendered
        # The user's "yes" and every header stay untrained.
        first_user = next(m["content"] for m in conversation if m["role"] == "user")
        assert f"<|user|>{first_user}<|end|>" in \
            tokenizer.decode(entry.tokens[a:b][untrained].tolist())


def test_chat_cache_follows_the_template(tmp_path: Path, tokenizer: PreTrainedTokenizerBase,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_tokenizations(monkeypatch)
    first = chat_entry(tmp_path, tokenizer)
    assert chat_entry(tmp_path, tokenizer, weight=2.0).key == first.key and len(calls) == 1
    other = chat_entry(tmp_path, tokenizer, chat_template=CHAT_TEMPLATE.replace("<|end|>", "</s>"))
    assert other.key != first.key and len(calls) == 2
    chat_entry(tmp_path, tokenizer, loss_on="all")
    assert len(calls) == 3


def test_chat_without_any_template_names_both_fixes(tmp_path: Path,
                                                    tokenizer: PreTrainedTokenizerBase) -> None:
    from cpt_cli.errors import DataError

    assert not tokenizer.chat_template
    with pytest.raises(DataError, match="chat_template.*model.tokenizer"):
        chat_entry(tmp_path, tokenizer, chat_template=None)
    assert not (tmp_path / "cache" / "tokens").exists() or \
        not list((tmp_path / "cache" / "tokens").iterdir())
