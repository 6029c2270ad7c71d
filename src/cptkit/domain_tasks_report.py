"""The report's section on the generated domain tasks (domain_tasks): accuracy of base and adapted model
with bootstrap intervals, the cloze, term-span vs all-token perplexity, and items whose answer changed.
report.py places it; this module only reads the results."""

from __future__ import annotations

import html
from collections.abc import Callable

from cptkit.results import DomainTaskResults, DomainTaskScore, Interval, ItemExample

TITLE = "Generated domain tasks"
SCORE_HEADER = ["task", "metric", "base", "adapted", "change (95% interval)"]
EXAMPLE_HEADER = ["passage (ends before the term)", "answer", "base chose", "adapted chose"]
# The report's own table writers, passed in so that the section looks like the rest of the report.
TableMaker = Callable[[list[str], list[list[str]]], list[str]]
HtmlTableMaker = Callable[[list[str], list[list[str]]], str]


def _interval(i: Interval, signed: bool = False) -> str:
    """A share with its interval; a change of a share in percentage points (pp), so it does not read as
    a relative change."""
    if signed:
        return f"{i.value * 100:+.1f} pp [{i.low * 100:+.1f}, {i.high * 100:+.1f}]"
    return f"{i.value:.1%} [{i.low:.1%}, {i.high:.1%}]"


def _nats(i: Interval | None) -> str:
    return "" if i is None else f"{i.value:+.3f} [{i.low:+.3f}, {i.high:+.3f}]"


def _ppl(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.3f}"


def _change(base: float | None, cpt: float | None) -> str:
    return "n/a" if base is None or cpt is None or base == 0 else f"{(cpt - base) / base:+.1%}"


def intro(r: DomainTaskResults) -> str:
    if r.status != "ok":
        return f"The generated domain tasks were not run: {r.reason}."
    return (
        f"{r.items:,} items from {r.documents:,} held-out domain documents, each a passage ending just before one of "
        f"{r.terms:,} terms characteristic of the domain (log-odds against the general text); "
        f"{r.contaminated_items:,} items overlapping the training text were left out. Multiple choice: the "
        f"term among {r.distractors} other terms that fit the same place in a sentence, chosen by log-likelihood "
        f"(random baseline {r.random_baseline or 0:.1%}); the adapted model answers {r.items_gained:,} items "
        f"right that the base got wrong and {r.items_lost:,} the other way. Intervals: 95% bootstrap over "
        f"documents (a drawn document brings all its items). The task files "
        f"(lm-evaluation-harness YAML + JSONL, and terms.json) are in `{r.folder}/`; took {r.seconds or 0:.1f} s."
    )


def score_rows(r: DomainTaskResults) -> list[list[str]]:
    base, cpt = r.base, r.cpt
    if base is None or cpt is None:
        return []
    rows = [
        ["multiple choice", "accuracy", _interval(base.mc_accuracy), _interval(cpt.mc_accuracy),
         _interval(r.accuracy_change, signed=True) if r.accuracy_change else "n/a"],
        ["term cloze", "exact match (greedy)", _interval(base.cloze_exact_match), _interval(cpt.cloze_exact_match),
         _interval(r.exact_match_change, signed=True) if r.exact_match_change else "n/a"],
        ["term cloze", "mean log-likelihood of the term (nats)", f"{base.cloze_loglikelihood:.3f}",
         f"{cpt.cloze_loglikelihood:.3f}", _nats(r.loglikelihood_change)
         or f"{cpt.cloze_loglikelihood - base.cloze_loglikelihood:+.3f}"],
    ]  # fmt: skip
    rows += _span_rows(base, cpt)
    return rows


def _span_rows(base: DomainTaskScore, cpt: DomainTaskScore) -> list[list[str]]:
    return [
        [f"term-span ({cpt.term_tokens:,} tokens)", "perplexity on the terms' tokens", _ppl(base.term_perplexity),
         _ppl(cpt.term_perplexity), _change(base.term_perplexity, cpt.term_perplexity)],
        [f"all tokens ({cpt.all_tokens:,})", "perplexity, same documents", _ppl(base.all_perplexity),
         _ppl(cpt.all_perplexity), _change(base.all_perplexity, cpt.all_perplexity)],
    ]  # fmt: skip


def _example_rows(examples: list[ItemExample]) -> list[list[str]]:
    return [[_tail(e.context), e.answer, e.base, e.cpt] for e in examples]


def _tail(context: str, chars: int = 240) -> str:
    return "..." + context[-chars:] if len(context) > chars else context


def _example_groups(r: DomainTaskResults) -> list[tuple[str, list[ItemExample]]]:
    return [("The adapted model now gets right", r.gained), ("The adapted model now gets wrong", r.lost)]


def markdown(r: DomainTaskResults, table: TableMaker) -> list[str]:
    lines = [f"## {TITLE}", "", intro(r), ""]
    rows = score_rows(r)
    if rows:
        lines += [*table(SCORE_HEADER, rows), ""]
    for title, examples in _example_groups(r):
        if examples:
            lines += [f"**{title}:**", "", *table(EXAMPLE_HEADER, _example_rows(examples)), ""]
    return lines


def html_parts(r: DomainTaskResults, table: HtmlTableMaker) -> list[str]:
    e = html.escape
    parts = [f"<h2>{TITLE}</h2>", f"<p>{e(intro(r))}</p>"]
    rows = score_rows(r)
    if rows:
        parts.append(table(SCORE_HEADER, rows))
    for title, examples in _example_groups(r):
        if examples:
            parts += [f"<h3>{e(title)}</h3>", table(EXAMPLE_HEADER, _example_rows(examples))]
    return parts
