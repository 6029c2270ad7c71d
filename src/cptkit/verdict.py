"""The verdict: adaptation, forgetting and drift against the config's thresholds."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cptkit.config import (
    EvaluateConfig,
)
from cptkit.results import Check, Verdict


def verdict(
    adaptation: float | None,
    forgetting_by_set: Mapping[str, float],
    drift_kl: float | None,
    ec: EvaluateConfig,
    chat_drift: float | None = None,
) -> Verdict:
    """Adaptation, forgetting (per held-out set), drift and chat drift against the thresholds; a check whose
    threshold or measurement is missing is reported as skipped."""
    checks = []

    def check(name: str, value: float | None, threshold: float | None, ok: Callable[[float, float], bool]) -> None:
        if threshold is None or value is None:
            checks.append(Check(name=name, value=value, threshold=threshold, passed=None))
        else:
            checks.append(Check(name=name, value=value, threshold=threshold, passed=bool(ok(value, threshold))))

    check("adaptation", adaptation, ec.min_adaptation, lambda v, t: v >= t)
    for set_name, value in forgetting_by_set.items():
        check(f"forgetting ({set_name})", value, ec.max_forgetting, lambda v, t: v <= t)
    check("drift_kl", drift_kl, ec.max_drift_kl, lambda v, t: v <= t)
    if ec.max_chat_drift is not None or chat_drift is not None:
        check("chat_drift", chat_drift, ec.max_chat_drift, lambda v, t: v <= t)
    decided = [c.passed for c in checks if c.passed is not None]
    return Verdict(passed=all(decided), checks=checks)


def relative_change(base: float, cpt: float) -> float:
    return (cpt - base) / base
