"""Memory of the near-dedup index per document, measured with tracemalloc.

Builds N synthetic documents (random words; 5% exact and 10% near copies), computes their signatures and
band hashes as prepare's workers do, then measures the peak Python/numpy allocation of the local
engine's `DedupStore` (ids, exact keys, band hashes in memory; signatures in a file) while it takes every
document and makes the dedup decisions. For comparison, the same documents in datasketch's
`MinHashLSH` with one `LeanMinHash` each (prepare's index before smallest-key dedup).

    PYTHONPATH=src python benchmarks/dedup_memory.py [--documents 20000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa

from cptkit.config import DedupConfig
from cptkit.dedup import MinHasher, band_hashes, exact_key, lsh_bands
from cptkit.engines.work_files import DedupStore
from cptkit.records import DocResult


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    texts: list[str] = []
    while len(texts) < n:
        roll = rng.random()
        if texts and roll < 0.05:
            texts.append(rng.choice(texts))
        elif texts and roll < 0.15:
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choices(vocab, k=rng.randint(150, 400))))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    n = parser.parse_args().documents
    config = DedupConfig()
    hasher, bands = MinHasher(config.num_perm, config.shingle_words), lsh_bands(config.threshold, config.num_perm)
    texts = synthetic_texts(n)
    results = []
    for text in texts:
        signature = hasher.signature(text)
        results.append(DocResult("keep", None, None, exact_key(text), signature, band_hashes(signature, bands)))
    ids = [f"doc-{i:08d}" for i in range(n)]

    # A small run first, so that modules imported on first use are not counted.
    with tempfile.TemporaryDirectory() as work, DedupStore(1000, config, Path(work)) as warm_up:
        warm_up.add(pa.array(ids[:1000], pa.string()), results[:1000])
        warm_up.fates()
    with tempfile.TemporaryDirectory() as work:
        arrow_before = pa.total_allocated_bytes()
        tracemalloc.start()
        started = time.perf_counter()
        with DedupStore(n, config, Path(work)) as store:
            for start in range(0, n, 1000):
                store.add(pa.array(ids[start : start + 1000], pa.string()), results[start : start + 1000])
            # Arrow's own allocator (the ids) is not seen by tracemalloc.
            held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - arrow_before
            fates = store.fates()
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] + pa.total_allocated_bytes() - arrow_before
        tracemalloc.stop()
        signature_bytes = (Path(work) / "signatures.u32").stat().st_size
    print(f"{n} documents, {bands.bands} bands x {bands.rows} rows, {int((fates != 0).sum())} duplicates found")
    print(f"DedupStore held:        {held / n:7.0f} bytes/document (ids, exact keys, band hashes)")
    print(f"DedupStore peak:        {peak / n:7.0f} bytes/document (with the decisions), {seconds:.2f} s")
    print("  (peak: numpy and Python at their peak, plus Arrow's ids held at the end)")
    print(f"signatures on disk:     {signature_bytes / n:7.0f} bytes/document (memory-mapped, candidates only)")

    from datasketch import LeanMinHash, MinHashLSH

    tracemalloc.start()
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    for i, r in enumerate(results):
        assert r.signature is not None
        lsh.insert(i, LeanMinHash(seed=1, hashvalues=r.signature, scheme="legacy"), check_duplication=False)
    old = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"datasketch MinHashLSH:  {old / n:7.0f} bytes/document (one LeanMinHash per document)")


if __name__ == "__main__":
    main()
