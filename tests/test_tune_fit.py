"""The tune law: recovered from synthetic pilots generated from it plus noise; the choice and its front."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cptkit.tune_fit import Law, Observation, choose, design_points, fit_pilots, pareto_front

TRUE_DOMAIN = (math.log(0.08), 0.35, 0.4, -0.5)
TRUE_FORGETTING = (math.log(0.02), 0.6, 0.9, 0.05)
TRUE_DRIFT = (math.log(0.03), 0.5, 0.8, 0.0)


def synthetic(points: list[tuple[float, float]], tokens: float, noise: float, seed: int) -> list[Observation]:
    """Pilots whose results follow the law, with relative Gaussian noise."""
    rng = np.random.default_rng(seed)
    lr_ref = float(np.exp(np.mean(np.log([lr for _, lr in points]))))

    def value(coef: tuple[float, ...], r: float, lr: float) -> float:
        law = Law(coef, lr_ref, tokens)
        return float(law.predict(r, lr, tokens)) * (1 + noise * rng.standard_normal())

    return [
        Observation(r, lr, tokens, value(TRUE_DOMAIN, r, lr), value(TRUE_FORGETTING, r, lr), value(TRUE_DRIFT, r, lr))
        for r, lr in points
    ]


def test_the_fit_recovers_known_parameters_from_noisy_pilots() -> None:
    points = design_points("space-filling", 12, (0.0, 0.6), (1e-4, 1e-2), seed=3)
    fit = fit_pilots(synthetic(points, 1e6, noise=0.01, seed=0))
    assert fit.terms == 4
    for law, true in ((fit.domain, TRUE_DOMAIN), (fit.forgetting, TRUE_FORGETTING)):
        assert law.coef == pytest.approx(true, abs=0.06)
    assert fit.drift is not None and fit.drift.coef == pytest.approx(TRUE_DRIFT, abs=0.06)
    # Leave-one-out: the held-out pilots are predicted to about the noise (1% of values up to ~0.3 nats).
    assert all(e is not None and e < 0.01 for e in fit.loo_rmse.values()), fit.loo_rmse
    # Without noise, exactly.
    exact = fit_pilots(synthetic(points, 1e6, noise=0.0, seed=0))
    assert exact.domain.coef == pytest.approx(TRUE_DOMAIN, abs=1e-6)


def test_few_pilots_fit_the_reduced_law() -> None:
    points = design_points("grid", 4, (0.0, 0.5), (1e-4, 1e-3), seed=0)
    assert len(points) == 4 and len(set(points)) == 4
    fit = fit_pilots(synthetic(points, 5e5, noise=0.0, seed=1))
    assert fit.terms == 3 and len(fit.domain.coef) == 3
    assert fit.loo_rmse["domain"] is not None


def test_the_choice_is_the_largest_gain_within_the_budget() -> None:
    points = design_points("space-filling", 12, (0.0, 0.6), (1e-4, 1e-2), seed=3)
    fit = fit_pilots(synthetic(points, 1e6, noise=0.0, seed=0))
    free = choose(fit, (0.0, 0.6), (1e-4, 1e-2), 4e6, None, None)
    tight = choose(fit, (0.0, 0.6), (1e-4, 1e-2), 4e6, max_forgetting=0.03, max_drift_kl=None)
    assert tight.within_budget and tight.chosen.relative_forgetting <= 0.03
    assert tight.chosen.domain_gain <= free.chosen.domain_gain
    assert max(c.domain_gain for c in tight.candidates if c.relative_forgetting <= 0.03) == tight.chosen.domain_gain
    # More replay lowers the forgetting of the same learning rate: the budget pushes replay up.
    assert (
        tight.chosen.replay_ratio > free.chosen.replay_ratio or tight.chosen.learning_rate < free.chosen.learning_rate
    )
    impossible = choose(fit, (0.0, 0.6), (1e-4, 1e-2), 4e6, max_forgetting=1e-9, max_drift_kl=None)
    assert not impossible.within_budget
    front = pareto_front(free.candidates)
    assert all(a.forgetting <= b.forgetting and a.domain_gain < b.domain_gain for a, b in itertools.pairwise(front))
    assert tight.chosen in front


def test_designs_are_reproducible_and_inside_the_ranges() -> None:
    a = design_points("space-filling", 8, (0.1, 0.4), (1e-5, 1e-3), seed=5)
    assert a == design_points("space-filling", 8, (0.1, 0.4), (1e-5, 1e-3), seed=5)
    assert len(set(a)) == 8
    assert all(0.1 <= r <= 0.4 and 1e-5 <= lr <= 1e-3 * 1.001 for r, lr in a)
    assert len(design_points("grid", 9, (0.0, 0.5), (1e-4, 1e-3), 0)) == 9
