"""Exact per-document log-likelihood scoring for the forgetting metrics.

The metric
----------
For each domain with held-out documents, every document is scored on its own, the way
lm-evaluation-harness scores ``loglikelihood_rolling``: every token of the document is
predicted, the first one from a start token (the tokenizer's BOS, else its EOS), and no
end-of-document token is scored.  Per document we keep

* ``T`` -- tokens scored (= tokens of the document, each scored exactly once),
* ``B`` -- UTF-8 bytes of the text scored,
* ``l`` -- summed log-likelihood in nats (we store ``nll = -l``).

Over a domain the sums give ``loss = -l/T``, ``ppl = exp(loss)`` and
``bpb = -l / (B ln 2)`` (bits per UTF-8 byte).  Bits per byte is the comparable figure:
it does not depend on how the tokenizer splits the text, so it can be compared across
tokenizers and across domains whose texts tokenize very differently.

Why each document is scored alone (Paloma's rule)
-------------------------------------------------
Paloma (Magnusson et al., 2023) fixes that evaluation documents are never packed or
concatenated.  Packing lets a document's first tokens be conditioned on an unrelated
previous document, so the figure would depend on the order and the packing of the
evaluation set and on the window boundaries, not only on the model; the first tokens of a
document carry the most surprise, so this is not a rounding error.  Scoring each document
from a fixed start token makes the figure a property of (model, document) alone, which is
what a before/after comparison of continued pre-training needs.

Long documents
--------------
A document longer than the window (``max_length`` tokens: by default the context the model was
trained on) is scored in rolling windows (see :func:`rolling_windows`) so that every token is
scored exactly once, never at a position beyond the window, and, after the first window, with
at least ``max_length - stride`` tokens of context.  The default ``stride = max_length // 2``
overlaps the windows by half; ``stride = max_length`` ("disjoint") gives the disjoint windows of
lm-evaluation-harness's ``loglikelihood_rolling``, whose later windows predict a whole window
each from one token of context.  Logits are computed from a batch's first scored position on,
so memory is bounded by the window and the batch, whatever a document's length.

Speed
-----
Windows from all documents are sorted by length and grouped into batches under a token
budget (``batch_tokens`` = rows x padded width), right-padded, with an attention mask and
explicit ``position_ids``; only the scored positions go through the float32
``log_softmax``.  Sorting keeps padding small: the rows of a batch differ little in length.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Default token budget per forward pass (rows x padded width).  Measured on a 2-core CPU
# with a ~0.92M-parameter Llama (hidden 128, 4 layers, vocab 1024, context 512, stride 256)
# over 100k tokens of Python stdlib source: 2048 -> 3.1 s, 4096 -> 3.4 s, 8192 -> 3.8 s,
# 16384 -> 4.6 s; larger batches fall out of cache.  4096 stays within 10% of the best
# CPU figure while keeping a GPU busy, and bounds the logits of one batch: with a 128k-token
# vocabulary, 4096 positions of bf16 logits are 4096 * 128k * 2 B = 1 GiB.
DEFAULT_BATCH_TOKENS = 4096

# The window for a model cpt did not train, when its context is longer: lm-evaluation-harness's
# own fallback length (HFLM's 2048), and a bound on one window's logits where a model's context
# is huge: 2,048 positions x a 128k vocabulary in bf16 are 0.5 GiB, where Llama-3.2-1B's full
# 131,072-token context would be 32 GiB.
DEFAULT_MAX_LENGTH = 2048

# `stride` that predicts a whole window each time: lm-evaluation-harness's disjoint windows.
DISJOINT = "disjoint"

# Upper bound on the elements of one float32 log_softmax chunk: 2**25 floats = 128 MiB
# (about 256 positions of a 128k vocabulary), so the float32 copy never doubles the
# memory held by the batch's logits.
_LOG_SOFTMAX_CHUNK_ELEMENTS = 1 << 25

# Bound on the (samples x documents) index matrix of one bootstrap chunk: 2**22 int64
# indices = 32 MiB.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class DomainMetrics:
    """Summed figures of one domain: ``nll`` in nats, ``tokens`` scored, UTF-8 ``bytes``."""

    nll: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token in nats (NaN when nothing was scored)."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        """Token perplexity ``exp(loss)``; ``inf`` where that overflows a float64."""
        loss = self.loss
        try:
            return math.exp(loss)
        except OverflowError:  # loss > ~709.78 nats
            return math.inf

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte, ``nll / (bytes ln 2)`` (NaN when no bytes were scored)."""
        return self.nll / (self.bytes * math.log(2)) if self.bytes else math.nan


