"""The mixture plan: which source every training sequence comes from, decided before training.

For a run of S sequences and a replay ratio r, this stage's sources share (1 - r) S by weight and
replay sources share r S by weight; counts are rounded by largest remainder so they add up to S
exactly. Each packed sequence comes from one source, so per-domain token accounting is exact.

Order: a just-in-time sequence (Steiner & Yeomans 1993). With p_k = c_k / S, the deviation
D_k(n) = (sequences of source k among the first n) - n p_k stays within B = 1 - 1/(2K - 2) for
every source and every n (K sources; Tijdeman 1980 proves such a sequence exists, and earliest-
deadline-first finds it, since every sequence of source k has a window of positions that keeps
the bound). So every prefix holds each source's share to within one sequence, and every window
of w consecutive sequences holds w p_k to within 2B: exactly one sequence for two sources, 1.5
for three, under 2 for any number. A tighter window bound for every mix does not exist: for three
or more sources with distinct shares each source would have to be a Beatty sequence and those
rarely tile the integers (Fraenkel's conjecture). Megatron's largest-shortfall blend keeps the
same kind of bound; sorting by ideal position (j + 1/2) / p_k does not: with ten sources its
prefix deviation reaches 3 sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cpt_cli.data.schedule import MixSchedule, segment_counts
from cpt_cli.errors import RecipeError

EPOCH_WARNING = 4.0  # Muennighoff et al. 2023: returns from repeated data fade beyond ~4 epochs


class Stream(Protocol):
    name: str

    @property
    def sequences_per_epoch(self) -> float: ...

    def sequence(self, index: int) -> Any: ...

    def label_tokens(self, index: int) -> int: ...


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
    content: str = ""         # fingerprint of the exact documents trained (cache entry + ids)
    loss_on: str = "all"      # all | completion | assistant: which tokens the loss sees
    trained_available: int = -1   # trained (unmasked) tokens per epoch; -1: all of them
    beyond_seq_len: int = 0   # documents left out: no trained token within data.seq_len

    def trained_fraction(self) -> float:
        """Share of this source's sequence tokens that the loss sees."""
        if self.trained_available < 0 or not self.tokens_available:
            return 1.0
        return self.trained_available / self.tokens_available

    def as_dict(self, seq_len: int, total: int) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "weight": self.weight,
                "inherited": self.inherited, "documents": self.documents,
                "tokens_available": self.tokens_available,
                "holdout_tokens": self.holdout_tokens,
                "tokens_planned": self.sequences * seq_len,
                "share_requested": self.share_requested,
                "share_planned": self.sequences / total if total else 0.0,
                "epochs": self.epochs, "loss_on": self.loss_on,
                "tokens_trained_planned": round(self.sequences * seq_len *
                                                self.trained_fraction()),
                "beyond_seq_len": self.beyond_seq_len}


