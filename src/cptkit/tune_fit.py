"""The law `cptkit tune` fits to its pilots, its leave-one-out error, and the choice it makes.

Each of the domain gain (base minus adapted domain loss), the forgetting (the worst held-out set's loss
increase) and the drift (KL on the general set), all in nats per token, is modelled as

    y(r, lr, D) = exp(c0 + c1 * ln((1 - r) D / D_ref) + c2 * u + c3 * u^2),   u = ln(lr / lr_ref)

with r the replay ratio, lr the peak learning rate and D the training tokens: a power law in the domain
tokens (1 - r) D, as the D-CPT law's domain term (arXiv 2406.01375) has one in the domain data, times a
log-quadratic in the learning rate (loss against log learning rate is U-shaped near its optimum). With
fewer than 6 pilots the u^2 term is dropped (3 coefficients), so that leave-one-out still fits more
points than coefficients. Why this form, and when not to trust it: docs/tune.md.

Pure numpy/scipy: no model, no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FULL_TERMS, REDUCED_TERMS = 4, 3
MIN_PILOTS_FOR_FULL = 6
GRID = 41  # candidate points per axis for the choice
# ln y is kept in [-30, 3]: y up to 20 nats per token, far beyond any real loss change, and exp(y) stays finite.
EXPONENT = (-30.0, 3.0)
# Coefficient bounds (c0, c1, c2, c3): exponents of tokens within +-3, of the learning rate within +-10.
BOUNDS = ([-30.0, -3.0, -10.0, -10.0], [3.0, 3.0, 10.0, 10.0])


@dataclass(frozen=True)
class Observation:
    """One pilot's result, in the law's terms."""

    replay_ratio: float
    learning_rate: float
    tokens: float
    domain_gain: float  # nats per token
    forgetting: float  # nats per token: ln(1 + evaluate's forgetting)
    drift_kl: float | None  # nats per position; None where the tokenizers differ


@dataclass(frozen=True)
class Law:
    """y = exp(c0 + c1 ln((1 - r) D / d_ref) + c2 u + c3 u^2), u = ln(lr / lr_ref)."""

    coef: tuple[float, ...]
    lr_ref: float
    d_ref: float

    def features(self, r: Any, lr: Any, d: Any) -> np.ndarray:
        return _features(np.asarray(r, float), np.asarray(lr, float), np.asarray(d, float), self.lr_ref, self.d_ref)[
            ..., : len(self.coef)
        ]

    def predict(self, r: Any, lr: Any, d: Any) -> np.ndarray:
        # Clipped: a wild fit far from its pilots must not overflow to inf (and win the choice).
        return np.asarray(np.exp(np.clip(self.features(r, lr, d) @ np.asarray(self.coef), *EXPONENT)))


def _features(r: np.ndarray, lr: np.ndarray, d: np.ndarray, lr_ref: float, d_ref: float) -> np.ndarray:
    r, lr, d = np.broadcast_arrays(r, lr, d)
    u = np.log(lr / lr_ref)
    x = np.log(np.clip(1.0 - r, 1e-9, None) * d / d_ref)
    return np.stack([np.ones_like(u), x, u, u * u], axis=-1)


def fit_law(
    r: Sequence[float],
    lr: Sequence[float],
    d: Sequence[float],
    y: Sequence[float],
    terms: int,
    lr_ref: float,
    d_ref: float,
) -> Law:
    """Least squares in y (nats), started from the linear fit of ln y where y > 0."""
    from scipy.optimize import least_squares

    ys = np.asarray(y, float)
    feats = _features(np.asarray(r, float), np.asarray(lr, float), np.asarray(d, float), lr_ref, d_ref)[:, :terms]
    positive = ys > 0
    start = np.zeros(terms)
    if positive.sum() >= terms:
        start = np.linalg.lstsq(feats[positive], np.log(ys[positive]), rcond=None)[0]
    elif positive.any():
        start[0] = math.log(float(ys[positive].mean()))
    else:
        start[0] = math.log(1e-6)

    def residuals(c: np.ndarray) -> np.ndarray:
        return np.asarray(np.exp(np.clip(feats @ c, *EXPONENT)) - ys)

    # Bounded: with few or noisy pilots (or values at or below 0, which the law cannot reach) the
    # unbounded optimum can run off to exponents that mean nothing between the pilots.
    low, high = BOUNDS[0][:terms], BOUNDS[1][:terms]
    solution = least_squares(residuals, np.clip(start, low, high), bounds=(low, high), method="trf")
    return Law(tuple(float(c) for c in solution.x), lr_ref, d_ref)


@dataclass(frozen=True)
class Fit:
    """The three laws, fitted to all pilots, and each one's leave-one-out RMSE (nats; None with too few pilots)."""

    terms: int
    domain: Law
    forgetting: Law
    drift: Law | None
    loo_rmse: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


TARGETS = ("domain", "forgetting", "drift")


def _target(o: Observation, name: str) -> float | None:
    return {"domain": o.domain_gain, "forgetting": o.forgetting, "drift": o.drift_kl}[name]