@dataclass(frozen=True, eq=False)
class DocumentScores:
    """Per-document sums: nll (nats, summed -log p), tokens scored, UTF-8 bytes.

    Documents that encode to no tokens are skipped: ``nll = 0``, ``tokens = 0`` and
    ``bytes = 0``, so they leave every sum, and the bootstrap, unchanged.
    """

    nll: np.ndarray  # float64, shape (n_docs,)
    tokens: np.ndarray  # int64
    bytes: np.ndarray  # int64
    # (max_length, stride) of the windows that scored them; None where unrecorded (scores
    # cached by cpt before it recorded them). Scores of other windows do not compare.
    window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        nll = np.asarray(self.nll, dtype=np.float64)
        tokens = np.asarray(self.tokens, dtype=np.int64)
        n_bytes = np.asarray(self.bytes, dtype=np.int64)
        if not (nll.ndim == tokens.ndim == n_bytes.ndim == 1):
            raise ValueError("DocumentScores arrays must be one-dimensional")
        if not (nll.shape == tokens.shape == n_bytes.shape):
            raise ValueError(
                f"DocumentScores arrays differ in length: nll {nll.shape[0]}, "
                f"tokens {tokens.shape[0]}, bytes {n_bytes.shape[0]}"
            )
        object.__setattr__(self, "nll", nll)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "bytes", n_bytes)

    def __len__(self) -> int:
        return int(self.nll.shape[0])

    def totals(self) -> DomainMetrics:
        """Sum over documents (ratio of sums, so long documents weigh more)."""
        return DomainMetrics(
            nll=float(self.nll.sum()),
            tokens=int(self.tokens.sum()),
            bytes=int(self.bytes.sum()),
        )


class Window(NamedTuple):
    """One forward pass over ``seq[begin:end]`` where ``seq = [start] + doc_tokens``.

    Input position ``i`` predicts ``seq[begin + i + 1]``; only the last ``scored``
    positions count, the ones before are context already scored by an earlier window.
    """

    begin: int
    end: int
    scored: int


def rolling_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Split a document of ``n_tokens`` tokens into overlapping scoring windows.

    Let ``seq = [start] + tokens`` and ``L = max_length``.

    * The first window is ``[start] + tokens[:L-1]`` and scores all of its positions,
      i.e. it predicts ``tokens[:L]`` (``tokens[:n]`` with a single window when
      ``n <= L``).
    * Every later window predicts the next ``stride`` tokens not yet scored (fewer in the
      last window) given the tokens just before them as context, so that the window is
      exactly ``L`` tokens long: predicting ``tokens[p:e]`` uses the input
      ``seq[e-L:e]``, whose first ``L - (e - p)`` positions are context only.  Each such
      window therefore has at least ``L - stride`` tokens of context; the last window, with
      fewer tokens left to predict, has more.

    This is lm-evaluation-harness's ``get_rolling_token_windows`` with
    ``context_len = L - stride + 1``; lm-eval itself uses ``context_len = 1``, i.e.
    ``stride = L``.  Every token is scored exactly once, every window is
    at most ``L`` tokens long, and a document of ``n`` tokens costs about
    ``n + (n - L) * (L - stride) / stride`` positions (2n for the default ``stride = L//2``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if n_tokens <= 0:
        return []
    first = min(n_tokens, max_length)
    windows = [Window(0, first, first)]
    predicted = first
    while predicted < n_tokens:
        end = min(predicted + stride, n_tokens)
        windows.append(Window(end - max_length, end, end - predicted))
        predicted = end
    return windows


def start_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every document is predicted from: BOS, else EOS."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        "the tokenizer has neither a BOS nor an EOS token; one of them is needed as the "
        "start token from which each document's first token is predicted"
    )


