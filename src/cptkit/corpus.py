"""prepare's decisions across documents, over plain per-document results in input order: exact and near
dedup, the train/val split, and the tally that accounts for every document.

The functions take lists and sets, not engine objects, so that every engine drives the same ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

from cptkit.config import SplitConfig
from cptkit.dedup import NearDuplicateIndex, exact_duplicates, near_duplicates
from cptkit.errors import StageError
from cptkit.records import DocResult

TRAIN_SPLIT, VAL_SPLIT = "train", "val"


def drop_exact_duplicates(results: Sequence[DocResult], seen: set[bytes]) -> None:
    """Drop each kept document whose text was kept earlier (in `results` or before: `seen` grows)."""
    keys = [r.key if r.status == "keep" else None for r in results]
    for r, duplicate in zip(results, exact_duplicates(keys, seen), strict=True):
        if duplicate:
            r.drop("exact_duplicate")


def drop_near_duplicates(results: Sequence[DocResult], index: NearDuplicateIndex) -> None:
    """Drop each kept document similar to one kept earlier. Run after `drop_exact_duplicates`: an exact
    duplicate is not added to the index."""
    signatures = [r.signature if r.status == "keep" else None for r in results]
    for r, duplicate in zip(results, near_duplicates(signatures, index), strict=True):
        if duplicate:
            r.drop("near_duplicate")


def split_of(doc_id: str, val_ratio: float, seed: int) -> str:
    """'train' or 'val', from a hash of the id: the same on every machine and for every run."""
    h = xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed & 0xFFFFFFFFFFFFFFFF)
    return VAL_SPLIT if h / 2**64 < val_ratio else TRAIN_SPLIT


def assign_splits(ids: Sequence[str], results: Sequence[DocResult], config: SplitConfig) -> list[str | None]:
    """The split of each kept document; None for the others."""
    return [
        split_of(doc_id, config.val_ratio, config.seed) if r.status == "keep" else None
        for doc_id, r in zip(ids, results, strict=True)
    ]


@dataclass
class Tally:
    """What prepare counted, by split and by reason."""

    kept: Counter[str] = field(default_factory=Counter)  # by split
    dropped: Counter[str] = field(default_factory=Counter)  # by reason
    quarantined: Counter[str] = field(default_factory=Counter)  # by reason
    tokens: Counter[str] = field(default_factory=Counter)  # by split
    characters_kept: int = 0
    step_counts: dict[str, Counter[str]] = field(default_factory=dict)  # step name -> its counters

    def add(self, results: Sequence[DocResult], splits: Sequence[str | None]) -> None:
        for r, split in zip(results, splits, strict=True):
            for step, counts in (r.counts or {}).items():
                self.step_counts.setdefault(step, Counter()).update(counts)
            if r.status == "quarantine":
                self.quarantined[r.reason or "?"] += 1
            elif r.status == "drop":
                self.dropped[r.reason or "?"] += 1
            else:
                assert split is not None and r.text is not None
                self.kept[split] += 1
                self.characters_kept += len(r.text)
                if r.tokens is not None:
                    self.tokens[split] += len(r.tokens)

    def check(self, documents_in: int) -> None:
        """The accounting identity: in = kept + dropped + quarantined. A bug in prepare if it fails."""
        kept, dropped, quarantined = self.kept.total(), self.dropped.total(), self.quarantined.total()
        if documents_in != kept + dropped + quarantined:
            raise StageError(
                f"accounting mismatch: {documents_in} in != {kept} kept + {dropped} dropped + {quarantined} quarantined"
            )
