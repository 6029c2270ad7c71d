"""The evaluation report: `report.md` and a self-contained `report.html` (charts embedded as PNG), verdict
first, then the numbers behind it, the training run, the data, and side-by-side generations.

Everything here reads the evaluation results and the training summary; nothing is computed twice.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from cptkit import domain_tasks_report, report_chat
from cptkit.artifacts import atomic_path
from cptkit.results import EvaluationResults, TrainingSummary

REPORT_MD, REPORT_HTML = "report.md", "report.html"
CHART_METRICS, CHART_LOSSES = "metrics.png", "losses.png"
BASE_COLOR, CPT_COLOR = "#8c8c8c", "#1f77b4"


def write_report(results: EvaluationResults, summary: TrainingSummary | None, directory: Path) -> list[str]:
    """Write the charts, report.md and report.html into `directory`; return the file names written."""
    charts = {CHART_METRICS: metrics_chart(results)}
    losses = loss_chart(summary)
    if losses is not None:
        charts[CHART_LOSSES] = losses
    for name, png in charts.items():
        with atomic_path(directory / name) as tmp:
            tmp.write_bytes(png)
    with atomic_path(directory / REPORT_MD) as tmp:
        tmp.write_text(markdown(results, list(charts)), encoding="utf-8")
    with atomic_path(directory / REPORT_HTML) as tmp:
        tmp.write_text(to_html(results, charts), encoding="utf-8")
    return [*charts, REPORT_MD, REPORT_HTML]


# ---------------------------------------------------------------- text


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def headline(results: EvaluationResults) -> str:
    """One sentence: did the model get better on the domain, and what did it cost."""
    adaptation = results.adaptation
    parts = [f"domain perplexity {_pct(-adaptation if adaptation is not None else None)}"]
    for name, value in results.forgetting_by_set.items():
        parts.append(f"{name} perplexity {_pct(value)}")
    if results.drift_kl is not None:
        parts.append(f"drift KL {results.drift_kl:.4f} nats, top-1 agreement {results.top1_agreement:.1%}")
    if results.chat.drift is not None:
        parts.append(f"chat drift {results.chat.drift:+.4f} nats per answer token")
    status = "PASSED" if results.passed else "FAILED"
    if results.forgetting is None:
        parts.append("no held-out general set, so forgetting was not measured")
    return f"{status}: " + "; ".join(parts) + "."


def _check_rows(results: EvaluationResults) -> list[list[str]]:
    rows = []
    for c in results.verdict.checks:
        is_kl = c.name in ("drift_kl", "chat_drift")  # in nats, not a share
        value = _num(c.value, 4) if is_kl else _pct(c.value)
        if c.threshold is None:
            limit = "no threshold"
        elif c.name == "adaptation":
            limit = f">= {c.threshold:.1%}"
        else:
            limit = f"<= {_num(c.threshold, 4) if is_kl else format(c.threshold, '.1%')}"
        status = {True: "pass", False: "FAIL", None: "not checked"}[c.passed]
        rows.append([c.name, value, limit, status])
    return rows


def _metric_rows(results: EvaluationResults) -> list[list[str]]:
    rows = []
    for name, base in results.base.items():
        cpt = results.cpt[name]
        change = (cpt.perplexity - base.perplexity) / base.perplexity
        rows.append(
            [
                name,
                _num(base.perplexity),
                _num(cpt.perplexity),
                _pct(change),
                _num(base.bits_per_byte, 4),
                _num(cpt.bits_per_byte, 4),
                f"{cpt.tokens:,}",
                f"{cpt.bytes:,}",
                f"{cpt.documents:,}",
            ]
        )
    return rows


METRIC_HEADER = ["set", "base ppl", "adapted ppl", "change", "base bits/byte", "adapted bits/byte", "tokens", "bytes"]
METRIC_HEADER += ["documents"]


def _drift_rows(results: EvaluationResults) -> list[list[str]]:
    return [[name, _num(d.kl, 4), f"{d.top1_agreement:.1%}", f"{d.positions:,}"] for name, d in results.drift.items()]


def _training_rows(results: EvaluationResults) -> list[list[str]]:
    t = results.training
    if t is None:
        return []
    rows = [
        ["method", str(t.method)],
        ["steps", f"{t.steps}"],
        ["tokens trained", f"{t.tokens or 0:,}"],
        ["realized replay share", _share(t.replay_share)],
        ["packing efficiency", _share(t.packing_efficiency)],
        ["final training loss", _num(t.final_loss, 4)],
    ]
    if t.stopped_reason:
        rows.append(["stopped early", str(t.stopped_reason)])
    return rows


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _data_rows(results: EvaluationResults) -> list[list[str]]:
    rows = []
    for name, m in results.data.items():
        dropped = m.dropped or {}
        dropped_text = ", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "none"
        rows.append(
            [
                name,
                f"{m.documents_in or 0:,}",
                f"{m.documents_kept or 0:,}",
                f"{sum(dropped.values()):,} ({dropped_text})",
                f"{m.quarantined or 0:,}",
                f"{m.train_documents or 0:,} / {m.val_documents or 0:,}",
                f"{m.train_tokens or 0:,} / {m.val_tokens or 0:,}",
            ]
        )
    return rows


DATA_HEADER = ["data", "documents in", "kept", "dropped (by reason)", "quarantined", "train / val documents"]
DATA_HEADER += ["train / val tokens"]


def _task_rows(results: EvaluationResults) -> list[list[str]]:
    rows = []
    for task, metrics in (results.tasks.results or {}).items():
        for metric, by_model in metrics.items():
            base, cpt = by_model.get("base"), by_model.get("cpt")
            delta = f"{cpt - base:+.4f}" if base is not None and cpt is not None else "n/a"
            rows.append([task, metric, _num(base, 4), _num(cpt, 4), delta])
    return rows


def _tasks_note(results: EvaluationResults) -> str:
    tasks = results.tasks
    if tasks.status == "not_requested":
        return "No lm-evaluation-harness tasks were requested (`--tasks` or `evaluate.tasks`)."
    if tasks.status == "not_run":
        return f"lm-evaluation-harness tasks {', '.join(tasks.tasks)} were NOT run: {tasks.reason}."
    if tasks.status == "partial":  # the reason names each task not run
        return f"lm-evaluation-harness tasks {', '.join(tasks.not_run or {})} were NOT run: {tasks.reason}."
    return ""


def _settings_line(results: EvaluationResults) -> str:
    s = results.settings
    capped = [name for name, facts in results.sets.items() if facts.capped_at_tokens]
    cap = f"Sets capped at {s.max_tokens:,} tokens: {', '.join(capped)}. " if capped else ""
    pair = results.pair
    return (
        f"Sliding windows of {s.context_length} tokens advancing by {s.stride} (every token scored once), "
        f"batches of {s.batch_size} windows, {s.precision} on {s.device}; method {pair.method}, "
        f"base scored as {pair.base_scored_as}; quantization: {pair.quantization}. {cap}"
        f"{_decontamination_line(results)}"
        f"Evaluation took {results.seconds or 0:.1f} s "
        f"({results.tokens_per_second or 0:,.0f} tokens/s scored)."
    )


def _decontamination_line(results: EvaluationResults) -> str:
    s = results.settings
    checked = {name: f for name, f in results.sets.items() if f.contaminated is not None}
    if s.decontamination == "off":
        return "Not checked for overlap with the training text (evaluate.decontamination.mode: off). "
    if not checked:
        return "Not checked for overlap with the training text (no prepared training text was found). "
    found = ", ".join(f"{name} {f.contaminated:,} ({f.any_overlap or 0:,} share any)" for name, f in checked.items())
    action = "left out of the scores" if s.decontamination == "drop" else "scored anyway (mode: report)"
    return (
        f"Contaminated documents (at least {s.decontamination_min_share or 0:.0%} of their "
        f"{s.decontamination_ngram}-word sequences in the training text): {found}; {action}. "
    )


READING = (
    "How to read this: *adaptation* is the relative fall of the domain perplexity (higher is better); "
    "*forgetting* is the relative rise of perplexity on held-out general text (lower is better; negative "
    "means the adapted model got better there too); *drift* is the mean KL divergence from the base model's "
    "next-token distribution on general text, with the share of positions where both models' most likely "
    "token agrees: it shows change even where perplexity does not. Bits per byte compares models with "
    "different tokenizers."
)


def markdown(results: EvaluationResults, charts: list[str]) -> str:
    lines = [
        f"# Evaluation: `{results.pair.cpt_model}` vs base `{results.pair.base_model}`",
        "",
        f"**{headline(results)}**",
        "",
        *_md_table(["check", "measured", "threshold", "result"], _check_rows(results)),
        "",
        READING,
        "",
        "## Base vs adapted",
        "",
        *_md_table(METRIC_HEADER, _metric_rows(results)),
        "",
    ]
    if results.drift:
        lines += [*_md_table(["drift on", "KL(base || adapted), nats", "top-1 agreement", "positions"],
                             _drift_rows(results)), ""]  # fmt: skip
    lines += [f"![base vs adapted]({CHART_METRICS})", "", _settings_line(results), ""]
    lines += ["## Training", ""]
    training = _training_rows(results)
    lines += [*_md_table(["", ""], training), ""] if training else ["No training summary found.", ""]
    if CHART_LOSSES in charts:
        lines += [f"![loss curves]({CHART_LOSSES})", ""]
    data = _data_rows(results)
    if data:
        lines += ["## Data", "", *_md_table(DATA_HEADER, data), ""]
    lines += ["## Benchmarks", ""]
    task_rows = _task_rows(results)
    lines += [*_md_table(["task", "metric", "base", "adapted", "delta"], task_rows)] if task_rows else []
    note = _tasks_note(results)
    lines += [note, ""] if note else [""]
    lines += domain_tasks_report.markdown(results.domain_tasks, _md_table)
    if results.generations:
        lines += ["## Generations", "", "The same prompts and decoding settings for both models.", ""]
        for g in results.generations:
            lines += [f"### {g.kind}: {g.prompt}", ""]
            for label, completion in (("base", g.base), ("adapted", g.cpt)):
                # rstrip only: the completion's leading space separates it from the prompt.
                text = completion.rstrip() if completion.strip() else " (nothing)"
                lines += [f"**{label}:** {g.prompt}" + text.replace("\n", " "), ""]
    lines += report_chat.markdown(results.chat)
    return "\n".join(lines).rstrip() + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(value: str) -> str:
        return value.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}.verdict{font-size:1.2em;padding:.8em 1em;border-radius:6px}
.pass{background:#e6f4ea;border:1px solid #34a853}.fail{background:#fce8e6;border:1px solid #d93025}
.FAIL{color:#d93025;font-weight:bold}.gen td{width:50%;white-space:pre-wrap;font-family:ui-monospace,monospace;
font-size:.9em}img{max-width:100%}.note{color:#555}
"""


