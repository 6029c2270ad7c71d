"""The terms characteristic of a domain: word n-grams (1 to `max_ngram` words) far more frequent in the
domain training text than in the general (replay) text, ranked by the z-score of their log-odds ratio
with an informative Dirichlet prior (Monroe, Colaresi and Quinn 2008, "Fightin' words"; the prior is
the pooled counts of both texts, scaled, which shrinks rare n-grams toward no difference instead of
letting a word seen twice in the domain and never elsewhere top the list).

Words are lower-cased `\\w+` runs; a term may not start or end with one of the general text's most
frequent words (its function words, measured rather than listed), and every word holds a letter. Each
term keeps the spelling it most often has in the domain text (`os.path` for the words `os path`), which
is what the generated tasks ask for. The result is a function of the texts and the settings alone: ties
are broken by the term itself.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cptkit.config import DomainTasksConfig

_WORD = re.compile(r"\w+")
_LETTER = re.compile(r"[^\W\d_]")
# What may stand between the words of a term in its spelling: one space, or one punctuation mark such
# as the dot of os.path or the hyphen of read-only; never a line break or a sentence's end (". ").
_SEPARATOR = re.compile(r"[ .\-/:']")


@dataclass(frozen=True)
class Term:
    """A characteristic n-gram: its spelling, its lower-cased words, the counts behind its score."""

    text: str  # the spelling it most often has in the domain text
    key: str  # its lower-cased words, joined by single spaces
    words: int
    domain_count: int
    general_count: int
    documents: int  # domain training documents it occurs in
    log_odds: float
    z: float

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "key": self.key,
            "words": self.words,
            "domain_count": self.domain_count,
            "general_count": self.general_count,
            "documents": self.documents,
            "log_odds": round(self.log_odds, 6),
            "z": round(self.z, 6),
        }


@dataclass(frozen=True)
class TermCounts:
    """n-gram counts of one text stream: occurrences, documents, totals per n-gram length."""

    counts: Counter[str]
    documents: Counter[str]
    totals: dict[int, int]
    words: Counter[str]


def count_ngrams(texts: Iterable[str], max_ngram: int, max_documents: int) -> TermCounts:
    """Occurrences and document frequencies of every word n-gram up to `max_ngram` words."""
    counts: Counter[str] = Counter()
    documents: Counter[str] = Counter()
    words: Counter[str] = Counter()
    totals = dict.fromkeys(range(1, max_ngram + 1), 0)
    for i, text in enumerate(texts):
        if i >= max_documents:
            break
        tokens = _WORD.findall(text.lower())
        words.update(tokens)
        grams = list(_ngrams(tokens, max_ngram))
        counts.update(grams)
        documents.update(set(grams))
        for n in totals:
            totals[n] += max(0, len(tokens) - n + 1)
    return TermCounts(counts, documents, totals, words)


def _ngrams(tokens: list[str], max_ngram: int) -> Iterator[str]:
    for n in range(1, max_ngram + 1):
        for i in range(len(tokens) - n + 1):
            yield " ".join(tokens[i : i + n])


# The prior's weight: a tenth of the pooled counts (alpha_0 = 0.1 (n_d + n_g)). With the whole pooled
# counts as the prior, a term never seen in the general text could not reach a log-odds ratio above
# log 2 whatever its count; with a tenth, such a term has log(11) and a z-score that grows with the square
# root of its count (2.4 at 10 occurrences, 7.3 at 100), while a term as common in both texts stays at 0.
PRIOR_SHARE = 0.1


def log_odds_z(y_d: int, y_g: int, n_d: int, n_g: int) -> tuple[float, float]:
    """The log-odds ratio of an n-gram in the domain vs the general text and its z-score, with the pooled
    counts, scaled by PRIOR_SHARE, as the Dirichlet prior."""
    alpha = PRIOR_SHARE * (y_d + y_g)
    alpha0 = PRIOR_SHARE * (n_d + n_g)
    delta = math.log((y_d + alpha) / (n_d + alpha0 - y_d - alpha)) - math.log(
        (y_g + alpha) / (n_g + alpha0 - y_g - alpha)
    )
    variance = 1 / (y_d + alpha) + 1 / (y_g + alpha)
    return delta, delta / math.sqrt(variance)


def extract_terms(domain: Iterable[str], general: Iterable[str], settings: DomainTasksConfig) -> list[Term]:
    """The domain's characteristic terms, highest z-score first. `domain` is iterated twice (counts,
    then spellings), so it must be re-iterable (a list, or a function's fresh iterator)."""
    domain_texts = list(_first(domain, settings.max_training_documents))
    d = count_ngrams(domain_texts, settings.max_ngram, settings.max_training_documents)
    g = count_ngrams(general, settings.max_ngram, settings.max_training_documents)
    common = {w for w, _ in sorted(g.words.items(), key=lambda kv: (-kv[1], kv[0]))[: settings.common_words]}
    scored = []
    for key, y_d in d.counts.items():
        if y_d < settings.min_count or d.documents[key] < settings.min_documents:
            continue
        words = key.split(" ")
        if words[0] in common or words[-1] in common or not all(_LETTER.search(w) for w in words):
            continue
        n = len(words)
        delta, z = log_odds_z(y_d, g.counts.get(key, 0), d.totals[n], g.totals[n])
        if z >= settings.min_score:
            scored.append((key, delta, z))
    scored.sort(key=lambda t: (-t[2], t[0]))
    chosen = scored[: settings.max_terms]
    spellings = _spellings(domain_texts, {key for key, _, _ in chosen}, settings.max_ngram)
    terms = []
    for key, delta, z in chosen:
        text = spellings.get(key)
        if text is None:  # only ever spelled across a line break or odd punctuation
            continue
        terms.append(
            Term(
                text=text,
                key=key,
                words=len(key.split(" ")),
                domain_count=d.counts[key],
                general_count=g.counts.get(key, 0),
                documents=d.documents[key],
                log_odds=delta,
                z=z,
            )
        )
    return terms


def _first(texts: Iterable[str], n: int) -> Iterator[str]:
    for i, text in enumerate(texts):
        if i >= n:
            return
        yield text


def _spellings(texts: Iterable[str], keys: set[str], max_ngram: int) -> dict[str, str]:
    """Each key's most frequent spelling in the texts (ties: the smaller string), among spellings whose
    words are joined by a space or short punctuation."""
    seen: dict[str, Counter[str]] = {}
    for text in texts:
        matches = list(_WORD.finditer(text))
        lowered = [m.group().lower() for m in matches]
        for n in range(1, max_ngram + 1):
            for i in range(len(matches) - n + 1):
                key = " ".join(lowered[i : i + n])
                if key not in keys:
                    continue
                start, end = matches[i].start(), matches[i + n - 1].end()
                gaps = (text[matches[j].end() : matches[j + 1].start()] for j in range(i, i + n - 1))
                if all(_SEPARATOR.fullmatch(gap) for gap in gaps):
                    seen.setdefault(key, Counter())[text[start:end]] += 1
    return {key: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for key, c in seen.items()}


def term_pattern(terms: Iterable[Term]) -> re.Pattern[str] | None:
    """A regular expression matching any term's spelling as whole words, longest spelling first (so that
    `json module` wins over `json` where both fit)."""
    spellings = sorted({t.text for t in terms}, key=lambda s: (-len(s), s))
    if not spellings:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(s) for s in spellings) + r")(?!\w)")


