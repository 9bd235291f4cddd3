"""The loader: micro batches for one process, disjoint from every other process's, resumable in
O(1).

Global sequence i of the plan goes to step i // G (G sequences per optimizer step). Within a step,
micro step a of process p reads sequences [(a * P + p) * m, (a * P + p + 1) * m) of that step,
where m is the micro batch and P the number of processes: the processes never share a sequence,
and the global batch is the same whatever P is, so a 2-process run sees exactly the data of a
1-process run with twice the accumulation. The loader's state is the plan fingerprint plus the
number of sequences consumed; resuming needs no re-reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cpt_cli.data.mixture import MixturePlan, Stream


@dataclass
class MicroBatch:
    input_ids: torch.Tensor      # [m, seq_len]
    labels: torch.Tensor         # [m, seq_len]
    position_ids: torch.Tensor   # [m, seq_len]
    sources: np.ndarray          # [m] source number of each row
    label_tokens: int            # tokens that count in the loss (shift and padding excluded)


class PackedLoader:
    def __init__(self, plan: MixturePlan, streams: list[Stream], *, micro_batch_size: int,
                 grad_accum: int, num_processes: int = 1, rank: int = 0,
                 document_masking: bool = True, pin_memory: bool = False) -> None:
        self.plan, self.streams = plan, streams
        # Page-locked host memory lets `.to(cuda, non_blocking=True)` copy while the GPU still
        # computes the previous micro batch; on CPU it would only cost a copy.
        self.pin_memory = pin_memory
        self.micro, self.accum = micro_batch_size, grad_accum
        self.P, self.rank = num_processes, rank
        self.document_masking = document_masking
        self.global_batch = micro_batch_size * grad_accum * num_processes
        self.steps = plan.total_sequences // self.global_batch

    def state(self, step: int) -> dict:
        return {"plan": self.plan.fingerprint(), "sequences_consumed": step * self.global_batch}

    def sequence_indices(self, step: int, micro_step: int, rank: int | None = None) -> range:
        rank = self.rank if rank is None else rank
        first = step * self.global_batch + (micro_step * self.P + rank) * self.micro
        return range(first, first + self.micro)

    def micro_batch(self, step: int, micro_step: int, rank: int | None = None) -> MicroBatch:
        rows = []
        sources = []
        for i in self.sequence_indices(step, micro_step, rank):
            k, j = self.plan.locate(i)
            rows.append(self.streams[k].sequence(j))
            sources.append(k)
        input_ids = torch.from_numpy(np.stack([r.input_ids for r in rows]))
        labels = torch.from_numpy(np.stack([r.labels for r in rows]))
        if self.document_masking:
            position_ids = torch.from_numpy(np.stack([r.position_ids for r in rows]))
        else:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
        # The model shifts labels by one: the first position is never a target.
        label_tokens = int((labels[:, 1:] != -100).sum())
        if self.pin_memory:
            input_ids, labels, position_ids = (t.pin_memory() for t in
                                               (input_ids, labels, position_ids))
        return MicroBatch(input_ids, labels, position_ids, np.asarray(sources), label_tokens)

    def step_label_tokens(self, step: int) -> int:
        """Targets in the whole global batch of `step`, all processes (for loss normalization);
        computed from the plan and the packing, without building the other processes'
        sequences and without communication."""
        return int(self.step_trained_tokens(step).sum())

    def step_trained_tokens(self, step: int) -> np.ndarray:
        """Per source number, the targets of the whole global batch of `step`: what
        `labels[:, 1:] != -100` counts over every process's micro batches, from the plan alone,
        so every process knows every source's figure with no reduce."""
        total = np.zeros(len(self.streams), dtype=np.int64)
        first = step * self.global_batch
        for i in range(first, first + self.global_batch):
            k, j = self.plan.locate(i)
            total[k] += self.streams[k].label_tokens(j)
        return total

    def iter_steps(self, start_step: int = 0) -> Iterator[tuple[int, list[MicroBatch]]]:
        for step in range(start_step, self.steps):
            yield step, [self.micro_batch(step, a) for a in range(self.accum)]
