"""tune_report.html: the pilots, the fitted laws, the Pareto front of predicted domain gain against
forgetting, and the choice with the rule that made it, in one self-contained page (inline SVG, no
script, no network)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cptkit.artifacts import atomic_path
from cptkit.config import Config
from cptkit.tune_fit import Candidate, Choice, Fit, Law

if TYPE_CHECKING:
    from cptkit.tune import PilotResult

WIDTH, HEIGHT, PAD = 640, 400, 56


def write_report(path: Path, config: Config, pilots: Sequence[PilotResult], fit: Fit, choice: Choice) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(report_html(config, pilots, fit, choice), encoding="utf-8")
    return path


def report_html(config: Config, pilots: Sequence[PilotResult], fit: Fit, choice: Choice) -> str:
    c = choice.chosen
    ec = config.evaluate
    budget = []
    if ec.max_forgetting is not None:
        budget.append(f"forgetting at most {ec.max_forgetting:.1%}")
    if ec.max_drift_kl is not None:
        budget.append(f"drift KL at most {ec.max_drift_kl:g}")
    if ec.max_chat_drift is not None:
        budget.append(f"chat drift at most {ec.max_chat_drift:g}")
    if choice.unmeasured:
        unmeasured = ", ".join(f"evaluate.max_{name}" for name in choice.unmeasured)
        budget.append(f"not applied, not measured by the pilots: {unmeasured}")
    rows = "".join(_pilot_row(p, fit) for p in pilots)
    pilot_tokens = " and ".join(f"{t:,}" for t in sorted({p.tokens for p in pilots}))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cptkit tune</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
td, th {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }}
code {{ background: #f3f3f3; padding: 0 0.2rem; }}
</style></head><body>
<h1>cptkit tune: {html.escape(config.model.name)}</h1>
<p><b>Choice</b>: <code>data.replay_ratio: {c.replay_ratio:.3g}</code>,
<code>training.learning_rate: {c.learning_rate:.3g}</code> for a full run of {choice.tokens:,.0f} training
tokens (budget: {html.escape("; ".join(budget) or "none")}). Predicted there: domain perplexity
{-c.adaptation:+.2%}, worst held-out perplexity {c.relative_forgetting:+.2%}{_drift_text(c)}.</p>
{_rule_html(choice)}
<h2>Pareto front at {choice.tokens:,.0f} tokens</h2>
{pareto_svg(pilots, choice, ec.max_forgetting)}
<p>Grey: every candidate (replay ratio x learning rate inside the pilots' ranges) as the law predicts it;
blue line: the front (most domain gain for its forgetting); black circles: the pilots as measured (at their
own {pilot_tokens} tokens, not the full run's); red star: the choice; dashed: the forgetting budget.</p>
<h2>The laws</h2>
<p><code>y = exp(c0 + c1 ln((1 - r) D / D_ref) + c2 u + c3 ln(1 - r) + c4 u&sup2;)</code>,
<code>u = ln(lr / lr_ref)</code>, with the terms the pilots carry ({html.escape(", ".join(fit.terms))}), fitted by
least squares to {len(pilots)} pilots at {pilot_tokens} tokens (see docs/tune.md).</p>
<table><tr><th>quantity (nats per token)</th><th>coefficients ({html.escape(", ".join(fit.terms))})</th>
<th>leave-one-out RMSE</th></tr>
{_law_row("domain gain", fit.domain, fit.loo_rmse.get("domain"))}
{_law_row("forgetting", fit.forgetting, fit.loo_rmse.get("forgetting"))}
{_law_row("drift KL", fit.drift, fit.loo_rmse.get("drift"))}
{_law_row("chat drift", fit.chat_drift, fit.loo_rmse.get("chat_drift"))}
</table>
<p>lr_ref {fit.domain.lr_ref:.3g}, D_ref {fit.domain.d_ref:,.0f} tokens.</p>
<h2>Pilots</h2>
<table><tr><th>pilot</th><th>replay ratio</th><th>learning rate</th><th>tokens</th><th>domain gain</th><th>fitted</th>
<th>forgetting</th><th>fitted</th><th>drift KL</th><th>fitted</th><th>chat drift</th><th>fitted</th>
<th>seconds</th></tr>
{rows}</table>
</body></html>
"""


def _drift_text(c: Candidate) -> str:
    return "".join(
        f", {label} {value:.4f}"
        for label, value in (("drift KL", c.drift_kl), ("chat drift", c.chat_drift))
        if value is not None
    )


