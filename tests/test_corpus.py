"""prepare's corpus-level functions on plain per-document results: dedup, split, the tally."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_doc
from cptkit.config import PrepareConfig, SplitConfig
from cptkit.corpus import Tally, assign_splits, drop_duplicates, split_of
from cptkit.errors import StageError
from cptkit.records import DocResult, RecordProcessor

CONFIG = PrepareConfig.model_validate({"quality": {"min_stop_words": 0}, "redact": {"enabled": True}})
TEXTS: list[str | None] = [
    make_doc(1),
    make_doc(2),
    make_doc(1),  # exact duplicate of the first
    make_doc(2).replace("component", "module", 1),  # near duplicate of the second
    "Too short.",
    None,  # quarantined
    make_doc(3) + " Mail jane@example.com.",
    make_doc(1),
]


def _results() -> list[DocResult]:
    return RecordProcessor(CONFIG, None).process(TEXTS, [None] * len(TEXTS))


IDS = [f"d{i}" for i in range(len(TEXTS))]


def _dedup(results: list[DocResult], order: list[int]) -> list[tuple[str, str | None]]:
    """Dedup with the documents presented in `order`; the outcomes come back in the original order."""
    drop_duplicates([IDS[i] for i in order], [results[i] for i in order], CONFIG.dedup)
    return [(r.status, r.reason) for r in results]


def test_the_smallest_id_wins_whatever_the_input_order() -> None:
    expected = [
        ("keep", None),
        ("keep", None),
        ("drop", "exact_duplicate"),
        ("drop", "near_duplicate"),
        ("drop", "too_short"),
        ("quarantine", "null_text"),
        ("keep", None),
        ("drop", "exact_duplicate"),
    ]
    forward = list(range(len(TEXTS)))
    for order in (forward, forward[::-1], [3, 7, 2, 0, 6, 1, 5, 4]):
        assert _dedup(_results(), order) == expected


def test_splits_are_given_to_kept_documents_only() -> None:
    results = _results()
    _dedup(results, list(range(len(results))))
    ids = IDS
    config = SplitConfig(val_ratio=0.5, seed=3)
    splits = assign_splits(ids, results, config)
    assert splits == [split_of(i, 0.5, 3) if r.status == "keep" else None for i, r in zip(ids, results, strict=True)]
    assert [s is not None for s in splits] == [True, True, False, False, False, False, True, False]


def test_the_tally_accounts_for_every_document_and_counts_redactions_and_tokens() -> None:
    results = _results()
    _dedup(results, list(range(len(results))))
    for r, n in zip([results[0], results[1], results[6]], [5, 7, 11], strict=True):
        r.tokens = np.arange(n, dtype=np.int32)
    splits = ["train", "val", None, None, None, None, "train", None]
    tally = Tally()
    tally.count_steps(results)
    tally.add(results, splits)
    assert tally.kept == {"train": 2, "val": 1}
    assert tally.dropped == {"exact_duplicate": 2, "near_duplicate": 1, "too_short": 1}
    assert tally.tokens == {"train": 16, "val": 7}
    assert tally.quarantined == {"null_text": 1}
    assert tally.step_counts == {"redact": {"email": 1}}
    assert tally.characters_kept == sum(len(r.text or "") for r in results if r.status == "keep")
    tally.check(len(TEXTS))
    with pytest.raises(StageError, match=r"accounting mismatch: 9 in != 3 kept \+ 4 dropped \+ 1 quarantined"):
        tally.check(len(TEXTS) + 1)
