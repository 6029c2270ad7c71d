"""Where documents come from: the source sections (local files and tables, Databricks), their checks,
and the Databricks connection defaults with their environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, model_validator

from cptkit.config.base import Section


class SourceBase(Section):
    text_column: str = Field("text", min_length=1, description="Column that holds the document text.")
    id_column: str | None = Field(
        None, description="Column with a stable document id; when unset, the id is a hash of the text."
    )
    metadata_columns: list[str] = Field(
        default_factory=list, description="Columns carried through to the prepared data."
    )
    batch_size: int = Field(1024, gt=0, description="Rows per Arrow batch read from the source.")

    @model_validator(mode="after")
    def _reserved_columns(self) -> SourceBase:
        reserved = {"id", "text", "error"}
        clash = [c for c in self.metadata_columns if c in reserved]
        if clash:
            raise ValueError(f"metadata_columns may not use the reserved names {sorted(reserved)}: {clash}")
        return self


class JsonlSourceConfig(SourceBase):
    type: Literal["jsonl"]
    path: Path = Field(description="A .jsonl file, or a folder of them.")


class ParquetSourceConfig(SourceBase):
    type: Literal["parquet"]
    path: Path = Field(description="A .parquet file, or a folder of them.")


class CsvSourceConfig(SourceBase):
    type: Literal["csv"]
    path: Path = Field(description="A .csv file, or a folder of them.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator.")
    encoding: str = Field("utf-8", description="Text encoding; undecodable rows are quarantined.")


class DeltaSourceConfig(SourceBase):
    type: Literal["delta"]
    path: str = Field(description="A Delta table: a local folder or an object-store URI (s3://, abfss://).")
    version: int | None = Field(None, ge=0, description="Pin the read to this table version.")
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict, description="Options passed to deltalake (credentials are masked)."
    )
    mode: Literal["full", "watermark", "cdf"] = Field(
        "full",
        description="full: the whole table each run; watermark: rows newer than the last run by watermark_column "
        "(ties by id), merged by id; cdf: the Delta change data feed since the last run's version (deletes remove).",
    )
    watermark_column: str | None = Field(None, description="watermark mode: a column that grows with each change.")

    @model_validator(mode="after")
    def _incremental(self) -> DeltaSourceConfig:
        problems = _incremental_problems(self.mode, self.watermark_column, self.id_column, self.version)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _incremental_problems(
    mode: str, watermark_column: str | None, id_column: str | None, version: int | None
) -> list[str]:
    """What a Delta or Databricks source's incremental mode needs, shared by both."""
    problems: list[str] = []
    if mode == "watermark" and not watermark_column:
        problems.append("mode watermark needs watermark_column")
    if mode != "full" and not id_column:
        problems.append(f"mode {mode} needs id_column (changed rows replace documents by id)")
    if mode != "full" and version is not None:
        problems.append("version pins a full read; incremental modes follow the table")
    return problems


class FilesSourceConfig(SourceBase):
    type: Literal["files"]
    path: Path = Field(description="A folder of documents, read recursively.")
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".html", ".htm", ".pdf"],
        description="File suffixes read as documents; other files are counted as skipped.",
    )


# SQL text that cptkit writes from config values: names are checked here and backtick-quoted by the
# query builder; values are always bound parameters. A name that fails these checks is a config error.
_IDENTIFIER_FORBIDDEN = ("`",)
_TABLE_PART_FORBIDDEN = (".", " ", "/", "`")
_STATEMENT_WORDS = (
    "select from where union intersect except join into insert update delete merge drop create alter "
    "truncate grant revoke with limit order group having call exec execute set use values table describe "
    "show copy attach detach pragma load install optimize vacuum refresh cache uncache msck"
)
_EXPRESSION_KEYWORDS = frozenset(_STATEMENT_WORDS.split())


def identifier_problem(name: str, *, table_part: bool = False) -> str | None:
    """Why `name` cannot be used as a column (or, with table_part, a catalog/schema/table) name, or None."""
    if not name or len(name) > 255:
        return "must be 1 to 255 characters"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "may not contain control characters"
    bad = [ch for ch in (_TABLE_PART_FORBIDDEN if table_part else _IDENTIFIER_FORBIDDEN) if ch in name]
    if bad:
        return f"may not contain {' '.join(repr(ch) for ch in bad)}"
    return None


