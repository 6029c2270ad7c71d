"""Document quality heuristics in the spirit of Gopher (Rae et al. 2021, appendix A) and C4.

`quality_issue` returns the first failed check's reason, or None when the document passes. Words are
whitespace-separated tokens: cheaper than a linguistic tokenizer and close enough for thresholds.
"""

from __future__ import annotations

import re

import numpy as np

from cptkit.config import QualityConfig

_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»–—…•·")
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "‣", "●", "○", "◦", "▪", "- ", "* ")
_PUNCT_CLASS = "".join(re.escape(ch) for ch in sorted(_PUNCT))
_PUNCT_WORD = re.compile(rf"(?<!\S)[{_PUNCT_CLASS}]+(?!\S)")
# A word with no letter in it: letters are [^\W\d_] in Python's re.
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:(?![^\W\d_])\S)+(?!\S)")
_NON_ALNUM = re.compile(r"[^\w\s]|_")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def quality_issue(text: str, c: QualityConfig) -> str | None:
    n_chars = len(text)
    if c.min_chars is not None and n_chars < c.min_chars:
        return "too_short"
    if c.max_chars is not None and n_chars > c.max_chars:
        return "too_long"
    lowered = text.lower()
    for phrase in c.blocklist:
        if phrase.lower() in lowered:
            return "blocklist"

    # Per-word tests run as regexes over the whole text: a Python loop over words costs ~10x more.
    words = text.split()
    punct_words = _PUNCT_WORD.findall(text)
    n_words = len(words) - len(punct_words)
    if c.min_words is not None and n_words < c.min_words:
        return "too_few_words"
    if c.max_words is not None and n_words > c.max_words:
        return "too_many_words"
    if n_words:
        mean_len = (sum(map(len, words)) - sum(map(len, punct_words))) / n_words
        if c.min_mean_word_length is not None and mean_len < c.min_mean_word_length:
            return "mean_word_length"
        if c.max_mean_word_length is not None and mean_len > c.max_mean_word_length:
            return "mean_word_length"
    if words and c.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / len(words) > c.max_symbol_word_ratio:
            return "symbol_ratio"
    if words and c.min_alpha_words_ratio is not None:
        alpha = len(words) - len(_NO_LETTER_WORD.findall(text))
        if alpha / len(words) < c.min_alpha_words_ratio:
            return "alpha_words"
    if c.min_stop_words:
        found = 0
        for w in lowered.split():
            if w in _STOP_WORDS:
                found += 1
                if found >= c.min_stop_words:
                    break
        if found < c.min_stop_words:
            return "stop_words"
    if n_chars and c.max_non_alnum_chars_ratio is not None:
        other = n_chars - len(_NON_ALNUM.sub("", text))
        if other / n_chars > c.max_non_alnum_chars_ratio:
            return "non_alnum_chars"

    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if c.max_bullet_lines_ratio is not None:
            bullets = sum(1 for ln in lines if ln.lstrip().startswith(_BULLETS))
            if bullets / len(lines) > c.max_bullet_lines_ratio:
                return "bullet_lines"
        if c.max_ellipsis_lines_ratio is not None:
            ellipsis = sum(1 for ln in lines if ln.rstrip().endswith(("...", "…")))
            if ellipsis / len(lines) > c.max_ellipsis_lines_ratio:
                return "ellipsis_lines"
    return _repetition_issue(text, words, c)


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """Count of elements seen before, and their total characters (Gopher's duplicate measure)."""
    seen: set[str] = set()
    dup_count = dup_chars = 0
    for e in elements:
        if e in seen:
            dup_count += 1
            dup_chars += len(e)
        else:
            seen.add(e)
    return dup_count, dup_chars


def _repetition_issue(text: str, words: list[str], c: QualityConfig) -> str | None:
    n_chars = len(text) or 1
    stripped = text.strip()
    paragraphs = _PARAGRAPHS.split(stripped)
    dup, dup_chars = _duplicates(paragraphs)
    if c.max_duplicate_paragraphs_ratio is not None and dup / len(paragraphs) > c.max_duplicate_paragraphs_ratio:
        return "duplicate_paragraphs"
    if (
        c.max_duplicate_paragraph_chars_ratio is not None
        and dup_chars / n_chars > c.max_duplicate_paragraph_chars_ratio
    ):
        return "duplicate_paragraph_chars"
    lines = _LINES.split(stripped)
    dup, dup_chars = _duplicates(lines)
    if c.max_duplicate_lines_ratio is not None and dup / len(lines) > c.max_duplicate_lines_ratio:
        return "duplicate_lines"
    if c.max_duplicate_line_chars_ratio is not None and dup_chars / n_chars > c.max_duplicate_line_chars_ratio:
        return "duplicate_line_chars"
    if not c.max_top_ngram_chars_ratio and not c.max_duplicate_ngram_chars_ratio:
        return None

    # N-gram statistics on integer word ids with numpy: an n-gram is a rolling hash of its word ids.
    vocab: dict[str, int] = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
    word_hash = (ids + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    for n, limit in sorted(c.max_top_ngram_chars_ratio.items()):
        if len(words) < n:
            continue
        grams = _ngram_hashes(word_hash, n)
        _, first, counts = np.unique(grams, return_index=True, return_counts=True)
        best = counts.max()
        if best < 2:
            continue
        # Among the most frequent n-grams, the one that occurs first (what Counter.most_common picks).
        start = int(first[counts == best].min())
        gram_chars = int(lengths[start : start + n].sum()) + n - 1
        if gram_chars * int(best) / n_chars > limit:
            return f"top_{n}gram"
    for n, limit in sorted(c.max_duplicate_ngram_chars_ratio.items()):
        if len(words) < n:
            continue
        if _duplicate_ngram_chars(word_hash, lengths, n) / n_chars > limit:
            return f"duplicate_{n}gram"
    return None


def _ngram_hashes(word_hash: np.ndarray, n: int) -> np.ndarray:
    count = len(word_hash) - n + 1
    h = word_hash[:count].copy()
    for j in range(1, n):
        h = h * np.uint64(1099511628211) ^ word_hash[j : j + count]
    return h


def _duplicate_ngram_chars(word_hash: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of the words covered by n-grams that already occurred earlier (Gopher)."""
    grams = _ngram_hashes(word_hash, n)
    _, first, inverse = np.unique(grams, return_index=True, return_inverse=True)
    is_dup = first[inverse] < np.arange(len(grams))
    if not is_dup.any():
        return 0
    # Mark words i..i+n-1 for every duplicate start i, via a difference array.
    marks = np.zeros(len(lengths) + 1, dtype=np.int64)
    starts = np.nonzero(is_dup)[0]
    np.add.at(marks, starts, 1)
    np.add.at(marks, starts + n, -1)
    covered = np.cumsum(marks[:-1]) > 0
    return int(lengths[covered].sum())
