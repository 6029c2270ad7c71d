"""Learning-rate schedules as pure functions of the step: the factor applied to the peak rate."""

from __future__ import annotations

import math

from cptkit.config import TrainingConfig


def warmup_steps(config: TrainingConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return math.ceil(config.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, config: TrainingConfig) -> float:
    """Factor for the update made at `step` (0-based) of `total_steps`.

    - warmup: linear from 1/warmup to 1 over the warmup steps (no update is made at rate 0);
    - cosine: half a cosine from 1 down to min_lr_ratio at the last step;
    - wsd (warmup-stable-decay): 1 until the last decay_ratio of the steps, then linear to min_lr_ratio;
    - constant: 1.
    """
    warmup = warmup_steps(config, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = config.min_lr_ratio
    if config.lr_scheduler == "constant":
        return 1.0
    remaining = max(total_steps - warmup, 1)
    if config.lr_scheduler == "cosine":
        progress = min((step - warmup) / max(remaining - 1, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay = max(round(config.decay_ratio * total_steps), 1)
    decay_start = total_steps - decay
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay, 1.0)
    return 1.0 - (1.0 - floor) * progress
