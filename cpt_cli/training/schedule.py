"""Learning-rate schedules for continued pre-training, as multipliers of the peak rate.

Every schedule warms up linearly from 0 (a new stage re-warms: Ibrahim et al. 2024 and Gupta et
al. 2023 found re-warming plus re-decaying recovers the best loss on new data). `wsd` holds the
peak after warmup and decays over the final `decay` fraction, so a later stage can branch from
its last pre-decay checkpoint.

The multiplier of the update made at step s (0-based) of T, with W warmup steps and floor
f = min_lr_ratio:

    warmup (s < W)   (s + 1) / (W + 1)                      first update 1/(W+1) of the peak
    constant         1
    linear           1 - (1 - f) p,          p = (s - W + 1) / (T - W)
    cosine           f + (1 - f) (1 + cos(pi p)) / 2
    wsd              1 before the cooldown start D = T - decay, then 1 - (1 - f) q (linear)
                     or 1 - (1 - f) sqrt(q) (1-sqrt),     q = (s - D + 1) / (T - D)

so the last update of every decaying schedule uses exactly f times the peak.
"""

from __future__ import annotations

import math

from cpt_cli.config import ScheduleConfig


def warmup_steps(config: ScheduleConfig, total_steps: int) -> int:
    return config.warmup_steps(total_steps)


def decay_start(config: ScheduleConfig, total_steps: int) -> int:
    """First step of the wsd cooldown (total_steps when there is none)."""
    return config.decay_start(total_steps)


def lr_multiplier(config: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier for the update made at `step` (0-based)."""
    warm = warmup_steps(config, total_steps)
    if step < warm:
        return (step + 1) / (warm + 1)
    floor = config.min_lr_ratio
    if config.name == "constant":
        return 1.0
    if config.name == "wsd":
        start = decay_start(config, total_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / max(1, total_steps - start))
        # 1-sqrt (Hagele et al. 2024): lr = peak * (1 - sqrt(progress)), a steep start and a
        # flat end; it beat linear cooldowns of the same length in their runs.
        shape = progress if config.decay_shape == "linear" else math.sqrt(progress)
        return 1.0 - (1.0 - floor) * shape
    progress = min(1.0, (step - warm + 1) / max(1, total_steps - warm))
    if config.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