def default_max_length(config: object | None) -> int:
    """The window for a model whose training context is unknown, from its config: its context
    (``max_position_embeddings``), at most :data:`DEFAULT_MAX_LENGTH`."""
    value = getattr(config, "max_position_embeddings", None)
    return min(int(value), DEFAULT_MAX_LENGTH) if value else DEFAULT_MAX_LENGTH


def resolve_window(max_length: int, stride: int | str | None) -> tuple[int, int]:
    """``(max_length, stride)`` checked; ``stride`` None is half the window, ``"disjoint"`` the
    whole window (lm-evaluation-harness's windows, see :func:`rolling_windows`)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if stride is None:
        stride = max(1, max_length // 2)
    elif stride == DISJOINT:
        stride = max_length
    if not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}] or {DISJOINT!r}, "
                         f"got {stride!r}")
    return max_length, stride


class _Batch(NamedTuple):
    docs: np.ndarray  # (rows,) document index of each row
    input_ids: torch.Tensor  # (rows, width) right-padded
    attention_mask: torch.Tensor  # (rows, width) 1 on real tokens
    targets: torch.Tensor  # (rows, width) next token at each position, 0 on padding
    scored: torch.Tensor  # (rows, width) bool, True on the positions that count
    keep: int  # the last `keep` positions hold every scored one: the only logits computed


def _plan_batches(
    windows: list[tuple[int, Window]], batch_tokens: int
) -> list[list[tuple[int, Window]]]:
    """Group windows, longest first, so that rows x widest row <= batch_tokens.

    A window longer than the budget gets a batch of its own.
    """
    order = sorted(windows, key=lambda item: item[1].end - item[1].begin, reverse=True)
    batches: list[list[tuple[int, Window]]] = []
    i = 0
    while i < len(order):
        width = order[i][1].end - order[i][1].begin  # widest row: the list is sorted
        rows = max(1, batch_tokens // width)
        batches.append(order[i : i + rows])
        i += rows
    return batches


def _build_batch(
    group: list[tuple[int, Window]], seqs: list[np.ndarray], device: torch.device,
    answers: list[np.ndarray | None] | None = None,
) -> _Batch:
    width = max(w.end - w.begin for _, w in group)
    rows = len(group)
    input_ids = np.zeros((rows, width), dtype=np.int64)
    targets = np.zeros((rows, width), dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    scored = np.zeros((rows, width), dtype=bool)
    for r, (doc, w) in enumerate(group):
        n = w.end - w.begin
        seq = seqs[doc]
        input_ids[r, :n] = seq[w.begin : w.end]
        targets[r, :n] = seq[w.begin + 1 : w.end + 1]
        mask[r, :n] = 1
        answer = answers[doc] if answers is not None else None
        # Target of row position i is token w.begin + i: the window's scored tail is tokens
        # [end - scored, end), and of a task document only its answer's tokens among them.
        scored[r, n - w.scored : n] = True if answer is None else answer[w.end - w.scored:w.end]
    first_scored = min(w.end - w.begin - w.scored for _, w in group)
    return _Batch(
        docs=np.fromiter((doc for doc, _ in group), dtype=np.int64, count=rows),
        input_ids=torch.from_numpy(input_ids).to(device),
        attention_mask=torch.from_numpy(mask).to(device),
        targets=torch.from_numpy(targets).to(device),
        scored=torch.from_numpy(scored).to(device),
        keep=width - first_scored,
    )


def _row_nll(logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Summed -log p of the scored positions of each row, float64, shape (rows,).

    ``logits`` covers the last ``logits.shape[1]`` positions of the batch (all of them when
    the model computed every position's logits)."""
    rows, kept, vocab = logits.shape
    flat_logits = logits.reshape(rows * kept, vocab)
    scored = batch.scored[:, -kept:]
    positions = scored.reshape(-1).nonzero().squeeze(1)
    row_of = torch.div(positions, kept, rounding_mode="floor")
    targets = batch.targets[:, -kept:].reshape(-1)[positions]
    sums = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    chunk = max(1, _LOG_SOFTMAX_CHUNK_ELEMENTS // vocab)
    for c0 in range(0, positions.numel(), chunk):
        idx = positions[c0 : c0 + chunk]
        # float32 before log_softmax: bf16 keeps 8 mantissa bits (~2-3 digits), too few
        # for a logsumexp over the vocabulary; in float32 a bf16-autocast run of the test
        # model lands 2e-4 bpb from fp32 (6.3150 vs 6.3148).
        logp = torch.log_softmax(flat_logits[idx].float(), dim=-1)
        token_logp = logp.gather(1, targets[c0 : c0 + chunk].unsqueeze(1)).squeeze(1)
        sums.index_add_(0, row_of[c0 : c0 + chunk], -token_logp.double())
    return sums


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can compute the logits of the last positions only
    (transformers' causal LMs: ``logits_to_keep``); a wrapper that hides it gets them all."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


ScoredText = str | Sequence[Sequence[Any]]
"""A document to score: its text (every token scored), or a task document's segments, `[text,
answer]` pairs whose texts joined are the document (only the answers' tokens and bytes
scored, each conditioned on all that precedes it: lm-evaluation-harness's `loglikelihood`)."""


def plain_text(document: ScoredText) -> str:
    """The whole text of a document to score."""
    return document if isinstance(document, str) else "".join(t for t, _ in document)


def _encode_answers(tokenizer: PreTrainedTokenizerBase, document: Sequence[Sequence[Any]]
                    ) -> tuple[list[int], np.ndarray, int]:
    """A task document's tokens (each segment encoded on its own, as the cache encodes it for
    training), which of them are answers, and the answers' UTF-8 bytes."""
    ids: list[int] = []
    answer: list[bool] = []
    n_bytes = 0
    pieces = tokenizer([t for t, _ in document], add_special_tokens=False,
                       return_attention_mask=False, verbose=False)["input_ids"]
    for (text, scored), piece in zip(document, pieces, strict=True):
        ids.extend(piece)
        answer.extend([bool(scored)] * len(piece))
        n_bytes += len(text.encode("utf-8")) if scored else 0
    return ids, np.asarray(answer, dtype=bool), n_bytes


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[ScoredText], max_length: int, stride: int
) -> tuple[list[np.ndarray], list[tuple[int, Window]], np.ndarray, np.ndarray,
           list[np.ndarray | None] | None]:
    """Each document as ``[start] + tokens``, its windows, its scored token and UTF-8 byte
    counts, and (when any document has answers) which of its tokens are scored."""
    start = start_token_id(tokenizer)
    tokens = np.zeros(len(texts), dtype=np.int64)
    n_bytes = np.zeros(len(texts), dtype=np.int64)
    plain = [t for t in texts if isinstance(t, str)]
    encoded = iter(tokenizer(
        plain, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"] if plain else [])
    seqs: list[np.ndarray] = []
    windows: list[tuple[int, Window]] = []
    answers: list[np.ndarray | None] = []
    for doc, text in enumerate(texts):
        if isinstance(text, str):
            ids, answer, size = next(encoded), None, len(text.encode("utf-8"))
        else:
            ids, answer, size = _encode_answers(tokenizer, text)
        seqs.append(np.asarray([start, *ids], dtype=np.int64))
        answers.append(answer)
        scored = len(ids) if answer is None else int(answer.sum())
        if not scored:
            continue  # empty document (or no answer): skipped, tokens = bytes = 0
        tokens[doc] = scored
        n_bytes[doc] = size
        windows.extend((doc, w) for w in rolling_windows(len(ids), max_length, stride)
                       if answer is None or answer[w.end - w.scored:w.end].any())
    has_answers = any(a is not None for a in answers)
    return seqs, windows, tokens, n_bytes, answers if has_answers else None


def score_documents(
    model: PreTrainedModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[ScoredText],
    *,
    max_length: int | None = None,
    stride: int | str | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> DocumentScores:
    """Score each document on its own; return per-document nll, tokens and bytes.

    Args:
        model: a causal LM whose forward takes ``input_ids``, ``attention_mask`` and
            ``position_ids`` and returns ``.logits``.
        tokenizer: a fast tokenizer; texts are encoded with ``add_special_tokens=False``
            and each document is predicted from :func:`start_token_id`.
        texts: the documents: text, or a task document's `[text, answer]` segments, of
            which only the answers are scored (tokens, bytes), each given what precedes it.
        max_length: most tokens in one forward pass, context included; defaults to
            :func:`default_max_length` (callers that know the trained context pass it).
        stride: tokens predicted by each window after the first (see
            :func:`rolling_windows`); defaults to ``max_length // 2`` (at least 1);
            ``"disjoint"`` is ``max_length``, lm-evaluation-harness's windows.
        batch_tokens: budget of rows x padded width per forward pass.  Logits of one
            batch at a time are held, and only from its first scored position on: at most
            ``batch_tokens * vocab`` values (or one window's, when a window is longer).
        device: where inputs go; defaults to the device of the model's first parameter.
        autocast_dtype: if given, the forward pass runs under ``torch.autocast`` with this
            dtype (e.g. ``torch.bfloat16``); the log-softmax is always float32.
        progress: called after each batch with the number of tokens it scored; the calls
            sum to the total tokens scored.

    Documents that encode to no tokens are skipped: they get ``tokens = 0``, ``nll = 0``
    and ``bytes = 0``.
    """
    max_length, stride = resolve_window(
        default_max_length(getattr(model, "config", None)) if max_length is None else max_length,
        stride)
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    seqs, windows, tokens, n_bytes, answers = _encode(tokenizer, texts, max_length, stride)
    nll = np.zeros(len(texts), dtype=np.float64)
    device = torch.device(device or next(model.parameters()).device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    # Logits only where tokens are scored: a later window of the default stride predicts half
    # its positions, and the output layer is most of a small model's cost (a 1,024-token
    # vocabulary against hidden size 128).
    keep_only = _takes_logits_to_keep(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            for group in _plan_batches(windows, batch_tokens):
                batch = _build_batch(group, seqs, device, answers)
                width = batch.input_ids.shape[1]
                # Explicit 0..n-1 positions per row: right padding follows the real
                # tokens, so it never shifts them, whatever the model infers from the mask.
                position_ids = torch.arange(width, device=device).expand_as(batch.input_ids)
                extra = {"logits_to_keep": batch.keep} if keep_only else {}
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=position_ids,
                               use_cache=False,  # no KV cache to build (and, compiled, guard)
                               **extra).logits
                row_nll = _row_nll(logits, batch)
                del logits  # one batch of logits alive at a time
                np.add.at(nll, batch.docs, row_nll.cpu().numpy())
                if progress is not None:
                    progress(int(batch.scored.sum()))
    finally:
        model.train(was_training)
    return DocumentScores(nll, tokens, n_bytes, window=(max_length, stride))


def bootstrap_delta_bpb(
    now: DocumentScores,
    start: DocumentScores,
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """95% percentile interval of bpb(now) - bpb(start) from resampling documents (paired).

    ``now`` and ``start`` must score the same documents in the same order (their byte
    counts must match).  Each resample draws documents with replacement, takes the same
    indices from both, and computes each bpb as a ratio of sums (summed nll over summed
    bytes), like :meth:`DocumentScores.totals`.  Documents with no bytes (skipped, empty)
    are left out of the resampling.  Returns the ``(1-confidence)/2`` and
    ``(1+confidence)/2`` quantiles of the resampled differences.  Deterministic for a seed.
    """
    if len(now) != len(start):
        raise ValueError(f"paired bootstrap needs the same documents: {len(now)} vs {len(start)}")
    if not np.array_equal(now.bytes, start.bytes):
        raise ValueError("paired bootstrap needs the same documents: byte counts differ")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    keep = now.bytes > 0
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no scored documents to resample")
    # Both bpbs share the resampled byte sum, so the difference is one ratio.
    diff = (now.nll - start.nll)[keep]
    n_bytes = now.bytes[keep].astype(np.float64)

    rng = np.random.default_rng(seed)
    deltas = np.empty(samples, dtype=np.float64)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)  # bounds the index matrix at 32 MiB
    for s0 in range(0, samples, chunk):
        s1 = min(samples, s0 + chunk)
        idx = rng.integers(0, n, size=(s1 - s0, n))
        deltas[s0:s1] = diff[idx].sum(axis=1) / (n_bytes[idx].sum(axis=1) * math.log(2))
    lo, hi = np.quantile(deltas, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(lo), float(hi)
