"""prepare's work on one document, the same in every engine: quarantine of malformed input, the record
steps, the dedup key and MinHash signature, and the tokens of a kept document.

`RecordProcessor` is built from plain data (the prepare config and a tokenizer file), so an engine can
build one per worker process or per cluster task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from cptkit.config import PrepareConfig
from cptkit.dedup import MinHasher, band_hashes, exact_key, lsh_bands
from cptkit.rules.steps import record_steps, run_steps

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_QUARANTINE_PREVIEW_CHARS = 1000

Status = Literal["keep", "drop", "quarantine"]


@dataclass
class DocResult:
    status: Status  # "keep": passed the record steps (corpus decisions may still drop it)
    reason: str | None  # why it was dropped or quarantined
    text: str | None  # the kept text, or the start of a quarantined one
    key: bytes | None = None  # exact-dedup key
    signature: np.ndarray | None = None  # uint32 MinHash signature for near dedup
    bands: np.ndarray | None = None  # its LSH band hashes, one uint64 per band
    tokens: np.ndarray | None = None
    counts: dict[str, dict[str, int]] | None = None  # step name -> what it counted (e.g. redactions)

    def drop(self, reason: str) -> None:
        self.status, self.reason = "drop", reason


def quarantine_reason(text: str | None, error: str | None, max_bytes: int) -> str | None:
    if error is not None:
        return error
    if text is None:
        return "null_text"
    if len(text) * 4 > max_bytes and len(text.encode("utf-8")) > max_bytes:
        return "oversize"
    return None


def load_tokenizer(path: str) -> Tokenizer:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids without special tokens: training adds the separator between documents itself."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(enc.ids, dtype=np.int32) for enc in encodings]


class RecordProcessor:
    def __init__(self, config: PrepareConfig, tokenizer_path: str | None) -> None:
        self.config = config
        self.steps = record_steps(config)
        dedup = config.dedup
        self.minhasher = MinHasher(dedup.num_perm, dedup.shingle_words) if dedup.near else None
        self.bands = lsh_bands(dedup.threshold, dedup.num_perm) if dedup.near else None
        self.tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None

    def process(self, texts: Sequence[str | None], errors: Sequence[str | None]) -> list[DocResult]:
        """One result per document, in order."""
        results: list[DocResult] = []
        for text, error in zip(texts, errors, strict=True):
            reason = quarantine_reason(text, error, self.config.max_document_bytes)
            if reason is not None:
                preview = text[:_QUARANTINE_PREVIEW_CHARS] if text is not None else None
                results.append(DocResult("quarantine", reason, preview))
                continue
            assert text is not None
            outcome = run_steps(self.steps, text)
            if outcome.text is None:
                results.append(DocResult("drop", outcome.reason, None, counts=outcome.counts))
                continue
            signature = self.minhasher.signature(outcome.text) if self.minhasher else None
            results.append(
                DocResult(
                    "keep",
                    None,
                    outcome.text,
                    # Every kept document gets a key: it also breaks ties in the dedup order.
                    key=exact_key(outcome.text),
                    signature=signature,
                    bands=band_hashes(signature, self.bands) if self.bands and signature is not None else None,
                    counts=outcome.counts,
                )
            )
        if self.tokenizer is not None:
            kept = [r for r in results if r.status == "keep"]
            for r, tokens in zip(kept, tokenize(self.tokenizer, [r.text or "" for r in kept]), strict=True):
                r.tokens = tokens
        return results