def _rule_html(choice: Choice) -> str:
    """The rule that chose, and its numbers: the largest gain, the tolerance, the chosen point's gain and drift."""
    if not choice.within_budget:
        return f"<p><b>Rule</b>: {html.escape(choice.rule)}.</p>"
    c, b = choice.chosen, choice.best
    drift = choice.tie_break.replace("_", " ")
    return f"""<p><b>Rule</b>: {html.escape(choice.rule)}.</p>
<table><tr><th></th><th>replay ratio</th><th>learning rate</th><th>predicted domain gain (nats)</th>
<th>predicted {drift}</th></tr>
<tr><td>largest gain within the budget</td><td>{b.replay_ratio:.3g}</td><td>{b.learning_rate:.3g}</td>
<td>{b.domain_gain:.4f}</td><td>{_fmt(getattr(b, choice.tie_break))}</td></tr>
<tr><td>chosen (gain within {choice.tolerance:.4f} of the largest, least {drift})</td><td>{c.replay_ratio:.3g}</td>
<td>{c.learning_rate:.3g}</td><td>{c.domain_gain:.4f}</td><td>{_fmt(getattr(c, choice.tie_break))}</td></tr>
</table>"""


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _law_row(name: str, law: Law | None, rmse: float | None) -> str:
    if law is None:
        return f"<tr><td>{name}</td><td colspan=2>not fitted (not measured on every pilot)</td></tr>"
    coef = ", ".join(f"{v:.4g}" for v in law.coef)
    return f"<tr><td>{name}</td><td>{coef}</td><td>{'n/a' if rmse is None else f'{rmse:.4f}'}</td></tr>"


def _pilot_row(p: PilotResult, fit: Fit) -> str:
    def fitted(law: Law | None) -> str:
        return "" if law is None else f"{float(law.predict(p.replay_ratio, p.learning_rate, p.tokens)):.4f}"

    return (
        f"<tr><td>{p.name}</td><td>{p.replay_ratio:.3g}</td><td>{p.learning_rate:.3g}</td><td>{p.tokens:,}</td>"
        f"<td>{p.domain_gain:.4f}</td><td>{fitted(fit.domain)}</td><td>{p.forgetting:.4f}</td>"
        f"<td>{fitted(fit.forgetting)}</td><td>{_fmt(p.drift_kl)}</td><td>{fitted(fit.drift)}</td>"
        f"<td>{_fmt(p.chat_drift)}</td><td>{fitted(fit.chat_drift)}</td><td>{p.seconds:.0f}</td></tr>\n"
    )


def pareto_svg(pilots: Sequence[PilotResult], choice: Choice, max_forgetting: float | None) -> str:
    """Domain perplexity gain (%) against forgetting (%): candidates, front, pilots, choice, budget."""
    points = [(c.relative_forgetting * 100, c.adaptation * 100) for c in choice.candidates]
    measured = [(p.relative_forgetting * 100, p.adaptation * 100) for p in pilots]
    xs = [x for x, _ in points + measured] + ([max_forgetting * 100] if max_forgetting is not None else [])
    ys = [y for _, y in points + measured]
    x0, x1 = _span(xs)
    y0, y1 = _span(ys)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img">']
    parts.append(
        f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="none" stroke="#999"/>'
    )
    for x, y in points:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="1.5" fill="#bbb"/>')
    front = " ".join(f"{sx(c.relative_forgetting * 100):.1f},{sy(c.adaptation * 100):.1f}" for c in choice.front)
    parts.append(f'<polyline points="{front}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for (x, y), p in zip(measured, pilots, strict=True):
        parts.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="none" stroke="#000"><title>{p.name}: replay '
            f"{p.replay_ratio:.3g}, lr {p.learning_rate:.3g}, {p.tokens:,} tokens</title></circle>"
        )
    if max_forgetting is not None:
        bx = sx(max_forgetting * 100)
        line = f'x1="{bx:.1f}" y1="{PAD}" x2="{bx:.1f}" y2="{HEIGHT - PAD}"'
        parts.append(f'<line {line} stroke="#d62728" stroke-dasharray="5,4"/>')
    c = choice.chosen
    cx, cy = sx(c.relative_forgetting * 100), sy(c.adaptation * 100)
    parts.append(f'<path d="{_star(cx, cy, 9)}" fill="#d62728"><title>chosen</title></path>')
    for value in _ticks(x0, x1):
        parts.append(
            f'<text x="{sx(value):.1f}" y="{HEIGHT - PAD + 16}" font-size="11" text-anchor="middle">{value:g}</text>'
        )
    for value in _ticks(y0, y1):
        parts.append(f'<text x="{PAD - 6}" y="{sy(value) + 4:.1f}" font-size="11" text-anchor="end">{value:g}</text>')
    parts.append(
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" font-size="12" text-anchor="middle">'
        "worst held-out perplexity change (%, forgetting)</text>"
    )
    parts.append(
        f'<text x="14" y="{HEIGHT / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {HEIGHT / 2})">'
        "domain perplexity fall (%, gain)</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _span(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    margin = (hi - lo) * 0.05 or 1.0
    return lo - margin, hi + margin


def _ticks(lo: float, hi: float) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / 4)) if hi > lo else 1.0
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= 6:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


def _star(x: float, y: float, r: float) -> str:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = math.pi / 2 + i * math.pi / 5
        points.append(f"{x + radius * math.cos(angle):.1f},{y - radius * math.sin(angle):.1f}")
    return "M" + " L".join(points) + " Z"
