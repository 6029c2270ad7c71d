"""Exact and near-duplicate detection: one definition, the same in every engine and for any input order
or partitioning.

Per document (in any engine's workers): `exact_key`, a 128-bit hash of the normalized text; a MinHash
`signature` over word shingles (numpy rather than datasketch.MinHash, which hashes each shingle through
a Python callback and a SHA-1, several times slower); and its LSH `band_hashes`, one uint64 per band.

Across documents, over plain numpy arrays (`SEMANTICS` names this definition in the manifest):

- **Order.** Documents are ranked by their stable key: the snapshot id (the source's id column as text,
  or, without one, the hash of the text that extract gives as id), compared as strings by code point
  (the same as UTF-8 bytes, Arrow's and Spark's string order; numeric ids compare as text, so "10" <
  "9"), then by exact key. Only documents with the same id and the same normalized text tie; they
  differ at most in metadata, and which one's metadata is kept then follows input order.
- **Exact duplicates**: among documents with the same exact key, the first in that order stays.
- **Near duplicates**: two documents are a candidate pair when any LSH band of their signatures is
  equal; a candidate pair is linked when the estimated Jaccard similarity (the fraction of equal
  signature values) is at least the threshold, so a chance band collision links nothing. The linked
  groups are connected components (a chain A~B~C is one group even when A and C are not similar); each
  keeps its first member in the order.

Bands and rows per band are the ones datasketch's `MinHashLSH` picks for the threshold and num_perm
(minimizing the summed false-positive and false-negative probabilities). The index holds one uint64
per band per document in numpy arrays, grouped by sorting, and reads signatures only for candidate
pairs (an engine may keep them on disk). Measured with tracemalloc (benchmarks/dedup_memory.py, 20,000
synthetic documents, 128 permutations, 9 bands): about 0.2 KB per document for the whole decision,
against ~3.6 KB per document for datasketch's `MinHashLSH` with one `LeanMinHash` per document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

SEMANTICS = "smallest-key-per-component-v1"

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
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        # Hash each distinct word once; a dict lookup is cheaper than a hash call per occurrence.
        hashes = {w: xxhash.xxh3_64_intdigest(w.encode()) for w in set(words)}
        word_hash = np.fromiter(map(hashes.__getitem__, words), dtype=np.uint64, count=len(words))
        n = min(self.shingle_words, len(words))
        count = len(words) - n + 1
        shingles = word_hash[:count].copy()
        for j in range(1, n):
            shingles = shingles * np.uint64(1099511628211) ^ word_hash[j : j + count]
        permuted = (self.a * shingles[None, :] + self.b) >> np.uint64(32)
        return np.asarray(permuted.min(axis=1) & _MASK32, dtype=np.uint32)


@dataclass(frozen=True)
class LshBands:
    bands: int
    rows: int  # signature values per band; bands * rows <= num_perm


@cache
def lsh_bands(threshold: float, num_perm: int) -> LshBands:
    """datasketch's choice of bands and rows for this threshold and number of permutations."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return LshBands(lsh.b, lsh.r)


def band_hashes(signature: np.ndarray, bands: LshBands) -> np.ndarray:
    """One uint64 per band: xxh3-64 of the band's signature values as little-endian uint32, seeded with
    the band's number."""
    values = np.ascontiguousarray(signature[: bands.bands * bands.rows], dtype="<u4").reshape(bands.bands, bands.rows)
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(values[band].tobytes(), seed=band) for band in range(bands.bands)),
        dtype=np.uint64,
        count=bands.bands,
    )


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The share of equal values in two signatures: MinHash's estimate of the Jaccard similarity."""
    return float(np.count_nonzero(a == b)) / len(a)


def content_keys(keys: Sequence[bytes]) -> np.ndarray:
    """16-byte exact keys as an (n, 2) uint64 array whose rows sort like the bytes."""
    if not keys:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.frombuffer(b"".join(keys), dtype=">u8").reshape(-1, 2).astype(np.uint64)


