"""The tune law: recovered from synthetic pilots generated from it plus noise (at one and at two token
counts); the choice, its tie-break among near-equal gains and its budget; the design and its token levels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cptkit.tune_fit import (
    BASIC_TERMS,
    CONST,
    DOMAIN_TOKENS,
    LOG_LR,
    LOG_LR_SQUARED,
    REPLAY,
    Fit,
    Law,
    Observation,
    choose,
    design_points,
    fit_pilots,
    law_terms,
    pareto_front,
)

ONE_LEVEL_TERMS = (*BASIC_TERMS, LOG_LR_SQUARED)
TRUE_DOMAIN = (math.log(0.08), 0.35, 0.4, -0.5)
TRUE_FORGETTING = (math.log(0.02), 0.6, 0.9, 0.05)
TRUE_DRIFT = (math.log(0.03), 0.5, 0.8, 0.0)

# At two token counts: replay's own term as well (c3). The domain gain's token exponent (0.35) differs from
# its exponent in the kept share 1 - r (0.35 - 0.5): replay costs less gain than the domain tokens it displaces.
ALL_TERMS = (CONST, DOMAIN_TOKENS, LOG_LR, REPLAY, LOG_LR_SQUARED)
TRUE_DOMAIN_5 = (math.log(0.08), 0.35, 0.4, -0.5, -0.5)
TRUE_DRIFT_5 = (math.log(0.03), 0.5, 0.8, 1.0, 0.0)
TRUE_CHAT_5 = (math.log(0.05), 0.3, 1.1, 0.4, 0.1)


def synthetic(
    points: list[tuple[float, float, int]],
    tokens: list[float],
    noise: float,
    seed: int,
    terms: tuple[str, ...] = ONE_LEVEL_TERMS,
    laws: tuple[tuple[float, ...], ...] = (TRUE_DOMAIN, TRUE_FORGETTING, TRUE_DRIFT),
) -> list[Observation]:
    """Pilots whose results follow the laws (domain, forgetting, drift and, given a fourth, chat drift),
    each at tokens[its level], with relative Gaussian noise."""
    rng = np.random.default_rng(seed)
    lr_ref = float(np.exp(np.mean(np.log([lr for _, lr, _ in points]))))
    d_ref = float(np.mean([tokens[k] for _, _, k in points]))

    def value(coef: tuple[float, ...], r: float, lr: float, d: float) -> float:
        return float(Law(coef, lr_ref, d_ref, terms).predict(r, lr, d)) * (1 + noise * rng.standard_normal())

    out = []
    for r, lr, k in points:
        values = [value(coef, r, lr, tokens[k]) for coef in laws]
        out.append(Observation(r, lr, tokens[k], *values))
    return out


def test_the_fit_recovers_known_parameters_from_noisy_pilots() -> None:
    points = design_points("space-filling", 12, (0.0, 0.6), (1e-4, 1e-2), seed=3)
    fit = fit_pilots(synthetic(points, [1e6], noise=0.01, seed=0))
    assert fit.terms == ONE_LEVEL_TERMS  # one token count: no replay term
    for law, true in ((fit.domain, TRUE_DOMAIN), (fit.forgetting, TRUE_FORGETTING)):
        assert law.coef == pytest.approx(true, abs=0.06)
    assert fit.drift is not None and fit.drift.coef == pytest.approx(TRUE_DRIFT, abs=0.06)
    assert fit.chat_drift is None and fit.loo_rmse["chat_drift"] is None  # not measured
    # Leave-one-out: the held-out pilots are predicted to about the noise (1% of values up to ~0.3 nats).
    assert all(fit.loo_rmse[name] is not None and fit.loo_rmse[name] < 0.01 for name in ("domain", "drift"))
    # Without noise, exactly.
    exact = fit_pilots(synthetic(points, [1e6], noise=0.0, seed=0))
    assert exact.domain.coef == pytest.approx(TRUE_DOMAIN, abs=1e-6)


def test_two_token_levels_identify_the_token_exponent_apart_from_replay() -> None:
    points = design_points("space-filling", 12, (0.0, 0.6), (1e-4, 1e-2), seed=3, levels=2)
    laws = (TRUE_DOMAIN_5, (*TRUE_FORGETTING, 0.2), TRUE_DRIFT_5, TRUE_CHAT_5)
    pilots = synthetic(points, [5e5, 1e6], noise=0.01, seed=0, terms=ALL_TERMS, laws=laws)
    fit = fit_pilots(pilots)
    assert fit.terms == ALL_TERMS
    assert fit.domain.coef[1] == pytest.approx(0.35, abs=0.1)  # the token exponent
    assert fit.domain.coef[3] == pytest.approx(-0.5, abs=0.15)  # replay's own effect
    assert fit.domain.coef == pytest.approx(TRUE_DOMAIN_5, abs=0.15)
    assert fit.drift is not None and fit.drift.coef == pytest.approx(TRUE_DRIFT_5, abs=0.15)
    # Chat drift: a law of the same form, with its leave-one-out error.
    assert fit.chat_drift is not None and fit.chat_drift.coef == pytest.approx(TRUE_CHAT_5, abs=0.15)
    assert fit.loo_rmse["chat_drift"] is not None and fit.loo_rmse["chat_drift"] < 0.01
    # Extrapolated to 8x the longest pilots, the gain is within a few percent of the truth.
    truth = Law(TRUE_DOMAIN_5, fit.domain.lr_ref, fit.domain.d_ref, ALL_TERMS)
    for r, lr in ((0.0, 1e-3), (0.5, 3e-4)):
        assert float(fit.domain.predict(r, lr, 8e6)) == pytest.approx(float(truth.predict(r, lr, 8e6)), rel=0.08)

    # The same design at one token count cannot tell them apart: the token exponent it fits is replay's
    # whole effect (0.35 - 0.5), and the extrapolation is off by far more.
    one = fit_pilots(synthetic(points, [1e6, 1e6], noise=0.01, seed=0, terms=ALL_TERMS, laws=laws))
    assert REPLAY not in one.terms and abs(one.domain.coef[1] - 0.35) > 0.3
    assert float(one.domain.predict(0.0, 1e-3, 8e6)) < 0.8 * float(truth.predict(0.0, 1e-3, 8e6))


def test_the_terms_follow_the_pilots() -> None:
    def pilots(n: int, tokens: list[float]) -> list[Observation]:
        return [Observation(i / 10, 1e-3 * (i + 1), tokens[i % len(tokens)], 0.1, 0.01, 0.01) for i in range(n)]

    assert law_terms(pilots(5, [1.0, 2.0])) == BASIC_TERMS
    assert law_terms(pilots(6, [1.0, 2.0])) == (*BASIC_TERMS, REPLAY)
    assert law_terms(pilots(7, [1.0, 2.0])) == ALL_TERMS
    assert law_terms(pilots(7, [1.0])) == ONE_LEVEL_TERMS  # one token count: replay's term is not identified
    assert law_terms(pilots(2, [1.0, 2.0])) == (CONST, DOMAIN_TOKENS)


def test_few_pilots_fit_the_reduced_law() -> None:
    points = design_points("grid", 4, (0.0, 0.5), (1e-4, 1e-3), seed=0)
    assert len(points) == 4 and len(set(points)) == 4
    fit = fit_pilots(synthetic(points, [5e5], noise=0.0, seed=1))
    assert fit.terms == BASIC_TERMS and len(fit.domain.coef) == 3
    assert fit.loo_rmse["domain"] is not None


def test_the_choice_is_the_largest_gain_within_the_budget() -> None:
    points = design_points("space-filling", 12, (0.0, 0.6), (1e-4, 1e-2), seed=3)
    fit = fit_pilots(synthetic(points, [1e6], noise=0.0, seed=0))
    free = choose(fit, (0.0, 0.6), (1e-4, 1e-2), 4e6, None, None)
    tight = choose(fit, (0.0, 0.6), (1e-4, 1e-2), 4e6, max_forgetting=0.03, max_drift_kl=None)
    assert tight.within_budget and tight.chosen.relative_forgetting <= 0.03
    assert tight.best.domain_gain <= free.best.domain_gain
    assert max(c.domain_gain for c in tight.candidates if c.relative_forgetting <= 0.03) == tight.best.domain_gain
    # Without noise the tolerance is nil: the choice is the largest gain.
    assert tight.tolerance < 1e-6 and tight.chosen.domain_gain == pytest.approx(tight.best.domain_gain, abs=1e-6)
    # More replay lowers the forgetting of the same learning rate: the budget pushes replay up.
    assert (
        tight.chosen.replay_ratio > free.chosen.replay_ratio or tight.chosen.learning_rate < free.chosen.learning_rate
    )
    impossible = choose(fit, (0.0, 0.6), (1e-4, 1e-2), 4e6, max_forgetting=1e-9, max_drift_kl=None)
    assert not impossible.within_budget
    assert impossible.chosen.forgetting == min(c.forgetting for c in impossible.candidates)
    front = pareto_front(free.candidates)
    assert all(a.forgetting <= b.forgetting and a.domain_gain < b.domain_gain for a, b in itertools.pairwise(front))
    assert tight.best in front


def flat_fit(tolerance: float | None, chat: bool = True) -> Fit:
    """A fit whose domain gain rises only slightly with the learning rate and falls slightly with replay
    (the corner, top rate and no replay, is the largest by a hair), whose chat drift rises steeply with the
    rate and whose drift KL falls with it (the two tie-breaks point to opposite ends)."""
    terms = (CONST, DOMAIN_TOKENS, LOG_LR)
    lr_ref, d_ref = 1e-3, 1e6

    def law(*coef: float) -> Law:
        return Law(coef, lr_ref, d_ref, terms)

    return Fit(
        terms,
        domain=law(math.log(0.2), 0.02, 0.01),
        forgetting=law(math.log(0.01), 0.5, 0.5),
        drift=law(math.log(0.05), 0.1, -0.5),
        chat_drift=law(math.log(0.1), 0.3, 1.0) if chat else None,
        loo_rmse={"domain": tolerance, "forgetting": None, "drift": None, "chat_drift": None},
    )


def test_the_choice_takes_the_least_drift_among_gains_within_the_fit_error() -> None:
    ranges = ((0.0, 0.5), (1e-4, 1e-2))
    tolerance = 0.004
    choice = choose(flat_fit(tolerance), *ranges, 1e6, None, None)
    best, chosen = choice.best, choice.chosen
    assert (best.replay_ratio, best.learning_rate) == pytest.approx((0.0, 1e-2))  # the corner
    assert choice.tie_break == "chat_drift" and choice.tolerance == tolerance
    ties = [c for c in choice.candidates if c.domain_gain >= best.domain_gain - tolerance]
    assert len(ties) > 1 and chosen in ties
    assert chosen.chat_drift == min(c.chat_drift for c in ties if c.chat_drift is not None)
    assert chosen.learning_rate < best.learning_rate / 3 and chosen.chat_drift < best.chat_drift / 3  # type: ignore[operator]
    assert "within 0.0040 of it (the domain law's leave-one-out error)" in choice.rule and "chat drift" in choice.rule

    # Without a leave-one-out error: no ties, the corner.
    assert choose(flat_fit(None), *ranges, 1e6, None, None).chosen == best
    # Without chat drift the drift KL decides, which falls with the rate: the top rate again.
    by_kl = choose(flat_fit(tolerance, chat=False), *ranges, 1e6, None, None)
    assert by_kl.tie_break == "drift_kl" and by_kl.chosen.learning_rate == pytest.approx(1e-2)


def test_max_chat_drift_bounds_the_choice() -> None:
    ranges = ((0.0, 0.5), (1e-4, 1e-2))
    free = choose(flat_fit(None), *ranges, 1e6, None, None)
    limit = 0.05
    bounded = choose(flat_fit(None), *ranges, 1e6, None, None, max_chat_drift=limit)
    assert bounded.within_budget and free.chosen.chat_drift is not None and free.chosen.chat_drift > limit
    assert bounded.chosen.chat_drift is not None and bounded.chosen.chat_drift <= limit
    allowed = [c for c in bounded.candidates if c.chat_drift is not None and c.chat_drift <= limit]
    assert bounded.best.domain_gain == max(c.domain_gain for c in allowed)
    # With the tie-break as well, still within the limit.
    tied = choose(flat_fit(0.004), *ranges, 1e6, None, None, max_chat_drift=limit)
    assert tied.chosen.chat_drift is not None and tied.chosen.chat_drift <= limit
    # A limit no candidate meets: the one least over it.
    over = choose(flat_fit(None), *ranges, 1e6, None, None, max_chat_drift=1e-6)
    assert not over.within_budget and over.chosen.chat_drift == min(c.chat_drift or 0 for c in over.candidates)
    # Chat drift not measured: the limit is not applied, and the choice says so.
    unmeasured = choose(flat_fit(None, chat=False), *ranges, 1e6, None, None, max_chat_drift=limit)
    assert unmeasured.within_budget and unmeasured.unmeasured == ("chat_drift",)


def test_designs_are_reproducible_and_inside_the_ranges() -> None:
    a = design_points("space-filling", 8, (0.1, 0.4), (1e-5, 1e-3), seed=5)
    assert a == design_points("space-filling", 8, (0.1, 0.4), (1e-5, 1e-3), seed=5)
    assert len({(r, lr) for r, lr, _ in a}) == 8 and {k for _, _, k in a} == {0}
    assert all(0.1 <= r <= 0.4 and 1e-5 <= lr <= 1e-3 * 1.001 for r, lr, _ in a)
    assert len(design_points("grid", 9, (0.0, 0.5), (1e-4, 1e-3), 0)) == 9


@pytest.mark.parametrize("kind", ["space-filling", "grid"])
def test_every_token_level_spans_both_ranges(kind: str) -> None:
    """Each level holds an even share of the points, in both halves of the replay and learning-rate ranges
    (alternating levels along the Sobol sequence would put a level's points in one half of the rates)."""
    for points, seed in itertools.product(range(4, 17), range(10)):
        if kind == "grid" and points not in (4, 6, 9, 12, 16):
            continue
        design = design_points(kind, points, (0.0, 0.5), (1e-4, 1e-2), seed, levels=2)
        for k in (0, 1):
            mine = [(r, lr) for r, lr, level in design if level == k]
            assert abs(len(mine) - len(design) / 2) <= 0.5, (points, seed)
            if points == 5:  # 2 and 3 points: Sobol's first 5 need not fill each quadrant
                continue
            assert min(r for r, _ in mine) < 0.25 <= max(r for r, _ in mine), (points, seed, k)
            assert min(lr for _, lr in mine) < 1e-3 <= max(lr for _, lr in mine), (points, seed, k)
