"""The mixture plan: which source every training sequence comes from, decided before training.

For a run of S sequences and a replay ratio r, this stage's sources share (1 - r) S by weight and
replay sources share r S by weight; counts are rounded by largest remainder so they add up to S
exactly. Each packed sequence comes from one source, so per-domain token accounting is exact.

Order: source k's j-th sequence is placed at its ideal position (j + 1/2) S / c_k and all sequences
are sorted by that position (ties by source order). Any window of w consecutive sequences then
holds w c_k / S of source k to within one sequence: the same smoothness as Megatron's
largest-shortfall blending, computed with one argsort instead of a loop over S.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cpt_cli.errors import RecipeError

EPOCH_WARNING = 4.0  # Muennighoff et al. 2023: returns from repeated data fade beyond ~4 epochs


class Stream(Protocol):
    name: str

    @property
    def sequences_per_epoch(self) -> float: ...

    def sequence(self, index: int) -> Any: ...


@dataclass
class PlanSource:
    """One row of the plan."""

    name: str
    role: str                 # "new" (target domain) or "replay" (retained domain)
    weight: float
    documents: int            # training documents (held-out ones excluded)
    tokens_available: int     # training tokens per epoch, EOS included
    holdout_tokens: int
    sequences: int = 0
    share_requested: float = 0.0
    epochs: float = 0.0
    inherited: bool = False

    def as_dict(self, seq_len: int, total: int) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "weight": self.weight,
                "inherited": self.inherited, "documents": self.documents,
                "tokens_available": self.tokens_available,
                "holdout_tokens": self.holdout_tokens,
                "tokens_planned": self.sequences * seq_len,
                "share_requested": self.share_requested,
                "share_planned": self.sequences / total if total else 0.0,
                "epochs": self.epochs}


@dataclass
class MixturePlan:
    seq_len: int
    sources: list[PlanSource]
    total_sequences: int
    seed: int
    warnings: list[str] = field(default_factory=list)
    _order: np.ndarray | None = None
    _local: np.ndarray | None = None

    @property
    def total_tokens(self) -> int:
        return self.total_sequences * self.seq_len

    @property
    def replay_share(self) -> float:
        replay = sum(s.sequences for s in self.sources if s.role == "replay")
        return replay / self.total_sequences if self.total_sequences else 0.0

    def fingerprint(self, extra: str = "") -> str:
        payload = json.dumps({"seq_len": self.seq_len, "seed": self.seed,
                              "total": self.total_sequences,
                              "sources": [[s.name, s.role, s.sequences, s.documents,
                                           s.tokens_available] for s in self.sources],
                              "extra": extra}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _build_order(self) -> None:
        counts = [s.sequences for s in self.sources]
        S = self.total_sequences
        ideal = np.concatenate([(np.arange(c) + 0.5) * (S / c) for c in counts if c] or
                               [np.zeros(0)])
        src = np.concatenate([np.full(c, k, dtype=np.int32) for k, c in enumerate(counts) if c] or
                             [np.zeros(0, dtype=np.int32)])
        local = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c] or
                               [np.zeros(0, dtype=np.int64)])
        order = np.lexsort((src, ideal))  # by ideal position, then source order
        self._order = src[order]
        self._local = local[order]

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source's stream) of global sequence `index`."""
        if self._order is None:
            self._build_order()
        assert self._order is not None and self._local is not None
        return int(self._order[index]), int(self._local[index])

    def source_order(self) -> np.ndarray:
        if self._order is None:
            self._build_order()
        assert self._order is not None
        return self._order

    def as_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "total_sequences": self.total_sequences,
                "total_tokens": self.total_tokens, "replay_share": self.replay_share,
                "sources": [s.as_dict(self.seq_len, self.total_sequences) for s in self.sources],
                "warnings": list(self.warnings)}


def largest_remainder(shares: list[float], total: int) -> list[int]:
    raw = [s * total for s in shares]
    counts = [int(np.floor(x)) for x in raw]
    left = total - sum(counts)
    by_fraction = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_fraction[:left]:
        counts[i] += 1
    return counts


def make_plan(sources: list[PlanSource], sequences_per_epoch: list[float], total_sequences: int,
              replay_ratio: float, seq_len: int, seed: int,
              max_epochs: list[float]) -> MixturePlan:
    """Assign `total_sequences` to sources; raise when a source would exceed its max_epochs."""
    new = [s for s in sources if s.role == "new"]
    replay = [s for s in sources if s.role == "replay"]
    if replay_ratio > 0 and not replay:
        raise RecipeError("data.replay.ratio is above 0 but there is no replay source: list "
                          "data.replay.sources, or continue from a cpt run with inherit: true")
    ratio = replay_ratio if replay else 0.0
    for group, share in ((new, 1.0 - ratio), (replay, ratio)):
        weight = sum(s.weight for s in group)
        for s in group:
            s.share_requested = share * s.weight / weight
    counts = largest_remainder([s.share_requested for s in sources], total_sequences)
    problems: list[str] = []
    warnings: list[str] = []
    for s, c, per_epoch, limit in zip(sources, counts, sequences_per_epoch, max_epochs,
                                      strict=True):
        s.sequences = c
        s.epochs = c / per_epoch if per_epoch else float("inf")
        if s.epochs > limit:
            problems.append(f"source {s.name!r}: the plan repeats it {s.epochs:.2f} times, above "
                            f"its max_epochs {limit:g} ({s.tokens_available:,} tokens available, "
                            f"{c * seq_len:,} planned). Lower train.tokens or its weight, add "
                            "data, or raise max_epochs.")
        elif s.epochs > EPOCH_WARNING:
            warnings.append(f"source {s.name!r} is repeated {s.epochs:.1f} times; returns fade "
                            "beyond about 4 epochs (Muennighoff et al. 2023)")
    if problems:
        raise RecipeError("the mixture plan is impossible:", problems)
    return MixturePlan(seq_len=seq_len, sources=sources, total_sequences=total_sequences,
                       seed=seed, warnings=warnings)
