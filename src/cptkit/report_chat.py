"""The report's chat-drift section, in Markdown and HTML: the numbers, the instructions that drifted
most, and the base's and the adapted model's answers side by side (or why chat drift was not measured)."""

from __future__ import annotations

import html

from cptkit.results import ChatAnswer, ChatDrift

TITLE = "Chat behaviour"
# The instructions whose answers moved most, listed in the report.
MOST_DRIFTED = 5
SUMMARY_HEADER = ["", "base", "adapted"]
DRIFTED_HEADER = ["instruction", "answer tokens", "drift, nats/token", "KL, nats/token"]


def note(chat: ChatDrift) -> str:
    """What was measured, in a sentence or two; or why nothing was."""
    if chat.status != "ok":
        return f"Chat drift was not measured: {chat.reason}."
    source = "from the cache" if chat.cached else "generated in this evaluation"
    return (
        f"The base model answered {chat.instructions} general instructions shipped with cptkit through its chat "
        f"template (greedy, up to {chat.max_new_tokens} new tokens; answers {source}); both models were then "
        f"scored on those {chat.answer_tokens:,} answer tokens. *Chat drift* is the log-likelihood per token the "
        "adapted model lost on the base's own answers (0: unchanged; higher: it moved away from how the base "
        "answers). It measures change, not quality: a better answer than the base's also counts as drift."
    )


def summary_rows(chat: ChatDrift) -> list[list[str]]:
    if chat.status != "ok":
        return []
    return [
        ["log-likelihood per answer token, nats", _num(chat.base_log_likelihood), _num(chat.cpt_log_likelihood)],
        ["chat drift, nats per token", "", _num(chat.drift)],
        ["KL(base || adapted), nats per token", "", _num(chat.kl)],
        ["top-1 agreement", "", f"{chat.top1_agreement or 0:.1%}"],
    ]


def drifted_rows(chat: ChatDrift) -> list[list[str]]:
    most = sorted(chat.answers, key=lambda a: -a.drift)[:MOST_DRIFTED]
    return [[_one_line(a.instruction), f"{a.tokens:,}", _num(a.drift), _num(a.kl)] for a in most]


def side_by_side(chat: ChatDrift) -> list[ChatAnswer]:
    return [a for a in chat.answers if a.cpt is not None]


def markdown(chat: ChatDrift) -> list[str]:
    from cptkit.report import _md_table  # the report's own tables (report imports this module first)

    lines = [f"## {TITLE}", "", note(chat), ""]
    if chat.status != "ok":
        return lines
    lines += [*_md_table(SUMMARY_HEADER, summary_rows(chat)), ""]
    lines += ["Instructions whose answers drifted most:", "", *_md_table(DRIFTED_HEADER, drifted_rows(chat)), ""]
    for a in side_by_side(chat):
        lines += [f"### {_one_line(a.instruction)}", ""]
        lines += [f"**base:** {_shown(_one_line(a.base))}", ""]
        lines += [f"**adapted:** {_shown(_one_line(a.cpt or ''))}", ""]
    return lines


def to_html(chat: ChatDrift) -> list[str]:
    from cptkit.report import _html_table  # the report's own tables (report imports this module first)

    e = html.escape
    parts = [f"<h2>{TITLE}</h2>", f"<p>{e(note(chat)).replace('*', '')}</p>"]
    if chat.status != "ok":
        return parts
    parts.append(_html_table(SUMMARY_HEADER, summary_rows(chat)))
    parts += ["<p>Instructions whose answers drifted most:</p>", _html_table(DRIFTED_HEADER, drifted_rows(chat))]
    shown = side_by_side(chat)
    if shown:
        parts.append("<p>The adapted model's own greedy answers beside the base's (the same chat prompt):</p>")
        parts.append("<table class='gen'><tr><th>base</th><th>adapted</th></tr>")
        for a in shown:
            parts.append(f"<tr><th colspan='2'>{e(a.instruction)}</th></tr>")
            parts.append(f"<tr><td>{e(_shown(a.base))}</td><td>{e(_shown(a.cpt or ''))}</td></tr>")
        parts.append("</table>")
    return parts


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _shown(answer: str) -> str:
    # An answer of whitespace and special tokens only would be an empty cell: say so instead.
    return answer if answer.strip() else "(empty: whitespace or special tokens only)"


def _one_line(text: str) -> str:
    return " ".join(text.split())
