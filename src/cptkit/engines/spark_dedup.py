"""`corpus.duplicate_fates` as Spark DataFrame operations: the same decisions, with nothing per document
on the driver.

- **Order.** The documents that passed the record steps are sorted by (id, exact key, row number in the
  snapshot): `dedup.document_order`'s total order (Spark, like Arrow, compares strings by their UTF-8
  bytes and binary keys as unsigned bytes; the row number breaks ties the way input order does
  locally). `monotonically_increasing_id` after the sort numbers them in that order: a `rank` (not
  consecutive) whose comparisons are the order's.
- **Exact duplicates**: a document whose rank is not the smallest among those with its exact key.
- **Near duplicates**, over one representative per exact key (its copies have the same signature, so
  they join its component and never bring it another member): the band hashes exploded and grouped by
  (band, hash) give the buckets; the members of each bucket of two or more are linked by
  `dedup.similar_links` in a Python task (`applyInArrow`), the local engine's own search, which
  returns a spanning forest of the pairs whose estimated Jaccard reaches the threshold, so a large
  bucket costs at most one search per member rather than quadratic candidate pairs. The linked
  pairs' connected components come from the large-star/small-star iteration (Kiveris et al., 2014),
  which ends with every member of a component pointing at its smallest rank; every document of a
  component but that one is a near duplicate, and so is every copy of a representative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from cptkit.config import DedupConfig
from cptkit.corpus import EXACT, KEEP, NEAR
from cptkit.dedup import similar_links

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
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    exploded = nodes.select(_RANK, F.posexplode(bands).alias("band", "hash"))
    # Only the documents of buckets with more than one member take their signatures into the shuffle
    # that groups the buckets: most documents share a band with no other.
    sizes = F.count(F.lit(1)).over(Window.partitionBy("band", "hash"))
    colliding = exploded.withColumn("members", sizes).where(F.col("members") > 1).drop("members")
    members = colliding.join(nodes.select(_RANK, signature), on=_RANK)
    edges = members.groupBy("band", "hash").applyInArrow(_bucket_links(signature, threshold), _EDGES_DDL)
    stars = _components(edges.localCheckpoint())
    # Every node with an edge to a smaller one after the iteration is not its component's smallest.
    return stars.select(F.col(_SRC).alias(_RANK)).distinct().withColumn("near", F.lit(True))


_EDGES_DDL = f"{_SRC} long, {_DST} long"


def _bucket_links(signature: str, threshold: float) -> Callable[[pa.Table], pa.Table]:
    """The task that links one band bucket's members: `dedup.similar_links`, as the local engine does, so
    a bucket of k documents costs at most k searches, not the k*(k-1)/2 pairs of a self-join."""

    def links(bucket: pa.Table) -> pa.Table:
        ranks = bucket.column(_RANK).to_numpy()
        column = bucket.column(signature).combine_chunks()
        rows = np.asarray(column.flatten()).reshape(len(ranks), -1)
        pairs = np.asarray(list(similar_links(rows, threshold)), dtype=np.int64).reshape(-1, 2)
        return pa.table({_SRC: ranks[pairs[:, 0]], _DST: ranks[pairs[:, 1]]})

    return links


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
