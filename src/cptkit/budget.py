"""training.max_minutes: how many steps fit the time budget, from the speed of the steps timed so far."""

from __future__ import annotations

import numpy as np

from cptkit.checkpoints import TrainerState
from cptkit.config import TrainingConfig
from cptkit.schedule import steps_within

# Steps timed before a time budget (training.max_minutes) fixes the step count: the first step of a process
# is not timed (it pays for allocation and kernel selection); then _BUDGET_TIMED_STEPS, fewer when they
# already take a quarter of the budget. Their median is the speed (steps slowed by other work, or still
# warming up, do not set it unless they are most of them).
_BUDGET_TIMED_STEPS = 5
_BUDGET_TIMED_SHARE = 0.25
_BUDGET_RECENT_STEPS = 5
# A checkpoint's cost for the budget: its bytes (weights and two AdamW moments) at a slow disk's rate.
_SAVE_BYTES_PER_SECOND = 100e6


def budget_steps(
    tc: TrainingConfig, remaining: float, done: int, cap: int, step_seconds: float, eval_seconds: float, trainable: int
) -> int:
    """The step count that fits the rest of training.max_minutes at the measured speed."""
    save_seconds = trainable * 12 / _SAVE_BYTES_PER_SECOND
    return steps_within(remaining, done, cap, step_seconds, eval_seconds, save_seconds, tc.eval_steps, tc.save_steps)


def fit_budget(
    tc: TrainingConfig, remaining: float, state: TrainerState, step_times: list[float], total: int, trainable: int
) -> int | None:
    """A new step count for training.max_minutes, or None to keep `total`.

    The count is fixed once enough steps are timed (after the untimed first one, _BUDGET_TIMED_STEPS, or
    fewer that took _BUDGET_TIMED_SHARE of the budget), from their median. After that it is only lowered,
    and only when the recent pace (the median of the last _BUDGET_RECENT_STEPS) would overrun the budget
    by more than a step: a machine that got busier still ends on time, and the schedule still ends at its
    final rate. The time a single slow step lost is in `remaining` already; it does not set the pace."""
    timed = step_times[1:]
    budget = tc.max_minutes * 60 if tc.max_minutes else 0.0
    per_eval = state.eval_seconds / max(len(state.evals), 1)
    if state.planned_steps is None:
        if len(timed) < _BUDGET_TIMED_STEPS and not (timed and sum(timed) >= _BUDGET_TIMED_SHARE * budget):
            return None
        return budget_steps(tc, remaining, state.step, total, float(np.median(timed)), per_eval, trainable)
    if not timed or state.step >= total:
        return None
    pace = float(np.median(timed[-_BUDGET_RECENT_STEPS:]))  # a slower stretch, not one slow step
    if budget_steps(tc, remaining + pace, state.step, total, pace, per_eval, trainable) >= total:
        return None  # on time, give or take a step
    return budget_steps(tc, remaining, state.step, total, pace, per_eval, trainable)
