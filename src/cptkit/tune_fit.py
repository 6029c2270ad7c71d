"""The law `cptkit tune` fits to its pilots, its leave-one-out error, and the choice it makes.

Each of the domain gain (base minus adapted domain loss), the forgetting (the worst held-out set's loss
increase), the drift (KL on the general set) and the chat drift (log-likelihood lost on the base's chat
answers), all in nats per token, is modelled as

    y(r, lr, D) = exp(c0 + c1 ln((1 - r) D / D_ref) + c2 u + c3 ln(1 - r) + c4 u^2),   u = ln(lr / lr_ref)

with r the replay ratio, lr the peak learning rate and D the training tokens: a power law in the domain
tokens (1 - r) D, as the D-CPT law's domain term (arXiv 2406.01375) has one in the domain data, times a
log-quadratic in the learning rate (loss against log learning rate is U-shaped near its optimum), with
c3 the effect of replay beyond the domain tokens it displaces. c3 is fitted only where the pilots ran at
two or more token counts: at one count, ln((1 - r) D) and ln(1 - r) differ by a constant and the token
exponent c1 could not be told from replay's effect. The terms beyond (c0, c1, c2) are added one per pilot
from 6 pilots on (c3 first, then c4), so that leave-one-out still fits more points than coefficients.
Why this form, and when not to trust it: docs/tune.md.

Pure numpy/scipy: no model, no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# The law's terms (the names fit.json gives each coefficient): the first three always, the others as the
# pilots allow (law_terms).
CONST, DOMAIN_TOKENS, LOG_LR, REPLAY, LOG_LR_SQUARED = "const", "domain_tokens", "log_lr", "replay", "log_lr_squared"
BASIC_TERMS = (CONST, DOMAIN_TOKENS, LOG_LR)
MIN_PILOTS_FOR_FULL = 6  # for the first term beyond the basic three; each further one needs one pilot more
GRID = 41  # candidate points per axis for the choice
# ln y is kept in [-30, 3]: y up to 20 nats per token, far beyond any real loss change, and exp(y) stays finite.
EXPONENT = (-30.0, 3.0)
# Coefficient bounds: exponents of tokens and of the replay share within +-3, of the learning rate within +-10.
BOUNDS = {
    CONST: (-30.0, 3.0),
    DOMAIN_TOKENS: (-3.0, 3.0),
    LOG_LR: (-10.0, 10.0),
    REPLAY: (-3.0, 3.0),
    LOG_LR_SQUARED: (-10.0, 10.0),
}


@dataclass(frozen=True)
class Observation:
    """One pilot's result, in the law's terms."""

    replay_ratio: float
    learning_rate: float
    tokens: float
    domain_gain: float  # nats per token
    forgetting: float  # nats per token: ln(1 + evaluate's forgetting)
    drift_kl: float | None  # nats per position; None where the tokenizers differ
    chat_drift: float | None = None  # nats per answer token; None where chat drift was not measured


@dataclass(frozen=True)
class Law:
    """y = exp(sum of coef[i] * the term named terms[i]); see the module's docstring."""

    coef: tuple[float, ...]
    lr_ref: float
    d_ref: float
    terms: tuple[str, ...]

    def features(self, r: Any, lr: Any, d: Any) -> np.ndarray:
        return _features(
            np.asarray(r, float), np.asarray(lr, float), np.asarray(d, float), self.lr_ref, self.d_ref, self.terms
        )

    def predict(self, r: Any, lr: Any, d: Any) -> np.ndarray:
        # Clipped: a wild fit far from its pilots must not overflow to inf (and win the choice).
        return np.asarray(np.exp(np.clip(self.features(r, lr, d) @ np.asarray(self.coef), *EXPONENT)))


def _features(
    r: np.ndarray, lr: np.ndarray, d: np.ndarray, lr_ref: float, d_ref: float, terms: Sequence[str]
) -> np.ndarray:
    r, lr, d = np.broadcast_arrays(r, lr, d)
    u = np.log(lr / lr_ref)
    kept = np.log(np.clip(1.0 - r, 1e-9, None))
    columns = {
        CONST: np.ones_like(u),
        DOMAIN_TOKENS: kept + np.log(d / d_ref),
        LOG_LR: u,
        REPLAY: kept,
        LOG_LR_SQUARED: u * u,
    }
    return np.stack([columns[t] for t in terms], axis=-1)


