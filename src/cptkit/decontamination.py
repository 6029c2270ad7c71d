"""Evaluation sets checked against the training text (domain and replay): for each evaluation document,
the share of its word n-grams (13 words by default, as in GPT-3's contamination study) that occur in
the training text. A document is contaminated when that share reaches `min_share` (default 0.5; PaLM
called a document contaminated at 70% of its 8-grams, Llama 2 at 80% of its tokens): a single shared
13-gram is usually a quotation, a licence line or a code idiom, not the document seen in training, and
flagging those would empty real evaluation sets (the demo's standard-library docstrings share a 13-gram
with the training modules in 6 of 18 validation documents, at 0.2% to 33% of their n-grams). Evaluate
reports both counts (contaminated, and any n-gram shared) and, by default, leaves the contaminated
documents out of the scores.

Memory is bounded by the evaluation sets, not by the training corpus: the evaluation documents' n-gram
hashes are held (8 bytes each), and the training text streams past them once, a batch at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import xxhash

from cptkit.datasets import TRAIN, TRAIN_TEXT
from cptkit.parquet_files import open_parquet

_WORD = re.compile(r"\w+")
# An n-gram's hash is a polynomial in its words' hashes, wrapping at 2**64 (numpy's uint64 arithmetic):
# one vectorised pass per document instead of hashing every n-gram's string.
_BASE = np.uint64(0x9E3779B97F4A7C15)
_BATCH_DOCUMENTS = 1024


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """The uint64 hashes of the text's word n-grams (lower-cased words); a text of fewer than n words
    gives one hash of all its words, so that a short document still matches its copy."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, np.uint64)
    hashes = np.fromiter(
        (xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass")) for w in words), np.uint64, len(words)
    )
    width = min(n, len(words))
    count = len(words) - width + 1
    out = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(width):
            out = out * _BASE + hashes[k : k + count]
    return out


def overlap_shares(documents: dict[str, list[str]], training: Iterable[str], n: int) -> dict[str, np.ndarray]:
    """For each named list of documents, the share of each document's n-grams that occur in the
    `training` texts (0.0 to 1.0)."""
    per_doc = {name: [ngram_hashes(t, n) for t in texts] for name, texts in documents.items()}
    probes = [h for hashes in per_doc.values() for h in hashes]
    probe = np.unique(np.concatenate(probes)) if probes else np.zeros(0, np.uint64)
    found: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for text in training:
        batch.append(ngram_hashes(text, n))
        if len(batch) >= _BATCH_DOCUMENTS:
            found.append(_seen(np.concatenate(batch), probe))
            batch = []
    if batch:
        found.append(_seen(np.concatenate(batch), probe))
    seen = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    return {
        name: np.asarray([float(np.isin(h, seen).mean()) if len(h) else 0.0 for h in hashes])
        for name, hashes in per_doc.items()
    }


def contaminated(shares: np.ndarray, min_share: float) -> np.ndarray:
    """Which documents count as contaminated: share >= min_share, or any shared n-gram when it is 0."""
    return shares > 0 if min_share == 0 else shares >= min_share


def _seen(hashes: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """The probe hashes among `hashes` (at most the probe's size: memory stays bounded)."""
    return np.unique(hashes[np.isin(hashes, probe)])


def training_texts(directories: Iterable[Path]) -> Iterator[str]:
    """The training text prepare wrote in each dataset folder: train.jsonl, or the train_text/ shards."""
    for directory in directories:
        jsonl = directory / TRAIN
        if jsonl.is_file():
            with jsonl.open(encoding="utf-8") as lines:
                for line in lines:
                    yield json.loads(line)["text"]
            continue
        for shard in sorted((directory / TRAIN_TEXT).glob("part-*.parquet")):
            for batch in open_parquet(shard).iter_batches(columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