def expression_problem(expression: str) -> str | None:
    """Why a user's SQL text expression is refused, or None. It may use columns, literals, operators,
    function calls and CASE, but no statement, subquery, comment, parameter marker or semicolon."""
    import re

    if any(ord(ch) < 0x20 and ch not in "\t\n\r" for ch in expression):
        return "may not contain control characters"
    if "--" in expression or "/*" in expression:
        return "may not contain comments (-- or /*)"
    rest = expression
    token = re.compile(r"\s+|'[^'\\]*'|`[^`]+`|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|\|\||<=|>=|<>|!=|[-+*/%(),.=<>]")
    while rest:
        match = token.match(rest)
        if match is None:
            allowed = "columns, 'literals' without backslashes, operators, functions, CASE"
            return f"unexpected text at {rest[:20]!r} (allowed: {allowed})"
        word = match.group(0)
        if word.lower() in _EXPRESSION_KEYWORDS:
            return f"may not use the keyword {word.upper()} (an expression, not a query)"
        rest = rest[match.end() :]
    return None


class FilterCondition(Section):
    """One condition on a column; conditions are ANDed. The value is always sent as a bound parameter."""

    column: str = Field(description="Column the condition tests.")
    op: Literal["=", "!=", "<", "<=", ">", ">=", "in", "not in", "like", "is null", "is not null"] = Field(
        "=", description="Comparison."
    )
    value: str | int | float | bool | list[str | int | float | bool] | None = Field(
        None, description="A value, a list for in / not in, nothing for is null / is not null."
    )

    @model_validator(mode="after")
    def _value_fits_op(self) -> FilterCondition:
        problem = identifier_problem(self.column)
        if problem:
            raise ValueError(f"column {self.column!r} {problem}")
        if self.op in ("is null", "is not null"):
            if self.value is not None:
                raise ValueError(f"{self.op} takes no value")
        elif self.op in ("in", "not in"):
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"{self.op} needs a non-empty list of values")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"{self.op} needs one value (use is null / is not null for nulls)")
        return self


class DatabricksConnection(Section):
    """How to reach a workspace. Authentication is the Databricks SDK's unified configuration: a token,
    OAuth machine-to-machine (client id and secret), or a ~/.databrickscfg profile."""

    host: str | None = Field(None, description="Workspace URL (DATABRICKS_HOST).")
    token: SecretStr | None = Field(None, description="Personal access token (DATABRICKS_TOKEN).")
    profile: str | None = Field(None, description="Profile in ~/.databrickscfg (DATABRICKS_CONFIG_PROFILE).")
    client_id: str | None = Field(None, description="OAuth M2M service principal id (DATABRICKS_CLIENT_ID).")
    client_secret: SecretStr | None = Field(
        None, description="OAuth M2M service principal secret (DATABRICKS_CLIENT_SECRET)."
    )
    warehouse_id: str | None = Field(None, description="SQL warehouse id (DATABRICKS_WAREHOUSE_ID).")
    http_path: str | None = Field(
        None, description="SQL warehouse HTTP path, e.g. /sql/1.0/warehouses/<id> (DATABRICKS_HTTP_PATH)."
    )