def law_terms(pilots: Sequence[Observation]) -> tuple[str, ...]:
    """The terms the pilots can carry: the basic three (fewer with fewer pilots); from 6 pilots on one more
    per pilot: replay's own term where the pilots ran at two or more token counts and replay ratios (else
    it is not identified), then the learning rate's square."""
    extras = [LOG_LR_SQUARED]
    if len({p.tokens for p in pilots}) > 1 and len({p.replay_ratio for p in pilots}) > 1:
        extras.insert(0, REPLAY)
    terms = list(BASIC_TERMS)
    for extra in extras:
        if len(pilots) >= MIN_PILOTS_FOR_FULL + len(terms) - len(BASIC_TERMS):
            terms.append(extra)
    return tuple(terms[: len(pilots)])


def fit_law(
    r: Sequence[float],
    lr: Sequence[float],
    d: Sequence[float],
    y: Sequence[float],
    terms: Sequence[str],
    lr_ref: float,
    d_ref: float,
) -> Law:
    """Least squares in y (nats), started from the linear fit of ln y where y > 0."""
    from scipy.optimize import least_squares

    ys = np.asarray(y, float)
    feats = _features(np.asarray(r, float), np.asarray(lr, float), np.asarray(d, float), lr_ref, d_ref, terms)
    positive = ys > 0
    start = np.zeros(len(terms))
    if positive.sum() >= len(terms):
        start = np.linalg.lstsq(feats[positive], np.log(ys[positive]), rcond=None)[0]
    elif positive.any():
        start[0] = math.log(float(ys[positive].mean()))
    else:
        start[0] = math.log(1e-6)

    def residuals(c: np.ndarray) -> np.ndarray:
        return np.asarray(np.exp(np.clip(feats @ c, *EXPONENT)) - ys)

    # Bounded: with few or noisy pilots (or values at or below 0, which the law cannot reach) the
    # unbounded optimum can run off to exponents that mean nothing between the pilots.
    low, high = np.array([BOUNDS[t][0] for t in terms]), np.array([BOUNDS[t][1] for t in terms])
    solution = least_squares(residuals, np.clip(start, low, high), bounds=(low, high), method="trf")
    return Law(tuple(float(c) for c in solution.x), lr_ref, d_ref, tuple(terms))


@dataclass(frozen=True)
class Fit:
    """The laws, fitted to all pilots, and each one's leave-one-out RMSE (nats; None with too few pilots).
    A law is None where its quantity was not measured on every pilot."""

    terms: tuple[str, ...]
    domain: Law
    forgetting: Law
    drift: Law | None
    chat_drift: Law | None
    loo_rmse: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


TARGETS = ("domain", "forgetting", "drift", "chat_drift")


def _target(o: Observation, name: str) -> float | None:
    return {"domain": o.domain_gain, "forgetting": o.forgetting, "drift": o.drift_kl, "chat_drift": o.chat_drift}[name]


def fit_pilots(pilots: Sequence[Observation], terms: Sequence[str] | None = None) -> Fit:
    """The laws fitted to the pilots, with their leave-one-out errors."""
    if len(pilots) < 2:
        raise ValueError(f"the fit needs at least 2 pilots, got {len(pilots)}")
    terms = tuple(terms) if terms is not None else law_terms(pilots)
    lr_ref = float(np.exp(np.mean(np.log([p.learning_rate for p in pilots]))))
    d_ref = float(np.mean([p.tokens for p in pilots]))
    laws: dict[str, Law | None] = {}
    loo: dict[str, float | None] = {}
    for name in TARGETS:
        rows = [p for p in pilots if _target(p, name) is not None]
        if len(rows) < len(pilots):  # drift or chat drift missing on some pilot: not fitted
            laws[name], loo[name] = None, None
            continue
        cols = _columns(rows, name)
        laws[name] = fit_law(*cols, terms, lr_ref, d_ref)
        loo[name] = _loo_rmse(rows, name, terms, lr_ref, d_ref)
    domain, forgetting = laws["domain"], laws["forgetting"]
    assert domain is not None and forgetting is not None
    return Fit(terms, domain, forgetting, laws["drift"], laws["chat_drift"], loo)


def _columns(rows: Sequence[Observation], name: str) -> tuple[list[float], list[float], list[float], list[float]]:
    ys = [_target(p, name) for p in rows]
    return (
        [p.replay_ratio for p in rows],
        [p.learning_rate for p in rows],
        [p.tokens for p in rows],
        [float(y) for y in ys if y is not None],
    )


def _loo_rmse(
    rows: Sequence[Observation], name: str, terms: Sequence[str], lr_ref: float, d_ref: float
) -> float | None:
    """Each pilot predicted by the law fitted to the others: the error on pilots the fit has not seen."""
    if len(rows) <= len(terms):
        return None
    errors = []
    for i, held in enumerate(rows):
        law = fit_law(*_columns([p for j, p in enumerate(rows) if j != i], name), terms, lr_ref, d_ref)
        predicted = float(law.predict(held.replay_ratio, held.learning_rate, held.tokens))
        errors.append(predicted - float(_target(held, name) or 0.0))
    return float(np.sqrt(np.mean(np.square(errors))))