def document_order(ids: pa.Array | Sequence[str], keys: np.ndarray) -> np.ndarray:
    """Each document's place (0..n-1) in the total order: id as a string, then exact key."""
    id_array = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
    n = len(id_array)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Arrow compares strings by their UTF-8 bytes, which is code point order.
    id_rank = np.asarray(pc.rank(id_array, sort_keys="ascending", tiebreaker="dense"))
    sorted_positions = np.lexsort((keys[:, 1], keys[:, 0], id_rank))
    place = np.empty(n, dtype=np.int64)
    place[sorted_positions] = np.arange(n, dtype=np.int64)
    return place


def exact_duplicates(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each document, whether another with the same exact key comes before it in `order`."""
    n = len(order)
    by_key = np.lexsort((order, keys[:, 1], keys[:, 0]))
    sorted_keys = keys[by_key]
    later = np.zeros(n, dtype=bool)
    later[1:] = np.all(sorted_keys[1:] == sorted_keys[:-1], axis=1)
    duplicate = np.empty(n, dtype=bool)
    duplicate[by_key] = later
    return duplicate


def colliding_groups(bands: np.ndarray) -> Iterator[np.ndarray]:
    """For each band, the groups (of two or more document indices) that share that band's hash."""
    for band in range(bands.shape[1]):
        column = bands[:, band]
        by_hash = np.argsort(column, kind="stable")
        sorted_hashes = column[by_hash]
        starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
        ends = np.r_[starts[1:], len(column)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            yield by_hash[start:end]


def near_duplicates(bands: np.ndarray, signatures: np.ndarray, order: np.ndarray, threshold: float) -> np.ndarray:
    """For each document, whether it is linked (through candidate pairs that pass the Jaccard check,
    possibly in a chain) to a document that comes before it in `order`. `signatures` may be a memory map:
    only the rows of candidates are read."""
    roots = _Components(order)
    for group in colliding_groups(bands):
        _link_similar(group, signatures, threshold, roots)
    duplicate = np.zeros(len(order), dtype=bool)
    for member in list(roots.parent):
        duplicate[member] = roots.find(member) != member
    return duplicate


def _link_similar(group: np.ndarray, signatures: np.ndarray, threshold: float, roots: _Components) -> None:
    group = np.sort(group)  # a fixed visiting order; the components do not depend on it
    for i, j in similar_links(np.asarray(signatures[group]), threshold):
        roots.union(int(group[i]), int(group[j]))


def similar_links(rows: np.ndarray, threshold: float) -> Iterator[tuple[int, int]]:
    """Pairs (i, j) of `rows` (signatures of one band bucket) that connect each component of the graph
    of pairs whose `estimated_jaccard` is at least `threshold`: a spanning forest of it, so linking these
    pairs gives the same components as linking every similar pair. A search from each unvisited row
    compares it with all unvisited rows at once, so a bucket of k mutual near duplicates costs one
    comparison of k signatures rather than k*(k-1)/2. Both engines link buckets with it."""
    unvisited = np.ones(len(rows), dtype=bool)
    for start in range(len(rows)):
        if not unvisited[start]:
            continue
        unvisited[start] = False
        frontier = [start]
        while frontier:
            current = frontier.pop()
            candidates = np.flatnonzero(unvisited)
            if len(candidates) == 0:
                return
            # The same arithmetic as estimated_jaccard, so the boundary falls the same way.
            jaccard = np.count_nonzero(rows[candidates] == rows[current], axis=1) / rows.shape[1]
            for linked in candidates[jaccard >= threshold]:
                unvisited[linked] = False
                frontier.append(int(linked))
                yield current, int(linked)


class _Components:
    """Union-find over document indices whose root is always the member first in `order`. Holds only
    documents that were ever linked."""

    def __init__(self, order: np.ndarray) -> None:
        self.order = order
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while (up := self.parent.get(root, root)) != root:
            root = up
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.order[rb] < self.order[ra]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.parent.setdefault(ra, ra)
