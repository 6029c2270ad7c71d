"""The evaluation sets: the domain and general held-out splits and further named sets, read from any
source type, capped to a document or token budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cptkit.config import (
    Config,
    CsvSourceConfig,
    DeltaSourceConfig,
    FilesSourceConfig,
    JsonlSourceConfig,
    ParquetSourceConfig,
    SourceConfig,
    section_fingerprint,
)
from cptkit.datasets import VAL, domain_dir, replay_dir
from cptkit.errors import CptkitError, StageError

DOMAIN, GENERAL = "domain", "general"


@dataclass(frozen=True)
class EvalSet:
    name: str
    texts: list[str]
    bytes: int  # UTF-8 bytes of all texts
    skipped: int  # rows without usable text (null, malformed, empty)
    source: dict[str, Any]
    contaminated: int | None = None  # documents found in the training text (None: not checked)
    any_overlap: int | None = None  # documents sharing at least one n-gram with it


def source_for_path(path: str) -> SourceConfig:
    """A source for a path given on the command line: a Delta table folder (or object-store URI), a
    Parquet, JSONL or CSV file or folder of them, or a folder of text files. Text is in `text`."""
    if "://" in path:
        return DeltaSourceConfig(type="delta", path=path)
    p = Path(path).expanduser()
    if not p.exists():
        raise CptkitError(f"{path}: no such file or folder")
    if p.is_dir():
        if (p / "_delta_log").is_dir():
            return DeltaSourceConfig(type="delta", path=str(p))
        suffixes = {f.suffix.lower() for f in p.rglob("*") if f.is_file()}
        if ".parquet" in suffixes:
            return ParquetSourceConfig(type="parquet", path=p)
        if suffixes & {".jsonl", ".ndjson"}:
            return JsonlSourceConfig(type="jsonl", path=p)
        if ".csv" in suffixes:
            return CsvSourceConfig(type="csv", path=p)
        return FilesSourceConfig(type="files", path=p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return ParquetSourceConfig(type="parquet", path=p)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return JsonlSourceConfig(type="jsonl", path=p)
    if suffix == ".csv":
        return CsvSourceConfig(type="csv", path=p)
    raise CptkitError(f"{path}: not a .jsonl, .parquet or .csv file, a Delta table or a folder of documents")


def eval_sources(config: Config) -> dict[str, SourceConfig]:
    """The evaluation sets, domain first: the configured ones, else the validation splits of prepare."""
    ec = config.evaluate
    sources: dict[str, SourceConfig] = {}
    if ec.domain is not None:
        sources[DOMAIN] = ec.domain
    else:
        val = domain_dir(config) / VAL
        if not val.is_file():
            raise StageError(
                f"no domain evaluation set: {val} does not exist; run `cptkit prepare`, pass --domain-data, "
                "or set evaluate.domain"
            )
        sources[DOMAIN] = JsonlSourceConfig(type="jsonl", path=val)
    if ec.general is not None:
        sources[GENERAL] = ec.general
    elif config.data.replay is not None:
        val = replay_dir(config) / VAL
        if not val.is_file():
            raise StageError(f"no general evaluation set: {val} does not exist; run `cptkit prepare` first")
        sources[GENERAL] = JsonlSourceConfig(type="jsonl", path=val)
    sources.update(ec.sets)
    return sources


def read_set(name: str, source: SourceConfig, max_documents: int | None) -> EvalSet:
    """The usable texts of a set, in source order, at most `max_documents` of them."""
    from cptkit.sources import ERROR, TEXT, open_source

    opened = open_source(source)
    texts: list[str] = []
    skipped = 0
    for batch in opened.batches():
        errors = batch.column(ERROR).to_pylist()
        for text, error in zip(batch.column(TEXT).to_pylist(), errors, strict=True):
            if error is not None or not text or not text.strip():
                skipped += 1
                continue
            texts.append(text)
            if max_documents is not None and len(texts) >= max_documents:
                break
        if max_documents is not None and len(texts) >= max_documents:
            break
    if not texts:
        raise StageError(f"evaluation set {name} ({opened.describe().get('path')}): no documents with text")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return EvalSet(name, texts, n_bytes, skipped, opened.describe())


def cap_tokens(eval_set: EvalSet, tokenizer: Any, max_tokens: int, min_share: int = 1) -> tuple[EvalSet, bool]:
    """The set cut to `max_tokens` tokens of `tokenizer`, shared evenly among its documents: each keeps its
    first `share` tokens, the largest share the cap allows (a shorter document keeps all of its text), so a
    set of a few long documents is not reduced to the first one. Where that share would be below
    `min_share` (a scoring window: many documents), the first documents keep up to `min_share` tokens each
    instead, until the cap. Cuts fall on token boundaries, so the bytes scored are exactly those of the
    kept text. Also: whether anything was cut."""
    encoded = tokenizer(eval_set.texts, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    lengths = [len(o) for o in offsets]
    if sum(lengths) <= max_tokens:
        return eval_set, False
    low, high = 0, max(lengths)  # the largest share whose total fits
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(n, mid) for n in lengths) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    share, extra = low, max_tokens - sum(min(n, low) for n in lengths)  # extra: one more for the first ones
    if share < min_share:
        share, extra = min_share, 0
    kept, left = [], max_tokens
    for text, spans, n in zip(eval_set.texts, offsets, lengths, strict=True):
        take = min(n, share + (1 if n > share and extra > 0 else 0), left)
        extra -= take > share
        left -= take
        if take == n:
            kept.append(text)
        elif take > 0:
            kept.append(text[: spans[take - 1][1]])
        if left == 0:
            break
    n_bytes = sum(len(t.encode("utf-8")) for t in kept)
    return replace(eval_set, texts=kept, bytes=n_bytes), True


def set_fingerprint(source: SourceConfig) -> str:
    from cptkit.sources import open_source

    return f"{section_fingerprint(source)}:{open_source(source).input_fingerprint()}"
