"""prepare's decisions across documents: exact and near dedup (smallest stable key per group, see
`dedup`), the train/val split, and the tally that accounts for every document.

The functions take plain arrays and lists, not engine objects, and give the same answer for any order
or partitioning of their input, so that every engine drives the same ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import xxhash

from cptkit.config import DedupConfig, SplitConfig
from cptkit.dedup import content_keys, document_order, exact_duplicates, near_duplicates
from cptkit.errors import StageError
from cptkit.records import DocResult

TRAIN_SPLIT, VAL_SPLIT = "train", "val"


# What `duplicate_fates` gives each kept document.
KEEP, EXACT, NEAR = 0, 1, 2
DUPLICATE_REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}


def duplicate_fates(
    ids: pa.Array | Sequence[str],
    keys: np.ndarray,
    bands: np.ndarray | None,
    signatures: np.ndarray | None,
    config: DedupConfig,
) -> np.ndarray:
    """KEEP, EXACT or NEAR for each document that passed the record steps, from its id, exact key
    (`content_keys`), band hashes and signature (None when near dedup is off). An exact duplicate is
    also in its original's near-duplicate component, so the two checks never disagree on who stays."""
    order = document_order(ids, keys)
    fates = np.zeros(len(order), dtype=np.int8)
    if config.near and bands is not None and signatures is not None and len(order):
        fates[near_duplicates(bands, signatures, order, config.threshold)] = NEAR
    if config.exact and len(order):
        fates[exact_duplicates(keys, order)] = EXACT
    return fates


def drop_duplicates(ids: Sequence[str], results: Sequence[DocResult], config: DedupConfig) -> None:
    """Mark the duplicates among `results` (all in memory) as dropped; `ids` are their snapshot ids."""
    positions = [i for i, r in enumerate(results) if r.status == "keep"]
    kept = [results[i] for i in positions]
    signatures = [r.signature for r in kept if r.signature is not None]
    bands = [r.bands for r in kept if r.bands is not None]
    near = 0 < len(signatures) == len(bands) == len(kept)
    fates = duplicate_fates(
        [ids[i] for i in positions],
        content_keys([r.key or b"" for r in kept]),
        np.stack(bands) if near else None,
        np.stack(signatures) if near else None,
        config,
    )
    for r, fate in zip(kept, fates, strict=True):
        if fate != KEEP:
            r.drop(DUPLICATE_REASONS[int(fate)])


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

    def count_steps(self, results: Sequence[DocResult]) -> None:
        """Add what the record steps counted (an engine may do this before the corpus decisions)."""
        for r in results:
            for step, counts in (r.counts or {}).items():
                self.step_counts.setdefault(step, Counter()).update(counts)

    def add(self, results: Sequence[DocResult], splits: Sequence[str | None]) -> None:
        """Count each document's fate, once the corpus decisions are made."""
        for r, split in zip(results, splits, strict=True):
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
