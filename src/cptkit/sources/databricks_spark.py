"""A Unity Catalog table read by Spark (`prepare.engine: spark`): on a Databricks cluster (its active
session) or through Databricks Connect, with no SQL warehouse and no temporary table credentials.

The queries are the SQL warehouse's (`databricks_sql`: the same column mapping, filter values as bound
parameters, version pin, order by id, history, change data feed), run with `spark.sql` on the session, so
the snapshot holds the same rows in the same order whichever way the table is read.

Results come to this process in bounded memory. Where this process is Spark's driver (a local master, a
notebook or job on a cluster), Spark writes them as Parquet into a hidden work folder beside the snapshot
and they are read back part file by part file, in order. Through Databricks Connect the cluster's files
are not this machine's: the rows stream over the connection instead (`toLocalIterator`, a partition at a
time).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from cptkit.errors import CptkitError, SourceError
from cptkit.parquet_files import open_parquet
from cptkit.secrets import Secrets
from cptkit.sources.databricks_client import translate
from cptkit.sources.databricks_sql import Query, Warehouse


class SparkWarehouse(Warehouse):
    """Runs the source's queries on a SparkSession. `work_dir` is where Spark writes results for this
    process to read (it must be Spark's driver); None streams them over the session (Databricks Connect)."""

    def __init__(self, spark: Any, work_dir: Path | None, batch_size: int, secrets: Secrets) -> None:
        self._spark = spark
        self._work_dir = work_dir
        self._batch_size = batch_size
        self._secrets = secrets

    def rows(self, query: Query) -> pa.Table:
        """A small result (history, a count), collected."""
        with self._errors("run the query on Spark"):
            frame = self._frame(query)
            # Maps and structs (DESCRIBE HISTORY's operation parameters) as text: only flat columns are read.
            frame = frame.select([_flat(field) for field in frame.schema.fields])
            rows = frame.collect()
        return pa.Table.from_pylist([r.asDict() for r in rows], schema=_arrow_schema(frame.schema))

    def stream(self, query: Query) -> Iterator[pa.RecordBatch]:
        with self._errors("read the table on Spark"):
            frame = self._frame(query)
            if self._work_dir is None:
                yield from self._over_session(frame)
            else:
                yield from self._through_files(frame, self._work_dir)

    def _frame(self, query: Query) -> Any:
        return self._spark.sql(query.text, args=query.params or None)

    def _through_files(self, frame: Any, work_dir: Path) -> Iterator[pa.RecordBatch]:
        # A hidden ".*.tmp" name: a killed run's leftovers are removed by the next one (artifacts.invalidate).
        work = Path(tempfile.mkdtemp(prefix=".spark-read.", suffix=".tmp", dir=work_dir)).resolve()
        try:
            # Absolute paths: the JVM's working folder need not be this process's.
            frame.write.parquet(str(work / "rows"))
            if not (work / "rows").is_dir():
                # On a cluster a plain path can name another file system (dbfs:/): nothing would be read.
                raise SourceError(
                    f"Spark wrote the table's rows where this process cannot read them ({work}); on a Databricks "
                    "cluster put data.output_dir under /Volumes/"
                )
            # An ordered result is written one range per part file, numbered in order.
            for path in sorted((work / "rows").glob("part-*.parquet")):
                yield from open_parquet(path).iter_batches(batch_size=self._batch_size)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _over_session(self, frame: Any) -> Iterator[pa.RecordBatch]:
        schema = _arrow_schema(frame.schema)
        pending: list[dict[str, Any]] = []
        for row in frame.toLocalIterator():
            pending.append(row.asDict())
            if len(pending) == self._batch_size:
                yield pa.RecordBatch.from_pylist(pending, schema=schema)
                pending = []
        if pending:
            yield pa.RecordBatch.from_pylist(pending, schema=schema)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Spark's errors (a missing table or column, no permission) as one scrubbed line, as the warehouse's."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # pyspark's notice about the pandas version
                yield
        except CptkitError:
            raise
        except Exception as exc:
            raise translate(exc, what, self._secrets) from None


def _flat(field: Any) -> Any:
    from pyspark.sql.functions import col
    from pyspark.sql.types import ArrayType, MapType, StructType

    if isinstance(field.dataType, ArrayType | MapType | StructType):
        return col(f"`{field.name}`").cast("string").alias(field.name)
    return col(f"`{field.name}`")


def _arrow_schema(schema: Any) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema)
