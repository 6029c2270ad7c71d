"""Learning-rate schedules as pure functions of the step (the factor applied to the peak rate), and the
step count that fits a time budget."""

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
    start = wsd_decay_start(config, total_steps)
    if step < start:
        return 1.0
    progress = min((step - start + 1) / (total_steps - start), 1.0)
    return 1.0 - (1.0 - floor) * progress


def wsd_decay_start(config: TrainingConfig, total_steps: int) -> int:
    """The first step (0-based) of the wsd schedule's decay: the last decay_ratio of the steps, at least one."""
    return total_steps - max(round(config.decay_ratio * total_steps), 1)


def steps_within(
    remaining_seconds: float,
    done: int,
    cap: int,
    step_seconds: float,
    eval_seconds: float,
    save_seconds: float,
    eval_every: int,
    save_every: int,
) -> int:
    """The total step count for a time budget: the most steps whose remaining cost fits `remaining_seconds`
    (each step, a validation pass every `eval_every` steps and at the last one, a checkpoint every
    `save_every` steps before the last), at most `cap` and at least one more than the `done` ones (so the
    last update is made at the schedule's final rate)."""
    best = min(done + 1, cap) if cap > done else done
    cost = 0.0
    for total in range(done + 1, cap + 1):
        cost += step_seconds
        if total % eval_every == 0:
            cost += eval_seconds
        final_eval = 0.0 if total % eval_every == 0 else eval_seconds  # the last step always validates
        if cost + final_eval > remaining_seconds:
            break
        best = total
        if total % save_every == 0:
            cost += save_seconds  # saved before a later step, not after the last
    return best
