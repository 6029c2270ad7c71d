"""`corpus.duplicate_fates` as Spark DataFrame operations: the same decisions, with nothing per document
on the driver.

- **Order.** The documents that passed the record steps are sorted by (id, exact key, row number in the
  snapshot): `dedup.document_order`'s total order (Spark, like Arrow, compares strings by their UTF-8
  bytes and binary keys as unsigned bytes; the row number breaks ties the way input order does
  locally). `monotonically_increasing_id` after the sort numbers them in that order: a `rank` (not
  consecutive) whose comparisons are the order's.
- **Exact duplicates**: a document whose rank is not the smallest among those with its exact key.
- **Near duplicates**, over one representative per exact key (its copies have the same signature, so
  they join its component and never bring it another member; this keeps groups of identical
  documents from making quadratic candidate pairs): the band hashes exploded and self-joined on
  (band, hash) give the candidate pairs, each linked when `count equal / num_perm >= threshold` (the
  division of `dedup.estimated_jaccard`, in doubles, so the boundary falls the same way). The linked
  pairs' connected components come from the large-star/small-star iteration (Kiveris et al., 2014),
  which ends with every member of a component pointing at its smallest rank; every document of a
  component but that one is a near duplicate, and so is every copy of a representative.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cptkit.config import DedupConfig
from cptkit.corpus import EXACT, KEEP, NEAR

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

FATE = "fate"
_RANK, _FIRST = "rank", "first"
_SRC, _DST = "src", "dst"


def duplicate_fates(
    documents: DataFrame, config: DedupConfig, *, position: str, doc_id: str, key: str, bands: str, signature: str
) -> DataFrame:
    """(`position`, FATE) for each row of `documents` (those that passed the record steps), with FATE
    KEEP, EXACT or NEAR as `corpus.duplicate_fates` gives it."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ordered = documents.orderBy(F.col(doc_id).asc_nulls_last(), F.col(key), F.col(position))
    nodes = ordered.select(position, key, bands, signature, F.monotonically_increasing_id().alias(_RANK))
    # Fixed here: the rank must not be computed again (differently partitioned) by a later job.
    nodes = nodes.localCheckpoint()
    nodes = nodes.withColumn(_FIRST, F.min(_RANK).over(Window.partitionBy(key)))
    fate = F.lit(KEEP)
    if config.near:
        near = _near_duplicate_ranks(nodes.where(F.col(_RANK) == F.col(_FIRST)), bands, signature, config.threshold)
        nodes = nodes.join(near, on=_RANK, how="left")
        fate = F.when(F.col(_RANK) != F.col(_FIRST), F.lit(NEAR)).when(F.col("near"), F.lit(NEAR)).otherwise(fate)
    if config.exact:
        fate = F.when(F.col(_RANK) != F.col(_FIRST), F.lit(EXACT)).otherwise(fate)
    return nodes.select(position, fate.cast("byte").alias(FATE))


def _near_duplicate_ranks(nodes: DataFrame, bands: str, signature: str, threshold: float) -> DataFrame:
    """(rank, near=True) for each of `nodes` linked to one of smaller rank."""
    from pyspark.sql import functions as F

    exploded = nodes.select(_RANK, F.posexplode(bands).alias("band", "hash"))
    left, right = exploded.alias("l"), exploded.alias("r")
    candidates = (
        left.join(right, on=["band", "hash"])
        .where(F.col(f"l.{_RANK}") < F.col(f"r.{_RANK}"))
        .select(F.col(f"l.{_RANK}").alias(_SRC), F.col(f"r.{_RANK}").alias(_DST))
        .distinct()
    )
    signatures = nodes.select(_RANK, signature)
    a = signatures.select(F.col(_RANK).alias(_SRC), F.col(signature).alias("a"))
    b = signatures.select(F.col(_RANK).alias(_DST), F.col(signature).alias("b"))
    equal = F.size(F.filter(F.zip_with("a", "b", lambda x, y: x == y), lambda same: same))
    jaccard = equal.cast("double") / F.size("a").cast("double")
    edges = candidates.join(a, on=_SRC).join(b, on=_DST).where(jaccard >= F.lit(float(threshold))).select(_SRC, _DST)
    stars = _components(edges.localCheckpoint())
    # Every node with an edge to a smaller one after the iteration is not its component's smallest.
    return stars.select(F.col(_SRC).alias(_RANK)).distinct().withColumn("near", F.lit(True))


def _components(edges: DataFrame) -> DataFrame:
    """Edges (src, dst) with src > dst, one per node but the smallest of each connected component of
    `edges`, pointing at that smallest node: large-star and small-star rounds until nothing changes."""
    from pyspark.sql import functions as F

    edges = edges.select(F.greatest(_SRC, _DST).alias(_SRC), F.least(_SRC, _DST).alias(_DST)).distinct()
    while True:
        # Large star: each node's larger neighbours are pointed at its smallest neighbour (or itself).
        both = edges.union(edges.select(F.col(_DST).alias(_SRC), F.col(_SRC).alias(_DST)))
        smallest = both.groupBy(_SRC).agg(F.least(F.min(_DST), F.col(_SRC)).alias("m"))
        large = (
            both.where(F.col(_DST) > F.col(_SRC))
            .join(smallest, on=_SRC)
            .select(F.col(_DST).alias(_SRC), F.col("m").alias(_DST))
        )
        # Small star: each node and its smaller neighbours are pointed at the smallest of them.
        smaller = large.groupBy(_SRC).agg(F.min(_DST).alias("m"))
        small = (
            large.join(smaller, on=_SRC)
            .select(F.col(_DST).alias(_SRC), "m")
            .union(smaller.select(_SRC, "m"))
            .where(F.col(_SRC) != F.col("m"))
            .select(_SRC, F.col("m").alias(_DST))
            .distinct()
            .localCheckpoint()
        )
        unchanged = small.exceptAll(edges).isEmpty() and edges.exceptAll(small).isEmpty()
        edges = small
        if unchanged:
            return edges