def context_profiles(texts: Iterable[str], terms: Sequence[Term], max_ngram: int, max_documents: int) -> np.ndarray:
    """Each term's neighbours in the domain training text, as rows of unit length (terms x features):
    the square root of how often each lower-cased word stands just before (or just after) the term. Two
    terms with similar rows take the same places in sentences (after "the" and before "is": nouns; after
    "to": verbs), which is what a distractor needs to be a grammatical choice; the square root keeps the
    commonest neighbours from deciding alone (the Hellinger distance's weighting)."""
    row_of = {t.key: i for i, t in enumerate(terms)}
    features: dict[str, int] = {}
    cells: Counter[tuple[int, int]] = Counter()
    for text in _first(texts, max_documents):
        words = _WORD.findall(text.lower())
        for n in range(1, max_ngram + 1):
            for i in range(len(words) - n + 1):
                row = row_of.get(" ".join(words[i : i + n]))
                if row is None:
                    continue
                if i > 0:
                    cells[row, features.setdefault("<" + words[i - 1], len(features))] += 1
                if i + n < len(words):
                    cells[row, features.setdefault(">" + words[i + n], len(features))] += 1
    profiles = np.zeros((len(terms), len(features)))
    for (row, feature), count in cells.items():
        profiles[row, feature] = math.sqrt(count)
    norms = np.linalg.norm(profiles, axis=1, keepdims=True)
    unit: np.ndarray = np.divide(profiles, norms, out=np.zeros_like(profiles), where=norms > 0)
    return unit
