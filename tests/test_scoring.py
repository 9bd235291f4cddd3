"""cpt_cli.evaluation.scoring: exact per-document scoring, windows, batching, bootstrap."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cpt_cli.evaluation.scoring import (
    DocumentScores,
    DomainMetrics,
    bootstrap_delta_bpb,
    rolling_windows,
    score_documents,
    start_token_id,
)

# Set before transformers (and so huggingface_hub, which reads it at import) is imported:
# transformers is imported inside the helpers below, never at module level.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Continued pre-training adapts a language model to a new domain.",
    "naïve café — ünïcode text with accents and dashes.",
    "def f(x):\n    return x * 2 + 1\n",
    "Forgetting is measured in bits per byte on held-out documents.",
] * 4

DOCS = [
    "The quick brown fox.",
    "naïve café — ünïcode",
    "def f(x):\n    return x * 2 + 1\n",
    "Bits per byte on held-out documents, scored one at a time.",
    "",
]


def make_tokenizer(bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    specials = [t for t, keep in (("<s>", bos), ("</s>", eos)) if keep] + ["<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if bos else None,
        eos_token="</s>" if eos else None,
        pad_token="<pad>",
    )


def make_model(vocab_size: int, max_positions: int = 64, seed: int = 0) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    model = LlamaForCausalLM(config)
    # Larger-than-default weights make the predictions far from uniform, so a wrong
    # context or position changes the figures visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_model(len(tokenizer))


def reference_nll(model: LlamaForCausalLM, start: int, ids: list[int]) -> float:
    """One plain forward pass over [start] + ids; sum of -log p(ids[i] | prefix)."""
    if not ids:
        return 0.0
    inputs = torch.tensor([[start, *ids[:-1]]])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(-logp[torch.arange(len(ids)), torch.tensor(ids)].sum())


def assert_scores_close(a: DocumentScores, b: DocumentScores, rtol: float = 1e-5) -> None:
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.bytes, b.bytes)
    np.testing.assert_allclose(a.nll, b.nll, rtol=rtol, atol=1e-6)


# (1) hand-checked example ------------------------------------------------------------


def test_matches_plain_per_document_loop(model, tokenizer) -> None:
    scores = score_documents(model, tokenizer, DOCS)
    start = tokenizer.bos_token_id
    for i, text in enumerate(DOCS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert scores.tokens[i] == len(ids)
        if ids:
            assert scores.bytes[i] == len(text.encode("utf-8"))
            assert scores.nll[i] == pytest.approx(reference_nll(model, start, ids), rel=1e-5)
        else:  # empty documents are skipped entirely
            assert scores.bytes[i] == 0 and scores.nll[i] == 0.0

    # the non-ASCII text has more bytes than characters: bpb must use bytes
    assert scores.bytes[1] == len("naïve café — ünïcode".encode()) > len(DOCS[1])
    totals = scores.totals()
    assert totals.tokens == int(scores.tokens.sum())
    assert totals.bytes == sum(len(t.encode("utf-8")) for t in DOCS)
    assert totals.bpb == pytest.approx(totals.nll / (totals.bytes * math.log(2)), rel=1e-12)
    assert totals.loss == pytest.approx(totals.nll / totals.tokens, rel=1e-12)
    assert totals.ppl == pytest.approx(math.exp(totals.loss), rel=1e-12)
    single = DocumentScores(scores.nll[1:2], scores.tokens[1:2], scores.bytes[1:2]).totals()
    assert single.bpb == pytest.approx(
        scores.nll[1] / (len(DOCS[1].encode("utf-8")) * math.log(2)), rel=1e-12
    )


def test_start_token_falls_back_to_eos_then_errors(model) -> None:
    eos_only = make_tokenizer(bos=False, eos=True)
    assert start_token_id(eos_only) == eos_only.eos_token_id
    text = "The quick brown fox."
    ids = eos_only(text, add_special_tokens=False)["input_ids"]
    got = score_documents(model, eos_only, [text])
    assert got.nll[0] == pytest.approx(reference_nll(model, eos_only.eos_token_id, ids), rel=1e-5)
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        score_documents(model, make_tokenizer(bos=False, eos=False), [text])


def test_domain_metrics_edge_cases() -> None:
    assert math.isnan(DomainMetrics(0.0, 0, 0).loss)
    assert math.isnan(DomainMetrics(0.0, 0, 0).bpb)
    assert DomainMetrics(1e6, 1, 1).ppl == math.inf
    empty = score_documents(make_model(8), make_tokenizer(), [])
    assert len(empty) == 0 and empty.totals().tokens == 0


def test_restores_training_mode_and_reports_progress(model, tokenizer) -> None:
    model.train()
    seen: list[int] = []
    scores = score_documents(model, tokenizer, DOCS, batch_tokens=16, progress=seen.append)
    assert model.training
    model.eval()
    assert len(seen) > 1 and sum(seen) == int(scores.tokens.sum())


# (2) batching / padding / order invariance ------------------------------------------


def test_batching_and_order_invariance(model, tokenizer) -> None:
    docs = DOCS + [CORPUS[i] * (1 + i % 3) for i in range(6)]
    big = score_documents(model, tokenizer, docs, batch_tokens=1 << 16)
    for budget in (1, 7, 40):  # 1: one window per batch, others mix widths with padding
        assert_scores_close(score_documents(model, tokenizer, docs, batch_tokens=budget), big)
    perm = np.random.default_rng(3).permutation(len(docs))
    shuffled = score_documents(model, tokenizer, [docs[i] for i in perm])
    inv = np.argsort(perm)
    assert_scores_close(
        DocumentScores(shuffled.nll[inv], shuffled.tokens[inv], shuffled.bytes[inv]), big
    )


# (3) rolling windows ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "max_length", "stride"),
    [
        (1, 4, 2),
        (4, 4, 2),
        (5, 4, 2),
        (37, 8, 4),
        (37, 8, 1),
        (37, 8, 8),
        (37, 8, 3),
        (10, 1, 1),
        (100, 1000, 500),
    ],
)
def test_rolling_windows_score_each_token_once(n: int, max_length: int, stride: int) -> None:
    counts = np.zeros(n + 1, dtype=int)  # indexed in seq = [start] + tokens coordinates
    windows = rolling_windows(n, max_length, stride)
    for i, w in enumerate(windows):
        assert 0 <= w.begin < w.end <= n and w.end - w.begin <= max_length
        assert 1 <= w.scored <= w.end - w.begin
        if i == 0:
            assert w.begin == 0 and w.scored == w.end - w.begin
        else:
            assert w.end - w.begin == max_length  # later windows are full
            assert w.scored <= stride
            assert w.end - w.begin - w.scored >= max_length - stride  # context
        # targets are seq[begin+1 : end+1]; the scored ones are the last `scored`
        counts[w.end + 1 - w.scored : w.end + 1] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_long_document_over_small_context(model, tokenizer) -> None:
    text = " ".join(CORPUS[:5]) * 2
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 40
    start = tokenizer.bos_token_id

    whole = score_documents(model, tokenizer, [text], max_length=10_000)
    assert whole.tokens[0] == len(ids)
    assert whole.nll[0] == pytest.approx(reference_nll(model, start, ids), rel=1e-5)
    # max_length equal to the document length is still one window
    exact = score_documents(model, tokenizer, [text], max_length=len(ids))
    assert_scores_close(exact, whole)

    small = score_documents(model, tokenizer, [text], max_length=12, stride=5)
    assert small.tokens[0] == len(ids) and small.bytes[0] == whole.bytes[0]
    # independent windowed reference: each token predicted once from at most 11 tokens
    seq = [start, *ids]
    expected = 0.0
    for w in rolling_windows(len(ids), 12, 5):
        inputs = torch.tensor([seq[w.begin : w.end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inputs).logits[0].double(), dim=-1)
        targets = seq[w.begin + 1 : w.end + 1]
        n = w.end - w.begin
        for pos in range(n - w.scored, n):
            expected -= float(logp[pos, targets[pos]])
    assert small.nll[0] == pytest.approx(expected, rel=1e-5)
    # a shorter context predicts worse than the full one, but not absurdly
    assert small.nll[0] != pytest.approx(whole.nll[0], rel=1e-6)

    with pytest.raises(ValueError, match="stride"):
        score_documents(model, tokenizer, [text], max_length=12, stride=13)

    # the default max_length is the model's context (64 positions here)
    default = score_documents(model, tokenizer, [text])
    explicit = score_documents(model, tokenizer, [text], max_length=64, stride=32)
    assert_scores_close(default, explicit)


# (4) bootstrap ----------------------------------------------------------------------


def _synthetic_pair(n: int, seed: int = 1) -> tuple[DocumentScores, DocumentScores]:
    rng = np.random.default_rng(seed)
    n_bytes = rng.integers(200, 2000, size=n)
    tokens = n_bytes // 4
    start_nll = n_bytes * math.log(2) * rng.uniform(0.8, 1.2, size=n)
    now_nll = start_nll * rng.uniform(0.95, 1.15, size=n)
    return DocumentScores(now_nll, tokens, n_bytes), DocumentScores(start_nll, tokens, n_bytes)


def test_bootstrap_interval() -> None:
    now, start = _synthetic_pair(50)
    point = now.totals().bpb - start.totals().bpb
    lo, hi = bootstrap_delta_bpb(now, start, samples=2000, seed=7)
    assert lo < point < hi
    assert (lo, hi) == bootstrap_delta_bpb(now, start, samples=2000, seed=7)
    assert (lo, hi) != bootstrap_delta_bpb(now, start, samples=2000, seed=8)
    narrower = bootstrap_delta_bpb(now, start, samples=200, seed=7, confidence=0.5)
    assert lo < narrower[0] < narrower[1] < hi

    k = 25  # duplicating every document 25 times shrinks the interval by about 5x
    dup_now = DocumentScores(np.tile(now.nll, k), np.tile(now.tokens, k), np.tile(now.bytes, k))
    dup_start = DocumentScores(
        np.tile(start.nll, k), np.tile(start.tokens, k), np.tile(start.bytes, k)
    )
    dlo, dhi = bootstrap_delta_bpb(dup_now, dup_start, samples=2000, seed=7)
    assert dlo < point < dhi
    assert (dhi - dlo) < 0.3 * (hi - lo)


def test_bootstrap_skips_empty_documents_and_checks_pairing() -> None:
    now, start = _synthetic_pair(20)

    def pad(s: DocumentScores) -> DocumentScores:
        return DocumentScores(np.append(s.nll, 0.0), np.append(s.tokens, 0), np.append(s.bytes, 0))

    # an empty (skipped) document is left out of the resampling: same draws, same interval
    assert bootstrap_delta_bpb(pad(now), pad(start), seed=3) == bootstrap_delta_bpb(
        now, start, seed=3
    )
    with pytest.raises(ValueError, match="same documents"):
        bootstrap_delta_bpb(now, _synthetic_pair(21)[1])
    other = DocumentScores(start.nll, start.tokens, start.bytes + 1)
    with pytest.raises(ValueError, match="byte counts differ"):
        bootstrap_delta_bpb(now, other)


# (5) bfloat16 autocast --------------------------------------------------------------


def test_bfloat16_autocast_close_to_fp32(model, tokenizer) -> None:
    docs = [d for d in DOCS if d] + [" ".join(CORPUS[:5])]
    fp32 = score_documents(model, tokenizer, docs, max_length=32).totals()
    bf16 = score_documents(
        model, tokenizer, docs, max_length=32, autocast_dtype=torch.bfloat16
    ).totals()
    assert bf16.tokens == fp32.tokens
    assert abs(bf16.bpb - fp32.bpb) < 1e-2


def test_logits_only_where_tokens_are_scored(model, tokenizer) -> None:
    text = " ".join(CORPUS[:5]) * 2
    widths: list[int] = []
    hook = model.lm_head.register_forward_hook(
        lambda _module, args, _out: widths.append(args[0].shape[1]))
    try:
        kept = score_documents(model, tokenizer, [text], max_length=12, stride=5,
                               batch_tokens=12)
    finally:
        hook.remove()
    # One window per batch: the first scores all 12 positions, every later one its last 5 at
    # most (the last one what is left), so the output layer sees each token once.
    assert widths[0] == 12 and max(widths[1:]) == 5 and sum(widths) == kept.tokens[0]

    class Wrapped(torch.nn.Module):  # a forward without logits_to_keep: every position
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, **kwargs):  # type: ignore[no-untyped-def]
            return self.inner(**kwargs)

    assert_scores_close(score_documents(Wrapped(), tokenizer, [text], max_length=12, stride=5,
                                        batch_tokens=12), kept)


def test_default_window_is_capped_and_disjoint_is_a_whole_window() -> None:
    from transformers import LlamaConfig

    from cpt_cli.evaluation.scoring import DEFAULT_MAX_LENGTH, default_max_length, resolve_window

    assert default_max_length(LlamaConfig(max_position_embeddings=131072)) == DEFAULT_MAX_LENGTH
    assert default_max_length(LlamaConfig(max_position_embeddings=512)) == 512
    assert resolve_window(64, "disjoint") == (64, 64)
    assert resolve_window(64, None) == (64, 32)
    with pytest.raises(ValueError, match="stride"):
        resolve_window(64, 65)
