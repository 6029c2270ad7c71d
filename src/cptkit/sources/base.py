"""The source interface and the canonical batch every source yields.

A source reads documents in bounded-memory Arrow batches with the columns `id` (string), `text`
(string, null when the row is malformed), `error` (string, the reason a row is malformed, else null)
and the configured metadata columns. Sources never drop a row: a malformed row is yielded with its
error so that prepare can quarantine it and account for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pyarrow as pa

ID, TEXT, ERROR = "id", "text", "error"


class Source(Protocol):
    def describe(self) -> dict[str, Any]:
        """What is read, for manifests and logs. Never contains a secret."""
        ...

    def input_fingerprint(self) -> str | None:
        """A cheap identity of the input's current state (file stats, table version), or None when
        it cannot be known without reading everything."""
        ...

    def table_version(self) -> int | None:
        """The Delta table version read, where there is one."""
        ...

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Canonical batches, in a stable order."""
        ...


def content_id(text: str) -> str:
    """A stable id derived from a document's text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def check_text(value: Any) -> tuple[str | None, str | None]:
    """Classify one raw text value: (text, None) when usable, (None, reason) when malformed."""
    if value is None:
        return None, "null_text"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "undecodable_bytes"
    if not isinstance(value, str):
        return None, f"non_string_text ({type(value).__name__})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: what surrogateescape decoding leaves for bytes that are not UTF-8.
        return None, "undecodable_bytes"
    return value, None


def canonical_batch(
    raw_texts: Sequence[Any],
    raw_ids: Sequence[Any] | None,
    metadata: dict[str, pa.Array],
    row_offset: int,
    errors: Sequence[str | None] | None = None,
) -> pa.RecordBatch:
    """Build a canonical batch from raw values.

    `row_offset` is the position of the first row in the whole source, used to give malformed rows
    without an id a stable one. `errors`, when given, marks rows the reader already found malformed.
    """
    ids: list[str] = []
    texts: list[str | None] = []
    errs: list[str | None] = []
    for i, raw in enumerate(raw_texts):
        text, err = check_text(raw)
        if errors is not None and errors[i] is not None:
            text, err = None, errors[i]
        raw_id = raw_ids[i] if raw_ids is not None else None
        if raw_id is not None and raw_id != "":
            doc_id = str(raw_id)
        elif text is not None:
            doc_id = content_id(text)
        else:
            doc_id = f"row-{row_offset + i}"
        ids.append(doc_id)
        texts.append(text)
        errs.append(err)
    columns = {
        ID: pa.array(ids, pa.string()),
        TEXT: pa.array(texts, pa.large_string()),
        ERROR: pa.array(errs, pa.string()),
        **metadata,
    }
    return pa.RecordBatch.from_pydict(columns)


def strings_column(values: Sequence[Any]) -> pa.Array:
    """Metadata from untyped formats (JSONL, CSV) is kept as strings; non-strings as JSON text."""
    import json

    out = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
    return pa.array(out, pa.string())
