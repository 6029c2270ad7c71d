"""Exact and near-duplicate detection.

Exact duplicates are found by a 128-bit hash of the normalized text. Near duplicates use MinHash
signatures over word shingles and datasketch's LSH index. Signatures are computed here with numpy
rather than with datasketch.MinHash because datasketch hashes each shingle through a Python callback
and a SHA-1, which costs several times more per document; the index itself is datasketch's.

Keys and signatures are computed per document (in any engine's workers); `exact_duplicates` and
`near_duplicates` are the corpus-level decisions over them, in input order: the first occurrence wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHashLSH

_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)


def exact_key(text: str) -> bytes:
    return xxhash.xxh3_128_digest(text.encode("utf-8"))


class MinHasher:
    def __init__(self, num_perm: int, shingle_words: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        # Multiply-shift hashing: h(x) = (a*x + b) >> 32 with odd a, a 2-universal family.
        self.a = rng.integers(1, 2**63, size=(num_perm, 1), dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64)
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        self.seed = seed

    def signature(self, text: str) -> np.ndarray:
        """A uint32 MinHash signature of the lower-cased word shingles of `text`."""
        words = _WORD.findall(text.lower())
        if not words:
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        # Hash each distinct word once; a dict lookup is cheaper than a hash call per occurrence.
        hashes = {w: xxhash.xxh3_64_intdigest(w.encode()) for w in set(words)}
        word_hash = np.fromiter(map(hashes.__getitem__, words), dtype=np.uint64, count=len(words))
        n = min(self.shingle_words, len(words))
        count = len(words) - n + 1
        shingles = word_hash[:count].copy()
        for j in range(1, n):
            shingles = shingles * np.uint64(1099511628211) ^ word_hash[j : j + count]
        permuted = (self.a * shingles[None, :] + self.b) >> np.uint64(32)
        return np.asarray(permuted.min(axis=1) & _MASK32, dtype=np.uint64)


class NearDuplicateIndex:
    """First occurrence wins: `seen_before` answers whether a similar document was added earlier, and
    adds this one when not."""

    def __init__(self, threshold: float, num_perm: int, seed: int = 1) -> None:
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.seed = seed
        self._next = 0

    def seen_before(self, signature: np.ndarray) -> bool:
        # The scheme only labels where hash values came from, for datasketch's consistency checks; ours
        # never meet datasketch-made sketches, so the plain (legacy) label fits.
        mh = LeanMinHash(seed=self.seed, hashvalues=signature, scheme="legacy")
        if self.lsh.query(mh):
            return True
        self.lsh.insert(self._next, mh, check_duplication=False)
        self._next += 1
        return False


def exact_duplicates(keys: Sequence[bytes | None], seen: set[bytes]) -> list[bool]:
    """For each key in order, whether it was seen before (earlier in `keys` or in `seen`, which grows).
    A None key (a document not subject to dedup) is never a duplicate."""
    flags: list[bool] = []
    for key in keys:
        if key is None:
            flags.append(False)
            continue
        flags.append(key in seen)
        seen.add(key)
    return flags


def near_duplicates(signatures: Sequence[np.ndarray | None], index: NearDuplicateIndex) -> list[bool]:
    """For each signature in order, whether a similar one is in `index` (which grows). None is skipped."""
    return [signature is not None and index.seen_before(signature) for signature in signatures]
