"""The base of every config section, and the fingerprint of sections that decides whether a stage's
output is up to date."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


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