def fit_pilots(pilots: Sequence[Observation], terms: int | None = None) -> Fit:
    """The laws fitted to the pilots, with their leave-one-out errors."""
    if len(pilots) < 2:
        raise ValueError(f"the fit needs at least 2 pilots, got {len(pilots)}")
    if terms is None:
        terms = FULL_TERMS if len(pilots) >= MIN_PILOTS_FOR_FULL else REDUCED_TERMS
    terms = min(terms, len(pilots))
    lr_ref = float(np.exp(np.mean(np.log([p.learning_rate for p in pilots]))))
    d_ref = float(np.mean([p.tokens for p in pilots]))
    laws: dict[str, Law | None] = {}
    loo: dict[str, float | None] = {}
    for name in TARGETS:
        rows = [p for p in pilots if _target(p, name) is not None]
        if len(rows) < len(pilots):  # drift missing on some pilot: not fitted
            laws[name], loo[name] = None, None
            continue
        cols = _columns(rows, name)
        laws[name] = fit_law(*cols, terms, lr_ref, d_ref)
        loo[name] = _loo_rmse(rows, name, terms, lr_ref, d_ref)
    domain, forgetting = laws["domain"], laws["forgetting"]
    assert domain is not None and forgetting is not None
    return Fit(terms, domain, forgetting, laws["drift"], loo)


def _columns(rows: Sequence[Observation], name: str) -> tuple[list[float], list[float], list[float], list[float]]:
    ys = [_target(p, name) for p in rows]
    return (
        [p.replay_ratio for p in rows],
        [p.learning_rate for p in rows],
        [p.tokens for p in rows],
        [float(y) for y in ys if y is not None],
    )


def _loo_rmse(rows: Sequence[Observation], name: str, terms: int, lr_ref: float, d_ref: float) -> float | None:
    """Each pilot predicted by the law fitted to the others: the error on pilots the fit has not seen."""
    if len(rows) <= terms:
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

    @property
    def adaptation(self) -> float:
        """The predicted relative fall of domain perplexity (evaluate's adaptation)."""
        return 1 - math.exp(-self.domain_gain)

    @property
    def relative_forgetting(self) -> float:
        """The predicted relative rise of the worst held-out perplexity (evaluate's forgetting)."""
        return math.exp(self.forgetting) - 1


@dataclass(frozen=True)
class Choice:
    chosen: Candidate
    within_budget: bool  # False: no candidate met the budget, the least forgetting one was chosen
    tokens: float
    front: list[Candidate]  # the Pareto front (most gain for its forgetting), by forgetting
    candidates: list[Candidate]


def choose(
    fit: Fit,
    replay_range: tuple[float, float],
    lr_range: tuple[float, float],
    tokens: float,
    max_forgetting: float | None,
    max_drift_kl: float | None,
) -> Choice:
    """The candidate (inside the pilots' ranges: the law is not trusted beyond them) with the largest
    predicted domain gain at `tokens` whose predicted forgetting and drift are within the budget."""
    rs = np.linspace(replay_range[0], replay_range[1], GRID)
    lrs = np.exp(np.linspace(math.log(lr_range[0]), math.log(lr_range[1]), GRID))
    r, lr = (a.ravel() for a in np.meshgrid(rs, lrs))
    gain = fit.domain.predict(r, lr, tokens)
    forget = fit.forgetting.predict(r, lr, tokens)
    drift = fit.drift.predict(r, lr, tokens) if fit.drift is not None else None
    candidates = [
        Candidate(
            float(r[i]), float(lr[i]), float(gain[i]), float(forget[i]), float(drift[i]) if drift is not None else None
        )
        for i in range(len(r))
    ]
    ok = np.ones(len(r), dtype=bool)
    if max_forgetting is not None:
        ok &= forget <= math.log1p(max_forgetting)
    if max_drift_kl is not None and drift is not None:
        ok &= drift <= max_drift_kl
    best = int(np.flatnonzero(ok)[np.argmax(gain[ok])]) if ok.any() else int(np.argmin(forget))
    return Choice(candidates[best], bool(ok.any()), tokens, pareto_front(candidates), candidates)


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both counts (more gain and less forgetting), by forgetting."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.forgetting, -c.domain_gain)):
        if not front or c.domain_gain > front[-1].domain_gain:
            front.append(c)
    return front


# ---------------------------------------------------------------- the design


def design_points(
    kind: str, points: int, replay_range: tuple[float, float], lr_range: tuple[float, float], seed: int
) -> list[tuple[float, float]]:
    """(replay ratio, learning rate) of each pilot: a scrambled Sobol sequence (space-filling) or a grid,
    learning rates on a log scale. The same for the same arguments."""
    unit: np.ndarray
    if kind == "grid":
        n_lr = max(1, math.isqrt(points))
        n_r = max(1, points // n_lr)
        a, b = np.meshgrid(np.linspace(0, 1, n_r), np.linspace(0, 1, n_lr))
        unit = np.stack([a.ravel(), b.ravel()], axis=1)
    else:
        from scipy.stats import qmc

        sampler = qmc.Sobol(d=2, scramble=True, seed=seed)
        # Sobol's balance holds for powers of two: draw the next one and keep the first `points`.
        unit = sampler.random(2 ** math.ceil(math.log2(max(points, 2))))[:points]
    r = replay_range[0] + unit[:, 0] * (replay_range[1] - replay_range[0])
    lr = np.exp(math.log(lr_range[0]) + unit[:, 1] * (math.log(lr_range[1]) - math.log(lr_range[0])))
    return [(round(float(a), 4), float(f"{b:.3g}")) for a, b in zip(r, lr, strict=True)]