# ---------------------------------------------------------------- the choice


@dataclass(frozen=True)
class Candidate:
    replay_ratio: float
    learning_rate: float
    domain_gain: float  # predicted, nats per token
    forgetting: float  # predicted, nats per token
    drift_kl: float | None
    chat_drift: float | None = None

    @property
    def adaptation(self) -> float:
        """The predicted relative fall of domain perplexity (evaluate's adaptation)."""
        return 1 - math.exp(-self.domain_gain)

    @property
    def relative_forgetting(self) -> float:
        """The predicted relative rise of the worst held-out perplexity (evaluate's forgetting)."""
        return math.exp(self.forgetting) - 1


# What the tie-break minimizes, best first: chat drift is what moves on an instruct base (its general
# perplexity can fall under continual pretraining), drift KL where chat drift was not measured.
TIE_BREAKS = ("chat_drift", "drift_kl", "forgetting")


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, and the numbers of the rule that chose it (Choice.rule says it in words)."""

    chosen: Candidate
    within_budget: bool  # False: no candidate met the budget, the one least over it was chosen
    tokens: float
    best: Candidate  # the largest predicted domain gain within the budget
    tolerance: float  # gains this close to the largest are ties: the larger of the domain law's leave-one-out
    # RMSE (0 where it has none) and equal_gain x the largest gain
    equal_gain: float  # the share of the largest gain counted as equal (tune.equal_gain)
    tie_break: str  # one of TIE_BREAKS: the predicted quantity whose lowest decides among the ties
    unmeasured: tuple[str, ...]  # limits set in the config whose quantity the pilots did not measure (not applied)
    front: list[Candidate]  # the Pareto front (most gain for its forgetting), by forgetting
    candidates: list[Candidate]

    @property
    def rule(self) -> str:
        if not self.within_budget:
            return "no candidate meets the budget: the one least over it (its largest excess relative to the limit)"
        return (
            f"the largest predicted domain gain within the budget ({self.best.domain_gain:.4f} nats per token); among "
            f"the candidates within the budget whose predicted gain is within {self.tolerance:.4f} of it ("
            f"{self._tolerance_source}), the one with the lowest predicted {self.tie_break.replace('_', ' ')}"
        )

    @property
    def _tolerance_source(self) -> str:
        share = self.equal_gain * self.best.domain_gain
        if self.equal_gain > 0 and share >= self.tolerance:
            return f"tune.equal_gain: {self.equal_gain:.0%} of the largest gain"
        return "the domain law's leave-one-out error"


def choose(
    fit: Fit,
    replay_range: tuple[float, float],
    lr_range: tuple[float, float],
    tokens: float,
    max_forgetting: float | None,
    max_drift_kl: float | None,
    max_chat_drift: float | None = None,
    equal_gain: float = 0.0,
) -> Choice:
    """Among the candidates (inside the pilots' ranges: the law is not trusted beyond them) whose predicted
    forgetting, drift and chat drift at `tokens` are within the budget, find the largest predicted domain
    gain; then choose, of the candidates within the domain law's leave-one-out RMSE of it, the one with the
    lowest predicted drift; `equal_gain` widens the ties to that share of the largest gain. Maximizing the
    gain alone picks a corner (the highest rate, no replay) even where its lead over the others is smaller
    than the fit's error, and pays for that lead in drift."""
    rs = np.linspace(replay_range[0], replay_range[1], GRID)
    lrs = np.exp(np.linspace(math.log(lr_range[0]), math.log(lr_range[1]), GRID))
    r, lr = (a.ravel() for a in np.meshgrid(rs, lrs))
    gain = fit.domain.predict(r, lr, tokens)
    # The retention quantities the pilots measured (drift and chat drift only where they were).
    predicted = {"forgetting": fit.forgetting.predict(r, lr, tokens)}
    for name, law in (("drift_kl", fit.drift), ("chat_drift", fit.chat_drift)):
        if law is not None:
            predicted[name] = law.predict(r, lr, tokens)

    def value(name: str, i: int) -> float | None:
        return float(predicted[name][i]) if name in predicted else None

    candidates = [
        Candidate(
            float(r[i]),
            float(lr[i]),
            float(gain[i]),
            float(predicted["forgetting"][i]),
            value("drift_kl", i),
            value("chat_drift", i),
        )
        for i in range(len(r))
    ]
    limits = {
        "forgetting": math.log1p(max_forgetting) if max_forgetting is not None else None,
        "drift_kl": max_drift_kl,
        "chat_drift": max_chat_drift,
    }
    applied = {name: limit for name, limit in limits.items() if limit is not None and name in predicted}
    unmeasured = tuple(name for name, limit in limits.items() if limit is not None and name not in applied)
    # Each candidate's largest excess over a limit, relative to the limit: <= 0 within the budget.
    excess = np.full(len(r), -np.inf)
    for name, limit in applied.items():
        excess = np.maximum(excess, (predicted[name] - limit) / max(abs(limit), 1e-9))
    ok = excess <= 0
    tie_break = next(name for name in TIE_BREAKS if name in predicted)
    tolerance = fit.loo_rmse.get("domain") or 0.0
    if ok.any():
        best = int(np.flatnonzero(ok)[np.argmax(gain[ok])])
        tolerance = max(tolerance, equal_gain * max(float(gain[best]), 0.0))
        ties = np.flatnonzero(ok & (gain >= gain[best] - tolerance))
        retention = predicted[tie_break]
        # Equal drift (a law flat in a direction): the larger gain, then the lower replay and rate (a stable key).
        chosen = int(min(ties, key=lambda i: (retention[i], -gain[i], r[i], lr[i])))
    else:
        best = chosen = int(np.argmin(excess))
    return Choice(
        candidates[chosen],
        bool(ok.any()),
        tokens,
        candidates[best],
        tolerance,
        equal_gain,
        tie_break,
        unmeasured,
        pareto_front(candidates),
        candidates,
    )


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both counts (more gain and less forgetting), by forgetting."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.forgetting, -c.domain_gain)):
        if not front or c.domain_gain > front[-1].domain_gain:
            front.append(c)
    return front


# ---------------------------------------------------------------- the design


def design_points(
    kind: str,
    points: int,
    replay_range: tuple[float, float],
    lr_range: tuple[float, float],
    seed: int,
    levels: int = 1,
) -> list[tuple[float, float, int]]:
    """(replay ratio, learning rate, token level index) of each pilot: a scrambled Sobol sequence
    (space-filling) or a grid, learning rates on a log scale, the points split evenly among `levels` token
    levels so that each level's points span both ranges. The same for the same arguments."""
    unit: np.ndarray
    if kind == "grid":
        n_lr = max(1, math.isqrt(points))
        n_r = max(1, points // n_lr)
        a, b = np.meshgrid(np.arange(n_r), np.arange(n_lr))
        i_r, i_lr = a.ravel(), b.ravel()
        unit = np.stack([i_r / max(n_r - 1, 1), i_lr / max(n_lr - 1, 1)], axis=1)
        # A checkerboard: neighbours along either axis run at different levels, so every row and column
        # (with as many points as levels) holds every level.
        level = (i_r + i_lr) % levels
    else:
        from scipy.stats import qmc

        sampler = qmc.Sobol(d=3, scramble=True, seed=seed)
        # Sobol's balance holds for powers of two: draw the next one and keep the first `points`.
        drawn = sampler.random(2 ** math.ceil(math.log2(max(points, 2))))[:points]
        unit = drawn[:, :2]
        level = _spread_levels(unit, drawn[:, 2], levels)
    r = replay_range[0] + unit[:, 0] * (replay_range[1] - replay_range[0])
    lr = np.exp(math.log(lr_range[0]) + unit[:, 1] * (math.log(lr_range[1]) - math.log(lr_range[0])))
    return [(round(float(a), 4), float(f"{b:.3g}"), int(c)) for a, b, c in zip(r, lr, level, strict=True)]


def _spread_levels(unit: np.ndarray, third: np.ndarray, levels: int) -> np.ndarray:
    """Token level indices for points of the unit square, split evenly, each level spanning both axes.

    Alternating levels along the Sobol sequence would not do: consecutive Sobol points lie in opposite halves
    of each axis, so every other point sits in the same half of the learning-rate axis. Nor does a third
    Sobol coordinate alone, for few points (its projection with the learning rate is poor below 8). So the
    points are ordered by the colour of their quadrant on a 2 x 2 checkerboard (low-low and high-high, then
    low-high and high-low: each colour holds points in both halves of both axes), within a colour by the
    third Sobol coordinate, and cut into `levels` equal runs, the smallest level first."""
    colour = (np.floor(2 * unit[:, 0]) + np.floor(2 * unit[:, 1])) % 2
    order = np.lexsort((third, colour))
    level = np.empty(len(unit), dtype=int)
    level[order] = np.arange(len(unit)) * levels // len(unit)
    return level
