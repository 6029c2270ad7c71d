"""Direct reads of a Delta table with deltalake: a Unity Catalog table resolved to its storage location
and short-lived read credentials (refreshed before they expire), or a plain local or object-store path.

Results use the same column layout as the SQL methods (`text`, `id`, metadata, internal columns), so one
conversion to canonical batches serves every method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from cptkit.config import DatabricksSourceConfig, FilterCondition
from cptkit.errors import SourceError
from cptkit.secrets import Secrets, mask_url
from cptkit.sources.databricks_client import Retrying, translate
from cptkit.sources.databricks_sql import CHANGE_TYPE, COMMIT_VERSION, KEEP, WATERMARK

# Credentials are renewed when fewer than this many seconds remain (a Parquet file can take minutes).
REFRESH_MARGIN_SECONDS = 300.0


def filter_expression(conditions: list[FilterCondition]) -> pc.Expression | None:
    """The config's filter as a pyarrow expression (values are data, never parsed as code)."""
    out: pc.Expression | None = None
    for cond in conditions:
        field = pc.field(cond.column)
        if cond.op == "is null":
            expr = field.is_null()
        elif cond.op == "is not null":
            expr = field.is_valid()
        elif cond.op in ("in", "not in"):
            expr = field.isin(cond.value)
            expr = ~expr if cond.op == "not in" else expr
        elif cond.op == "like":
            expr = pc.match_like(field, str(cond.value))
        else:
            expr = {
                "=": field == cond.value,
                "!=": field != cond.value,
                "<": field < cond.value,
                "<=": field <= cond.value,
                ">": field > cond.value,
                ">=": field >= cond.value,
            }[cond.op]
        out = expr if out is None else out & expr
    return out


