"""Redaction of personal data and credentials: emails, phone numbers, IP addresses, secrets.

Each match is replaced by a placeholder such as `<EMAIL>` so the model learns the shape of the text
without the value. Patterns favour precision on technical text: version numbers and dates are not
phone numbers, and a secret needs a recognisable prefix or an assignment to a secret-like name.
"""

from __future__ import annotations

import re

from cptkit.config import RedactConfig

_SECRETS = [
    re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z]+ )*PRIVATE KEY-----", re.DOTALL),
    re.compile(r"\bdapi[0-9a-f]{32}(?:-\d+)?\b"),  # Databricks personal access token
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),  # GitHub token
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack token
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b"),  # OpenAI / Anthropic style keys
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API key
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"),  # JWT
    re.compile(r"(?<=Bearer )[A-Za-z0-9._~+/-]{20,}=*"),
]
# `password = "hunter22"`, `api_key: abc...`: keep the name, replace the value.
_ASSIGNMENT = re.compile(
    r"(?i)\b((?:password|passwd|pwd|secret|client_secret|api[_-]?key|access[_-]?key|auth[_-]?token|"
    r"access[_-]?token|token)\s*[:=]\s*)(['\"]?)(?!<SECRET>)([^\s'\"]{8,})\2"
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Not after "version "/"v": dotted version numbers look like addresses.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?<![vV]ersion )(?:{_OCTET}\.){{3}}{_OCTET}(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
# International (+CC ...) or grouped national numbers: (555) 123-4567, 555-123-4567, +44 20 7946 0958.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,3}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w.-])"
)


def redact(text: str, config: RedactConfig) -> tuple[str, dict[str, int]]:
    """Return the redacted text and the number of replacements per kind."""
    counts: dict[str, int] = {}

    def sub(pattern: re.Pattern[str], repl: str, kind: str, value: str) -> str:
        new, n = pattern.subn(repl, value)
        if n:
            counts[kind] = counts.get(kind, 0) + n
        return new

    if config.secrets:
        for pattern in _SECRETS:
            text = sub(pattern, "<SECRET>", "secret", text)
        text = sub(_ASSIGNMENT, r"\1\2<SECRET>\2", "secret", text)
    if config.emails:
        text = sub(_EMAIL, "<EMAIL>", "email", text)
    if config.ip_addresses:
        text = sub(_IPV4, "<IP_ADDRESS>", "ip_address", text)
        text = sub(_IPV6, "<IP_ADDRESS>", "ip_address", text)
    if config.phone_numbers:
        text = sub(_PHONE, "<PHONE>", "phone_number", text)
    return text, counts
