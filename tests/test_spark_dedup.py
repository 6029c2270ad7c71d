"""The dedup decisions on Spark (`engines.spark_dedup`) are `corpus.duplicate_fates`'s, for any order and
partitioning: a synthetic corpus of a few thousand documents with exact copies, near copies, chains,
repeated and numeric ids, compared document by document."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from cptkit.config import DedupConfig
from cptkit.corpus import EXACT, NEAR, duplicate_fates
from cptkit.dedup import MinHasher, band_hashes, content_keys, exact_key, lsh_bands
from test_spark_engine import needs_spark

pytestmark = needs_spark


def synthetic_corpus(seed: int = 11) -> tuple[list[str], list[str]]:
    """(ids, texts): originals, exact copies, near copies (one or two words edited: estimated Jaccard
    on both sides of 0.8) and chains of single edits whose ends are not near each other."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(3000)]
    ids: list[str] = []
    texts: list[str] = []

    def add(text: str) -> None:
        # Numeric ids compare as text ("10" < "9"); some ids repeat.
        ids.append(str(rng.randrange(5000)) if rng.random() < 0.3 else f"doc-{rng.randrange(10**6):06d}")
        texts.append(text)

    def edit(words: list[str]) -> list[str]:
        edited = list(words)
        edited[rng.randrange(len(edited))] = f"x{rng.randrange(10**6)}"
        return edited

    originals = [[rng.choice(vocabulary) for _ in range(80)] for _ in range(1200)]
    for words in originals:
        add(" ".join(words))
    for _ in range(300):
        add(texts[rng.randrange(len(texts))])
    for _ in range(600):
        words = rng.choice(originals)
        for _ in range(rng.choice((1, 1, 2, 3))):
            words = edit(words)
        add(" ".join(words))
    for _ in range(100):
        words = rng.choice(originals)
        for _ in range(rng.randrange(3, 8)):
            words = edit(words)
            add(" ".join(words))
    return ids, texts


@pytest.fixture(scope="module")
def corpus() -> dict[str, Any]:
    ids, texts = synthetic_corpus()
    config = DedupConfig()
    hasher, bands = MinHasher(config.num_perm, config.shingle_words), lsh_bands(config.threshold, config.num_perm)
    signatures = np.stack([hasher.signature(t) for t in texts])
    return {
        "ids": ids,
        "keys": [exact_key(t) for t in texts],
        "signatures": signatures,
        "bands": np.stack([band_hashes(s, bands) for s in signatures]),
    }


def spark_fates(spark: Any, corpus: dict[str, Any], config: DedupConfig, partitions: int) -> np.ndarray:
    from cptkit.engines.spark_dedup import FATE
    from cptkit.engines.spark_dedup import duplicate_fates as spark_duplicate_fates

    n = len(corpus["ids"])
    shuffled = list(range(n))
    random.Random(partitions).shuffle(shuffled)
    table = pa.table(
        {
            "position": pa.array(shuffled, pa.int64()),
            "id": pa.array([corpus["ids"][i] for i in shuffled], pa.string()),
            "key": pa.array([corpus["keys"][i] for i in shuffled], pa.binary()),
            "bands": pa.array([corpus["bands"][i].view(np.int64) for i in shuffled], pa.list_(pa.int64())),
            "signature": pa.array([corpus["signatures"][i].view(np.int32) for i in shuffled], pa.list_(pa.int32())),
        }
    )
    documents = spark.createDataFrame(table).repartition(partitions)
    fates = spark_duplicate_fates(
        documents, config, position="position", doc_id="id", key="key", bands="bands", signature="signature"
    ).toArrow()
    assert fates.num_rows == n
    result = np.full(n, -1, dtype=np.int8)
    result[np.asarray(fates.column("position"))] = np.asarray(fates.column(FATE))
    return result


@pytest.mark.parametrize(
    ("config", "partitions"),
    [(DedupConfig(), 1), (DedupConfig(), 7), (DedupConfig(exact=False), 5), (DedupConfig(near=False), 3)],
)
def test_spark_fates_are_the_local_ones(
    spark: Any, corpus: dict[str, Any], config: DedupConfig, partitions: int
) -> None:
    local = duplicate_fates(
        pa.array(corpus["ids"], pa.string()),
        content_keys(corpus["keys"]),
        corpus["bands"] if config.near else None,
        corpus["signatures"] if config.near else None,
        config,
    )
    # The corpus exercises every fate, chains included (more near duplicates than near copies alone).
    assert ((local == NEAR).sum() > 400) == config.near and ((local == EXACT).sum() > 200) == config.exact
    np.testing.assert_array_equal(spark_fates(spark, corpus, config, partitions), local)
