"""Incremental extraction: what a source reads given the state of the last successful run, and how its
changes are applied to the previous snapshot.

A change batch is a canonical batch with two more columns: `_op` ("upsert" or "delete") and
`_commit_version` (the Delta version of a change-data-feed row, else null). Applying changes keeps every
unchanged row in its old order and appends, for each changed id, its last operation if that is an
upsert. Applying the same changes twice gives the same snapshot, so a run interrupted after replacing the
snapshot but before saving its state is repaired by the next run.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cptkit.errors import StageError
from cptkit.parquet_files import open_parquet
from cptkit.sources.base import ID

OP, SEQ = "_op", "_commit_version"
UPSERT, DELETE = "upsert", "delete"
STATE = "state.json"


@dataclass
class Read:
    """One extraction's reading plan. `batches` are a whole snapshot (changes=False) or changes to apply
    to the previous one; `state` is called once they are exhausted and gives what the next run starts from."""

    batches: Iterator[pa.RecordBatch]
    changes: bool
    state: Callable[[], dict[str, Any]]
    query: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class IncrementalSource(Protocol):
    def state_key(self) -> str:
        """A fingerprint of the settings that shape the snapshot; a saved state with another key is ignored."""
        ...

    def read(self, previous: dict[str, Any] | None) -> Read: ...

    def dry_run(self, previous: dict[str, Any] | None) -> dict[str, Any]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Watermark values survive a JSON round trip with their type.


def encode_value(value: Any) -> dict[str, Any]:
    if isinstance(value, dt.datetime):
        return {"type": "timestamp", "value": value.isoformat()}
    if isinstance(value, dt.date):
        return {"type": "date", "value": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"type": "decimal", "value": str(value)}
    if isinstance(value, bool | int | float | str) or value is None:
        return {"type": type(value).__name__, "value": value}
    return {"type": "str", "value": str(value)}


def decode_value(data: dict[str, Any]) -> Any:
    kind, value = data.get("type"), data.get("value")
    if kind == "timestamp":
        return dt.datetime.fromisoformat(str(value))
    if kind == "date":
        return dt.date.fromisoformat(str(value))
    if kind == "decimal":
        return decimal.Decimal(str(value))
    return value


class WatermarkTracker:
    """The largest (watermark, id) pair seen; null watermarks never advance it."""

    def __init__(self, start: tuple[Any, Any] | None = None) -> None:
        self.best = start

    def update(self, watermarks: pa.Array, ids: pa.Array) -> None:
        valid = pc.is_valid(watermarks)
        if not pc.any(valid).as_py():
            return
        top = pc.max(watermarks).as_py()
        tie_ids = pc.filter(ids, pc.and_(valid, pc.equal(watermarks, pc.max(watermarks))))
        top_id = pc.max(tie_ids).as_py()
        if self.best is None or (top, top_id) > self.best:
            self.best = (top, top_id)

    def state(self) -> dict[str, Any] | None:
        if self.best is None:
            return None
        return {"value": encode_value(self.best[0]), "id": encode_value(self.best[1])}


# ---------------------------------------------------------------------------------------------------
# Applying changes.


@dataclass
class Applied:
    upserted: int = 0
    deleted: int = 0
    unchanged: int = 0


def spool_changes(changes: Iterator[pa.RecordBatch], spool: Path) -> tuple[dict[str, tuple[int, int, str]], int]:
    """Write change rows to a Parquet spool; return, per id, its winning change as (commit version,
    arrival index, op), and the number of change rows. The winner is the latest commit, then the latest
    arrival, so unordered change-feed batches apply in commit order."""
    final: dict[str, tuple[int, int, str]] = {}
    writer: pq.ParquetWriter | None = None
    seen = 0
    try:
        for batch in changes:
            if batch.num_rows == 0:
                continue
            if writer is None:
                writer = pq.ParquetWriter(spool, batch.schema, compression="zstd")
            elif batch.schema != writer.schema:
                batch = batch.cast(writer.schema)
            writer.write_batch(batch)
            versions = batch.column(SEQ).to_pylist()
            for i, (doc_id, op) in enumerate(
                zip(batch.column(ID).to_pylist(), batch.column(OP).to_pylist(), strict=True)
            ):
                key = (versions[i] if versions[i] is not None else -1, seen + i, op)
                if doc_id not in final or key[:2] > final[doc_id][:2]:
                    final[doc_id] = key
            seen += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return final, seen


def apply_changes(
    previous: Path, spool: Path | None, final: dict[str, tuple[int, int, str]], applied: Applied
) -> Iterator[pa.RecordBatch]:
    """Batches of the new snapshot: unchanged previous rows, then each changed id's final upsert."""
    previous_file = open_parquet(previous)
    schema = previous_file.schema_arrow
    changed = pa.array(list(final), pa.string())
    deletes = pa.array([k for k, v in final.items() if v[2] == DELETE], pa.string())
    for batch in previous_file.iter_batches(batch_size=8192):
        keep = pc.invert(pc.is_in(batch.column(ID), value_set=changed))
        applied.deleted += pc.sum(pc.is_in(batch.column(ID), value_set=deletes).cast(pa.int64())).as_py() or 0
        kept = batch.filter(keep)
        applied.unchanged += kept.num_rows
        if kept.num_rows:
            yield kept
    if spool is None:
        return
    seen = 0
    for batch in open_parquet(spool).iter_batches(batch_size=8192):
        ids, ops = batch.column(ID).to_pylist(), batch.column(OP).to_pylist()
        mask = [final[ids[i]][1] == seen + i and ops[i] == UPSERT for i in range(batch.num_rows)]
        seen += batch.num_rows
        rows = batch.filter(pa.array(mask)).drop_columns([OP, SEQ])
        if rows.num_rows == 0:
            continue
        applied.upserted += rows.num_rows
        if previous_file.metadata.num_rows and rows.schema != schema:
            try:
                rows = rows.select(schema.names).cast(schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
                raise StageError(
                    f"changed rows do not fit the previous snapshot's columns ({exc}); rerun with --force"
                ) from None
        yield rows
