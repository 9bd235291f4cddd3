"""Training speed for the log lines: tokens per second over the steps themselves (evaluations
and checkpoints excluded) and, on a GPU, model FLOPs utilisation (MFU)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping

import torch

# Dense bf16 peak of one accelerator, in FLOP/s, by a substring of torch.cuda.get_device_name()
# (first match wins, so "H100 PCIe" precedes "H100"). Vendor datasheets, without sparsity.
PEAK_BF16_FLOPS = (("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12),
                   ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
                   ("A10G", 70e12), ("A10", 125e12), ("MI300X", 1307e12))


def peak_flops(device_name: str, env: Mapping[str, str] = os.environ) -> float | None:
    """Peak FLOP/s for MFU: $CPT_PEAK_TFLOPS when set, else the table above (None: unknown)."""
    if env.get("CPT_PEAK_TFLOPS"):
        return float(env["CPT_PEAK_TFLOPS"]) * 1e12
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Model FLOPs to train on one token (PaLM, Chowdhery et al. 2022, appendix B):
    6 N + 12 n_layers d_model seq_len, where N counts the parameters that take part in matrix
    products (every parameter but the input embedding table, which is a lookup; a tied output
    layer counts once) and the second term is attention's QK^T and AV, forward and backward.
    Activation recomputation is not counted (it is hardware, not model, FLOPs)."""
    params = {id(p): p.numel() for p in model.parameters()}
    n = sum(params.values())
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if embedding is not None:
        n -= embedding.weight.numel()
        if output is not None and output.weight is embedding.weight:
            n += output.weight.numel()
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    return 6.0 * n + 12.0 * layers * hidden * seq_len


class Throughput:
    """Tokens/s between two log lines, less the time spent inside `paused()` (evaluations,
    checkpoints), so that the figure measures the training steps alone."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None,
                 num_processes: int, start_step: int) -> None:
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak, self.num_processes = peak, num_processes
        self.last_time, self.last_step, self.paused_s = time.perf_counter(), start_step, 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def tokens_per_s(self, step: int) -> float:
        """Tokens/s since the last call (or the start), and start the next interval."""
        now = time.perf_counter()
        tps = (step - self.last_step) * self.tokens_per_step / max(
            now - self.last_time - self.paused_s, 1e-9)
        self.last_time, self.last_step, self.paused_s = now, step, 0.0
        return tps

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation across all processes; None where the peak is unknown."""
        if not self.peak:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.num_processes)
