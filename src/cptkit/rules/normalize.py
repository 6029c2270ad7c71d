"""Text normalization: Unicode NFC, control characters, whitespace."""

from __future__ import annotations

import re
import unicodedata

from cptkit.config import NormalizeConfig

# C0/C1 controls except tab and newline, plus zero-width characters and the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
# Exotic spaces become a plain space; runs of spaces are kept because indentation is meaning in code.
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str, config: NormalizeConfig) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if config.unicode_nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if config.strip_control:
        text = _CONTROL.sub("", text)
    if config.collapse_whitespace:
        text = _ODD_SPACE.sub(" ", text)
        text = _TRAILING.sub("", text)
        text = _BLANK_RUNS.sub("\n\n", text)
        text = text.strip("\n")
    return text