class DatabricksSourceConfig(SourceBase, DatabricksConnection):
    """A Unity Catalog table (through a SQL warehouse, the Statement Execution API or its Delta files)
    or the files of a Volume. Unset connection keys and catalog/schema/table come from `databricks`."""

    type: Literal["databricks"]
    method: Literal["sql", "statement", "delta", "volume"] = Field(
        "sql",
        description="sql: a SQL warehouse via databricks-sql-connector; statement: the Statement Execution API; "
        "delta: the table's Delta files via Unity Catalog credentials (or `path`); volume: files under volume_path.",
    )
    catalog: str | None = Field(None, description="Unity Catalog catalog (default databricks.catalog).")
    schema_: str | None = Field(None, alias="schema", description="Schema (default databricks.schema).")
    table: str | None = Field(
        None, description="Table, or a three-part catalog.schema.table name (default databricks.table)."
    )
    path: str | None = Field(
        None, description="delta only: a Delta table folder or object-store URI read instead of a catalog table."
    )
    volume_path: str | None = Field(
        None, description="volume only: /Volumes/<catalog>/<schema>/<volume>[/folder], read recursively."
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".jsonl", ".pdf"],
        description="volume only: file suffixes read; one document per file, or per line of .jsonl.",
    )
    text_expression: str | None = Field(
        None,
        description="sql/statement: a SQL expression for the text instead of text_column, e.g. "
        "concat_ws('\\n\\n', title, body). Columns, literals, operators, functions and CASE only.",
    )
    filter: list[FilterCondition] = Field(
        default_factory=list, description="Conditions rows must meet (ANDed); values are bound parameters."
    )
    mode: Literal["full", "watermark", "cdf"] = Field(
        "full",
        description="full: the whole table each run; watermark: rows newer than the last run by watermark_column "
        "(ties by id), merged by id; cdf: the Delta change data feed since the last run's version (deletes remove).",
    )
    watermark_column: str | None = Field(None, description="watermark mode: a column that grows with each change.")
    version: int | None = Field(None, ge=0, description="Pin a full read to this Delta table version.")
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="delta only: extra deltalake storage options, e.g. AWS_REGION (credentials are masked).",
    )
    timeout_seconds: float = Field(
        600, gt=0, description="Longest wait for a warehouse to start or a statement to finish, retries included."
    )
    max_retries: int = Field(4, ge=0, description="Retries of a failed network call, with exponential backoff.")

    @model_validator(mode="before")
    @classmethod
    def _split_table_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("table"), str) and "." in data["table"]:
            parts = data["table"].split(".")
            if len(parts) != 3:
                return data  # reported with the other problems
            for key, part in zip(("catalog", "schema"), parts[:2], strict=True):
                given = data.get(key, data.get(f"{key}_")) if key == "schema" else data.get(key)
                if given not in (None, "", part):
                    raise ValueError(f"table {data['table']!r} names {key} {part!r} but {key} is {given!r}")
            data = {**data, "catalog": parts[0], "schema": parts[1], "table": parts[2]}
            data.pop("schema_", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DatabricksSourceConfig:
        problems: list[str] = []
        table_method = self.method in ("sql", "statement") or (self.method == "delta" and self.path is None)
        if table_method:
            for key, value in (("catalog", self.catalog), ("schema", self.schema_), ("table", self.table)):
                if not value:
                    problems.append(f"{key} is required for method {self.method} (or set databricks.{key})")
        for key, value in (("catalog", self.catalog), ("schema", self.schema_), ("table", self.table)):
            if key == "table" and value and value.count(".") not in (0, 2):
                problems.append(f"table {value!r}: use table, or catalog.schema.table")
            elif value and (problem := identifier_problem(value, table_part=True)):
                problems.append(f"{key} {value!r} {problem}")
        columns = [self.text_column, *([self.id_column] if self.id_column else []), *self.metadata_columns]
        columns += [self.watermark_column] if self.watermark_column else []
        for column in columns:
            if problem := identifier_problem(column):
                problems.append(f"column {column!r} {problem}")
        if self.text_expression is not None:
            if self.method not in ("sql", "statement"):
                problems.append("text_expression needs method sql or statement")
            elif problem := expression_problem(self.text_expression):
                problems.append(f"text_expression {problem}")
        if self.method == "volume":
            parts = (self.volume_path or "").strip("/").split("/")
            if not self.volume_path or parts[0] != "Volumes" or len(parts) < 4 or "" in parts or ".." in parts:
                problems.append("volume_path must look like /Volumes/<catalog>/<schema>/<volume>[/folder]")
            if self.mode != "full" or self.filter or self.version is not None:
                problems.append("method volume reads every file: mode full, no filter, no version")
        if self.path is not None and self.method != "delta":
            problems.append("path is for method delta")
        problems += _incremental_problems(self.mode, self.watermark_column, self.id_column, self.version)
        if problems:
            raise ValueError("; ".join(problems))
        return self


SourceConfig = Annotated[
    JsonlSourceConfig
    | ParquetSourceConfig
    | CsvSourceConfig
    | DeltaSourceConfig
    | FilesSourceConfig
    | DatabricksSourceConfig,
    Field(discriminator="type"),
]
SOURCE_TYPES = ("jsonl", "parquet", "csv", "delta", "files", "databricks")


class DatabricksConfig(DatabricksConnection):
    """Connection settings, the defaults of every `type: databricks` source. Each falls back to the seed's
    environment variable (also read from .env)."""

    catalog: str | None = Field(None, description="Unity Catalog catalog (DATABRICKS_CATALOG).")
    schema_: str | None = Field(None, alias="schema", description="Schema (DATABRICKS_SCHEMA).")
    table: str | None = Field(None, description="Table (DATABRICKS_TABLE).")


ENV_KEYS = {
    "host": "DATABRICKS_HOST",
    "token": "DATABRICKS_TOKEN",
    "profile": "DATABRICKS_CONFIG_PROFILE",
    "client_id": "DATABRICKS_CLIENT_ID",
    "client_secret": "DATABRICKS_CLIENT_SECRET",
    "warehouse_id": "DATABRICKS_WAREHOUSE_ID",
    "http_path": "DATABRICKS_HTTP_PATH",
    "catalog": "DATABRICKS_CATALOG",
    "schema": "DATABRICKS_SCHEMA",
    "table": "DATABRICKS_TABLE",
}