def to_html(results: EvaluationResults, charts: dict[str, bytes]) -> str:
    e = html.escape
    passed = results.passed
    cpt_model, base_model = results.pair.cpt_model, results.pair.base_model
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>cptkit evaluation: {e(cpt_model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Evaluation: <code>{e(cpt_model)}</code> vs base <code>{e(base_model)}</code></h1>",
        f"<div class='verdict {'pass' if passed else 'fail'}'><b>{e(headline(results))}</b></div>",
        _html_table(["check", "measured", "threshold", "result"], _check_rows(results), status_col=3),
        f"<p class='note'>{e(READING).replace('*', '')}</p>",
        "<h2>Base vs adapted</h2>",
        _html_table(METRIC_HEADER, _metric_rows(results)),
    ]
    if results.drift:
        header = ["drift on", "KL(base || adapted), nats", "top-1 agreement", "positions"]
        parts.append(_html_table(header, _drift_rows(results)))
    parts += [_img(charts[CHART_METRICS], "base vs adapted"), f"<p class='note'>{e(_settings_line(results))}</p>"]
    parts.append("<h2>Training</h2>")
    training = _training_rows(results)
    parts.append(_html_table(["", ""], training) if training else "<p>No training summary found.</p>")
    if CHART_LOSSES in charts:
        parts.append(_img(charts[CHART_LOSSES], "loss curves"))
    data = _data_rows(results)
    if data:
        parts += ["<h2>Data</h2>", _html_table(DATA_HEADER, data)]
    parts.append("<h2>Benchmarks</h2>")
    task_rows = _task_rows(results)
    if task_rows:
        parts.append(_html_table(["task", "metric", "base", "adapted", "delta"], task_rows))
    note = _tasks_note(results)
    if note:
        parts.append(f"<p>{e(note)}</p>")
    parts += domain_tasks_report.html_parts(results.domain_tasks, _html_table)
    if results.generations:
        parts += ["<h2>Generations</h2>", "<p>The same prompts and decoding settings for both models.</p>"]
        parts.append("<table class='gen'><tr><th>base</th><th>adapted</th></tr>")
        for g in results.generations:
            parts.append(f"<tr><th colspan='2'>{e(g.kind)}: {e(g.prompt)}</th></tr>")
            parts.append(f"<tr><td><b>{e(g.prompt)}</b>{e(g.base)}</td><td><b>{e(g.prompt)}</b>{e(g.cpt)}</td></tr>")
        parts.append("</table>")
    parts += report_chat.to_html(results.chat)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_table(header: list[str], rows: list[list[str]], status_col: int | None = None) -> str:
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            cls = f" class='{e(value)}'" if i == status_col else ""
            cells.append(f"<td{cls}>{e(value)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(png: bytes, alt: str) -> str:
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"


# ---------------------------------------------------------------- charts


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        from cptkit.errors import CptkitError

        raise CptkitError("the evaluation report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # Without the software version, a chart's bytes depend on its data only.
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def metrics_chart(results: EvaluationResults) -> bytes:
    """Perplexity of both models per set, and the relative change with the verdict's thresholds."""
    plt = _pyplot()
    names = list(results.base)
    base = [results.base[n].perplexity for n in names]
    cpt = [results.cpt[n].perplexity for n in names]
    change = [(c - b) / b * 100 for b, c in zip(base, cpt, strict=True)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = range(len(names))
    width = 0.38
    left.bar([x - width / 2 for x in xs], base, width, label="base", color=BASE_COLOR)
    left.bar([x + width / 2 for x in xs], cpt, width, label="adapted", color=CPT_COLOR)
    left.set_xticks(list(xs), names)
    left.set_ylabel("perplexity (lower is better)")
    left.set_title("Perplexity by evaluation set")
    left.legend(loc="lower right")
    colors = ["#34a853" if c <= 0 else "#d93025" for c in change]
    right.bar(list(xs), change, color=colors)
    right.axhline(0, color="#444", linewidth=0.8)
    checks = results.verdict.checks
    adaptation = next((c.threshold for c in checks if c.name == "adaptation"), None)
    if adaptation is not None:
        right.axhline(-adaptation * 100, color="#34a853", linestyle="--", linewidth=1,
                      label=f"domain target -{adaptation:.0%}")  # fmt: skip
    forgetting = next((c.threshold for c in checks if c.name.startswith("forgetting")), None)
    if forgetting is not None:
        right.axhline(forgetting * 100, color="#d93025", linestyle="--", linewidth=1,
                      label=f"forgetting limit +{forgetting:.0%}")  # fmt: skip
    for x, c in zip(xs, change, strict=True):
        right.annotate(f"{c:+.1f}%", (x, c), ha="center", va="bottom" if c >= 0 else "top", fontsize=9)
    right.set_xticks(list(xs), names)
    right.set_ylabel("adapted vs base perplexity (%)")
    right.set_title("Change from the base model")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def loss_chart(summary: TrainingSummary | None) -> bytes | None:
    """Training loss per step and the validation losses (domain and general) at each evaluation."""
    if summary is None or not summary.losses:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    losses = summary.losses
    ax.plot(range(1, len(losses) + 1), losses, color="#bbbbbb", linewidth=1, label="training loss")
    evals = summary.evals
    for key, color, label in (
        ("eval/domain_loss", CPT_COLOR, "domain validation"),
        ("eval/general_loss", "#ff7f0e", "general validation"),
    ):
        points = [(e["step"], e[key]) for e in evals if key in e]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("Training and validation loss (step 0 is the base model)")
    ax.legend()
    fig.tight_layout()
    return _png(fig)