@dataclass
class MixturePlan:
    seq_len: int
    sources: list[PlanSource]
    total_sequences: int
    seed: int
    packing: str = "concat"
    global_batch: int = 0     # sequences per optimizer step: the loader's unit of progress
    warnings: list[str] = field(default_factory=list)
    schedule: MixSchedule | None = None   # None: one constant mix (the order of cpt <= 0.x)
    parts: list[SegmentTable] = field(default_factory=list)  # one per revision, by start
    revisions: list[dict[str, Any]] = field(default_factory=list)
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
        """What a resumed run must share with the interrupted one for sequence i to be the same
        data: any change of sources, documents, weights, budget, packing or batch changes it."""
        payload = json.dumps({"seq_len": self.seq_len, "seed": self.seed,
                              "total": self.total_sequences, "packing": self.packing,
                              "global_batch": self.global_batch,
                              "sources": [[s.name, s.role, s.sequences, s.documents,
                                           s.tokens_available, s.content]
                                          for s in self.sources],
                              "extra": extra, **self._schedule_payload()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _schedule_payload(self) -> dict[str, Any]:
        # Absent for a constant mix, so that a constant plan keeps the fingerprint it always had
        # and runs planned before schedules existed still resume.
        if not self.parts:
            return {}
        return {"schedule": self.schedule_fingerprint(), "revisions": self.revisions}

    def schedule_fingerprint(self) -> str:
        """The schedule alone (points, values, run length): what a --replan compares."""
        return self.schedule.fingerprint() if self.schedule is not None else "constant"

    def _part(self, index: int) -> SegmentTable:
        starts = [int(p.bounds[0]) for p in self.parts]
        return self.parts[int(np.searchsorted(starts, index, side="right")) - 1]

    def read_positions(self, index: int) -> np.ndarray:
        """How many sequences each source has served before global sequence `index`: where
        each one continues reading after a revision there."""
        if not self.parts:
            order = self.source_order()[:index]
            return np.bincount(order, minlength=len(self.sources)).astype(np.int64)
        return self._part(index).read_positions(index)

    def revise(self, at: int, schedule: MixSchedule, max_epochs: list[float],
               sequences_per_epoch: list[float]) -> MixturePlan:
        """A new plan: sequences before `at` exactly as planned, from `at` on the new schedule,
        each source continuing from its own read position (none served twice, none skipped).
        `at` is a step boundary (a checkpoint's step times the global batch)."""
        g = max(1, self.global_batch)
        if at % g or not 0 <= at <= self.total_sequences:
            raise ValueError(f"a revision starts on a step boundary inside the run, not at {at}")
        if schedule.total != self.total_sequences or len(schedule.weights) != len(self.sources):
            raise RecipeError("a re-planned schedule must keep the run's length and sources; "
                              "a changed past (seq_len, batch, sources) cannot be re-planned")
        base = self.read_positions(at)
        part = SegmentTable.build(schedule, at, base)
        kept = [p for p in self.parts if int(p.bounds[0]) < at]
        if not self.parts:  # a constant plan: keep its order up to `at` as the first part
            kept = [SegmentTable.from_order(self.source_order(), len(self.sources))]
        sources = [dataclasses.replace(s) for s in self.sources]
        totals = base + part.counts.sum(axis=0)
        problems, warnings = _check_counts(sources, [int(c) for c in totals],
                                           sequences_per_epoch, max_epochs, self.seq_len,
                                           self.total_sequences)
        if problems:
            raise RecipeError("the revised mixture plan is impossible:", problems)
        revision = {"sequence": at, "step": at // g, "old": self.schedule_fingerprint(),
                    "new": schedule.fingerprint()}
        return MixturePlan(seq_len=self.seq_len, sources=sources,
                           total_sequences=self.total_sequences, seed=self.seed,
                           packing=self.packing, global_batch=self.global_batch,
                           warnings=warnings, schedule=schedule, parts=[*kept, part],
                           revisions=[*self.revisions, revision])

    def _build_order(self) -> None:
        counts = [s.sequences for s in self.sources]
        self._order = just_in_time_order(counts)
        # The j-th occurrence of source k is its j-th sequence: a running count per source.
        local = np.zeros(len(self._order), dtype=np.int64)
        for k in range(len(counts)):
            mask = self._order == k
            local[mask] = np.arange(int(mask.sum()), dtype=np.int64)
        self._local = local

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source's stream) of global sequence `index`."""
        if self.parts:
            return self._part(index).locate(index)
        if self._order is None:
            self._build_order()
        assert self._order is not None and self._local is not None
        return int(self._order[index]), int(self._local[index])

    def source_order(self) -> np.ndarray:
        """Source number of every sequence (a scheduled plan builds every segment: small runs
        and tests only; the loader uses `locate`)."""
        if self.parts:
            ends = [int(p.bounds[0]) for p in self.parts[1:]] + [self.total_sequences]
            return np.concatenate([p.order_slice(int(p.bounds[0]), end)
                                   for p, end in zip(self.parts, ends, strict=True)])
        if self._order is None:
            self._build_order()
        assert self._order is not None
        return self._order

    def as_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "total_sequences": self.total_sequences,
                "total_tokens": self.total_tokens, "replay_share": self.replay_share,
                "sources": [s.as_dict(self.seq_len, self.total_sequences) for s in self.sources],
                "warnings": list(self.warnings)}


def just_in_time_order(counts: list[int]) -> np.ndarray:
    """Source number of each of sum(counts) positions; every prefix of n positions holds
    n c_k / S of source k to within B = 1 - 1/(2K - 2) (see the module docstring).

    Source k's j-th sequence (1-based) keeps the bound only at positions t with
    ceil((j - B) S / c_k) <= t <= floor((j - 1 + B) S / c_k) + 1; earliest deadline first over
    those windows, in exact integer arithmetic. O(S log K): about 1 s per million sequences.
    """
    S = sum(counts)
    active = [k for k, c in enumerate(counts) if c]
    if len(active) <= 1:
        return np.full(S, active[0] if active else 0, dtype=np.int32)
    K = len(active)
    num, den = 2 * K - 3, 2 * K - 2  # B = num / den
    # Positions of source k's j-th sequence: release = ceil((j den - num) S / (c den)),
    # deadline = floor(((j - 1) den + num) S / (c den)) + 1; inlined below (the loop runs S times).
    scale = [counts[k] * den for k in range(len(counts))]
    waiting = [(-(-(den - num) * S // scale[k]), num * S // scale[k] + 1, k) for k in active]
    heapq.heapify(waiting)
    ready: list[tuple[int, int]] = []
    done = [0] * len(counts)
    out: list[int] = []
    push, pop, place = heapq.heappush, heapq.heappop, out.append
    for n in range(1, S + 1):
        while waiting and waiting[0][0] <= n:
            _, due, k = pop(waiting)
            push(ready, (due, k))
        due, k = pop(ready)
        if due < n:  # Tijdeman's theorem rules this out; reaching it is a bug in cpt
            raise RuntimeError(f"mixture order: deadline missed at {n} of {S} for {counts}")
        place(k)
        j = done[k] = done[k] + 1  # sequences of k placed; the next one is j + 1
        if j < counts[k]:
            push(waiting, (-(-((j + 1) * den - num) * S // scale[k]),
                           (j * den + num) * S // scale[k] + 1, k))
    return np.asarray(out, dtype=np.int32)


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
              max_epochs: list[float], *, packing: str = "concat",
              global_batch: int = 0, schedule: MixSchedule | None = None) -> MixturePlan:
    """Assign `total_sequences` to sources; raise when a source would exceed its max_epochs.
    With a `schedule` whose values change, the plan is cut into segments (see SegmentTable)."""
    if schedule is not None and not schedule.is_constant:
        return _make_scheduled_plan(sources, sequences_per_epoch, seq_len, seed, max_epochs,
                                    packing, schedule)
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
    problems, warnings = _check_counts(sources, counts, sequences_per_epoch, max_epochs, seq_len,
                                       total_sequences)
    if problems:
        raise RecipeError("the mixture plan is impossible:", problems)
    return MixturePlan(seq_len=seq_len, sources=sources, total_sequences=total_sequences,
                       seed=seed, packing=packing, global_batch=global_batch, warnings=warnings)


def _check_counts(sources: list[PlanSource], counts: list[int],
                  sequences_per_epoch: list[float], max_epochs: list[float], seq_len: int,
                  total_sequences: int) -> tuple[list[str], list[str]]:
    """Record each source's sequences and epochs; (problems, warnings) of the whole run."""
    new = [s for s in sources if s.role == "new"]
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
        if c == 0 and s.share_requested > 0:
            warnings.append(f"source {s.name!r} gets no sequence: its share "
                            f"({s.share_requested:.4%}) of {total_sequences:,} sequences rounds "
                            "to none. Raise its weight or train.tokens.")
    if new and not sum(s.sequences for s in new):
        problems.append(f"no sequence of new data in {total_sequences:,}: a stage needs some. "
                        "Lower data.replay.ratio or raise train.tokens.")
    return problems, warnings


def _make_scheduled_plan(sources: list[PlanSource], sequences_per_epoch: list[float],
                         seq_len: int, seed: int, max_epochs: list[float], packing: str,
                         schedule: MixSchedule) -> MixturePlan:
    if "replay" not in schedule.roles and any(w > 0 for _, w in schedule.ratio.points):
        raise RecipeError("data.replay.ratio is above 0 but there is no replay source: list "
                          "data.replay.sources, or continue from a cpt run with inherit: true")
    part = SegmentTable.build(schedule, 0, np.zeros(len(sources), dtype=np.int64))
    total = schedule.total
    requested = part.targets.sum(axis=0) / max(1, total)
    for s, share in zip(sources, requested, strict=True):
        s.share_requested = float(share)
    counts = [int(c) for c in part.counts.sum(axis=0)]
    problems, warnings = _check_counts(sources, counts, sequences_per_epoch, max_epochs, seq_len,
                                       total)
    if problems:
        raise RecipeError("the mixture plan is impossible:", problems)
    return MixturePlan(seq_len=seq_len, sources=sources, total_sequences=total, seed=seed,
                       packing=packing, global_batch=schedule.global_batch, warnings=warnings,
                       schedule=schedule, parts=[part])


@dataclass
class SegmentTable:
    """A scheduled plan from bounds[0] on: segment i covers sequences bounds[i]..bounds[i+1]
    and holds counts[i, k] sequences of source k, ordered by just_in_time_order. A segment's
    order is built on the first locate into it and at most CACHED orders are kept, so that
    planning a 100B-token run stores only the (segments x sources) counts."""

    bounds: np.ndarray        # (m + 1,) int64 global sequence positions
    counts: np.ndarray        # (m, K) int64
    starts: np.ndarray        # (m + 1, K) each source's read position at each bound
    targets: np.ndarray       # (m, K) scheduled (fractional) sequences per segment
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    CACHED = 2  # the loader reads forward: the current segment and the next one suffice

    @classmethod
    def build(cls, schedule: MixSchedule, start: int, base: np.ndarray) -> SegmentTable:
        bounds = schedule.boundaries(start)
        targets = schedule.targets(bounds)
        counts = segment_counts(targets, np.diff(bounds))
        starts = np.vstack([base, base + np.cumsum(counts, axis=0)]).astype(np.int64)
        return cls(bounds=bounds, counts=counts, starts=starts, targets=targets)

    @classmethod
    def from_order(cls, order: np.ndarray, sources: int) -> SegmentTable:
        """A constant plan's whole order as one segment (the past of a revised constant plan)."""
        counts = np.bincount(order, minlength=sources).astype(np.int64)[None, :]
        table = cls(bounds=np.asarray([0, len(order)], dtype=np.int64), counts=counts,
                    starts=np.vstack([np.zeros(sources, dtype=np.int64), counts[0]]),
                    targets=counts.astype(np.float64))
        table._cache[0] = (order, _local_indices(order, sources))
        return table

    def _segment(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            if len(self._cache) >= self.CACHED:
                self._cache.pop(next(iter(self._cache)))
            order = just_in_time_order([int(c) for c in self.counts[i]])
            self._cache[i] = (order, _local_indices(order, self.counts.shape[1]))
        return self._cache[i]

    def _index(self, index: int) -> int:
        return min(int(np.searchsorted(self.bounds, index, side="right")) - 1,
                   len(self.counts) - 1)

    def locate(self, index: int) -> tuple[int, int]:
        i = self._index(index)
        order, local = self._segment(i)
        j = index - int(self.bounds[i])
        k = int(order[j])
        return k, int(self.starts[i, k] + local[j])

    def read_positions(self, index: int) -> np.ndarray:
        i = self._index(index)
        order, _ = self._segment(i)
        inside = np.bincount(order[:index - int(self.bounds[i])], minlength=self.counts.shape[1])
        return self.starts[i] + inside

    def order_slice(self, start: int, end: int) -> np.ndarray:
        pieces = []
        for i in range(self._index(start), len(self.counts)):
            a, b = int(self.bounds[i]), int(self.bounds[i + 1])
            if a >= end:
                break
            order, _ = self._segment(i)
            pieces.append(order[max(start, a) - a:min(end, b) - a])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def _local_indices(order: np.ndarray, sources: int) -> np.ndarray:
    """The j-th occurrence of source k is its j-th sequence: a running count per source."""
    local = np.zeros(len(order), dtype=np.int64)
    for k in range(sources):
        mask = order == k
        local[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return local


def phase_starts(plan: MixturePlan) -> list[int]:
    """The steps at which the mix enters a new phase: every point of every schedule inside the
    run, and every revision (the mix may change there too); [0] for a constant plan."""
    g = max(1, plan.global_batch)
    steps = plan.total_sequences // g
    cuts = {0}
    if plan.schedule is not None:
        for value in [*plan.schedule.weights, plan.schedule.ratio]:
            cuts.update(p for p, _ in value.points if 0 < p < steps)
    cuts.update(r["step"] for r in plan.revisions if 0 < r["step"] < steps)
    return sorted(cuts)


def phase_at(plan: MixturePlan, step: int) -> str | None:
    """The mixture phase of an evaluation after `step` optimizer steps, as `steps A-B` (the phase
    that trained step `step`, the first one at step 0); None for a constant mix, which has one.

    A phase runs from one schedule point (or revision) to the next, the stretches `cpt mix
    inspect` reports (without its 10% slices of a ramp: a ramp is one phase). An evaluation at a
    switch's step has seen none of the new mix, so it belongs to the phase before."""
    if plan.schedule is None and not plan.revisions:
        return None
    steps = plan.total_sequences // max(1, plan.global_batch)
    starts = phase_starts(plan)
    trained = min(max(step - 1, 0), steps - 1)  # the optimizer step just done, 0-based
    i = int(np.searchsorted(starts, trained, side="right")) - 1
    end = starts[i + 1] if i + 1 < len(starts) else steps
    return phase_name(starts[i], end)


def phase_name(start: int, end: int) -> str:
    return f"steps {start}-{end}"


def phase_span(name: str) -> tuple[int, int] | None:
    """(start, end) of a name made by phase_name; None for anything else (a foreign value)."""
    parts = name.removeprefix("steps ").split("-") if isinstance(name, str) else []
    if len(parts) != 2 or not name.startswith("steps ") or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])