class DeltaReader:
    def __init__(
        self,
        config: DatabricksSourceConfig,
        retrying: Retrying,
        workspace: Callable[[], Any] | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._retrying = retrying
        self._secrets: Secrets = retrying.secrets
        self._workspace_factory = workspace
        self._workspace: Any = None
        self._clock = clock
        self._table_id: str | None = None
        self._location: str | None = None
        self._options: dict[str, str] = {}
        self._expires_at: float | None = None
        self.credential_refreshes = 0

    # -- resolution ------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        c = self.config
        return mask_url(c.path) if c.path is not None else f"{c.catalog}.{c.schema_}.{c.table}"

    def _resolve(self) -> None:
        if self._location is not None:
            return
        c = self.config
        extra = {k: v.get_secret_value() for k, v in c.storage_options.items()}
        if c.path is not None:
            self._location, self._options = c.path, extra
            return
        from databricks.sdk.service.catalog import DataSourceFormat

        assert self._workspace_factory is not None
        self._workspace = self._workspace_factory()
        name = self.where
        info = self._retrying.call(f"look up table {name} in Unity Catalog", lambda: self._workspace.tables.get(name))
        if info.data_source_format != DataSourceFormat.DELTA or not info.storage_location:
            kind = info.data_source_format.value if info.data_source_format else (info.table_type or "view")
            kind = getattr(kind, "value", kind)
            raise SourceError(f"{name} is not a Delta table with files ({kind}); use method sql or statement")
        self._table_id, self._location = info.table_id, info.storage_location
        self._refresh_credentials()

    def _refresh_credentials(self) -> None:
        if self._table_id is None:
            return
        from databricks.sdk.service.catalog import TableOperation

        creds = self._retrying.call(
            f"get temporary read credentials for {self.where}",
            lambda: self._workspace.temporary_table_credentials.generate_temporary_table_credentials(
                operation=TableOperation.READ, table_id=self._table_id
            ),
        )
        extra = {k: v.get_secret_value() for k, v in self.config.storage_options.items()}
        self._options = {**extra, **storage_options_for(creds, str(self._location))}
        self._secrets.add(*self._options.values())
        self._expires_at = creds.expiration_time / 1000 if creds.expiration_time else None

    def _fresh(self) -> None:
        if self._expires_at is not None and self._clock() > self._expires_at - REFRESH_MARGIN_SECONDS:
            self._refresh_credentials()
            self.credential_refreshes += 1

    def _open(self, version: int | None) -> Any:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        self._resolve()
        self._fresh()
        try:
            return DeltaTable(str(self._location), version=version, storage_options=self._options or None)
        except TableNotFoundError:
            raise SourceError(f"{self.where}: no Delta table at its storage location") from None
        except Exception as exc:
            raise translate(exc, f"open Delta table {self.where}", self._secrets) from None

    def current_version(self) -> int:
        return int(self._open(None).version())

    # -- reads -----------------------------------------------------------------------------------

    def _projection(self, schema: pa.Schema, extra: dict[str, pc.Expression]) -> dict[str, pc.Expression]:
        c = self.config
        needed = [c.text_column, *([c.id_column] if c.id_column else []), *c.metadata_columns]
        needed += [c.watermark_column] if c.watermark_column else []
        needed += [cond.column for cond in c.filter]
        missing = [name for name in dict.fromkeys(needed) if name not in schema.names]
        if missing:
            raise SourceError(
                f"{self.where}: a configured column does not exist: {missing}; columns are {schema.names}"
            )
        columns = {"text": pc.field(c.text_column)}
        if c.id_column:
            columns["id"] = pc.field(c.id_column)
        columns.update({m: pc.field(m) for m in c.metadata_columns})
        return {**columns, **extra}

    def snapshot(self, version: int, watermark: dict[str, Any] | None) -> Iterator[pa.RecordBatch]:
        """The table at `version`, file by file; credentials are renewed between files when they near
        expiry, and a file whose read fails on expired credentials is retried once after renewal."""
        c = self.config
        table = self._open(version)
        dataset = table.to_pyarrow_dataset()
        extra: dict[str, pc.Expression] = {}
        condition = filter_expression(c.filter)
        if c.mode == "watermark":
            extra[WATERMARK] = pc.field(str(c.watermark_column))
        if watermark is not None:
            assert c.id_column is not None
            wm, ident = pc.field(str(c.watermark_column)), pc.field(c.id_column)
            extra[KEEP] = pc.fill_null(condition, False) if condition is not None else pc.scalar(True)
            condition = (wm > watermark["value"]) | ((wm == watermark["value"]) & (ident > watermark["id"]))
        columns = self._projection(dataset.schema, extra)
        fragments = list(dataset.get_fragments())
        for index in range(len(fragments)):
            if index and self._expires_at is not None and self._clock() > self._expires_at - REFRESH_MARGIN_SECONDS:
                dataset = self._open(version).to_pyarrow_dataset()  # renewed credentials, same version and files
                fragments = list(dataset.get_fragments())
            done = 0
            try:
                for batch in fragments[index].to_batches(
                    schema=dataset.schema, columns=columns, filter=condition, batch_size=c.batch_size
                ):
                    done += batch.num_rows
                    yield batch
            except Exception as exc:
                if self._table_id is None or not _looks_expired(exc):
                    raise translate(exc, f"read Delta table {self.where}", self._secrets) from None
                self._expires_at = 0.0  # renew now and reread this file, skipping the rows already yielded
                dataset = self._open(version).to_pyarrow_dataset()
                fragments = list(dataset.get_fragments())
                yield from _skip_rows(
                    dataset, fragments[index], done, columns, condition, c.batch_size, self.where, self._secrets
                )

    def changes(self, start: int, end: int) -> Iterator[pa.RecordBatch]:
        """The change data feed from `start` to `end` (inclusive), without update pre-images."""
        c = self.config
        table = self._open(end)
        schema = table.to_pyarrow_dataset().schema
        condition = filter_expression(c.filter)
        keep = pc.fill_null(condition, False) if condition is not None else pc.scalar(True)
        columns = self._projection(
            schema, {CHANGE_TYPE: pc.field(CHANGE_TYPE), COMMIT_VERSION: pc.field(COMMIT_VERSION), KEEP: keep}
        )
        names = list(dict.fromkeys([c.text_column, *([c.id_column] if c.id_column else []), *c.metadata_columns]))
        names += [cond.column for cond in c.filter if cond.column not in names]
        try:
            reader = pa.RecordBatchReader.from_stream(
                table.load_cdf(
                    starting_version=start, ending_version=end, columns=[*names, CHANGE_TYPE, COMMIT_VERSION]
                )
            )
            for raw in reader:
                if raw.num_rows == 0:
                    continue
                raw = _without_views(raw)
                raw = raw.filter(pc.not_equal(raw.column(CHANGE_TYPE), "update_preimage"))
                yield from pads.dataset(pa.Table.from_batches([raw])).to_batches(columns=columns)
        except SourceError:
            raise
        except Exception as exc:
            error = translate(exc, f"read the change data feed of {self.where} from version {start}", self._secrets)
            raise SourceError(
                f"{error} (is delta.enableChangeDataFeed on since then, and the versions not vacuumed? "
                "--force rereads the whole table)"
            ) from None


def _skip_rows(
    dataset: Any,
    fragment: Any,
    skip: int,
    columns: dict[str, pc.Expression],
    condition: pc.Expression | None,
    batch_size: int,
    where: str,
    secrets: Secrets,
) -> Iterator[pa.RecordBatch]:
    try:
        for batch in fragment.to_batches(
            schema=dataset.schema, columns=columns, filter=condition, batch_size=batch_size
        ):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield batch.slice(skip)
            skip = 0
    except Exception as exc:
        raise translate(exc, f"read Delta table {where} after renewing its credentials", secrets) from None


def _without_views(batch: pa.RecordBatch) -> pa.RecordBatch:
    """delta-rs hands out string_view / binary_view columns, which many pyarrow kernels do not take yet."""
    fields = []
    for f in batch.schema:
        if f.type == pa.string_view():
            f = f.with_type(pa.string())
        elif f.type == pa.binary_view():
            f = f.with_type(pa.binary())
        fields.append(f)
    schema = pa.schema(fields)
    return batch if schema == batch.schema else batch.cast(schema)


def _looks_expired(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("expired", "403", "forbidden", "accessdenied", "authenticationfailed"))


def storage_options_for(creds: Any, location: str) -> dict[str, str]:
    """deltalake (object_store) options from Unity Catalog temporary credentials, per cloud."""
    if location.startswith("file:") or location.startswith("/"):
        return {}  # a local table needs no credentials
    s3 = creds.aws_temp_credentials or creds.r2_temp_credentials  # R2 speaks the S3 protocol
    if s3 is not None:
        return _present(
            AWS_ACCESS_KEY_ID=s3.access_key_id,
            AWS_SECRET_ACCESS_KEY=s3.secret_access_key,
            AWS_SESSION_TOKEN=s3.session_token,
        )
    if creds.azure_user_delegation_sas is not None:
        return _present(AZURE_STORAGE_SAS_TOKEN=creds.azure_user_delegation_sas.sas_token)
    if creds.azure_aad is not None:
        return _present(AZURE_STORAGE_TOKEN=creds.azure_aad.aad_token)
    if creds.gcp_oauth_token is not None:
        raise SourceError(
            "Unity Catalog gave a Google Cloud OAuth token, which deltalake cannot use; use method sql or statement"
        )
    raise SourceError("Unity Catalog returned no usable storage credentials for this table")


def _present(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v}
