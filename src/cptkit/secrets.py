"""Secrets: which keys hold credentials, and masking them in everything cptkit writes or prints.

The one vocabulary of the project. Config error messages, `config show`, manifests, MLflow params and
tags, console lines, log records and exception messages all mask through here. A credential is masked
wherever it turns up: under a secret key, as a pydantic `SecretStr`, as a known value (the config's
secrets, credential environment variables, short-lived credentials issued during a read), as the
user:password@ part of a URL, as a bearer token, or as the signature of a signed URL.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from pydantic import SecretStr

MASK = "***"
# Shorter values are not masked as text: masking "1" would mangle every number.
MIN_SECRET_LENGTH = 6
# Environment variables whose values are credentials wherever they turn up (the Databricks SDK, MLflow,
# the Hugging Face hub and cloud SDKs read them).
SECRET_ENV_VARS = (
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
    "DATABRICKS_PASSWORD",
    "ARM_CLIENT_SECRET",
    "GOOGLE_CREDENTIALS",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)

# Whole words of a key that mark its value secret. Words, not substrings: `tokenizer`, `tokenize` and a
# `tokens` count are not secrets. "token" only as a name's last word (`access_token`, `DATABRICKS_TOKEN`):
# before another word it names a count or a setting of tokens (`tune.token_levels`).
_SECRET_WORDS = frozenset({"secret", "password", "passwd", "credential", "credentials", "apikey"})
_SECRET_LAST_WORDS = frozenset({"token"})
# Consecutive words that do (aws_access_key_id, openai_api_key, storage_options).
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("storage", "options")})
_KEY_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")

# The userinfo of a URL: everything between `scheme://` and the last `@` before the path, so a password
# with a raw `@` is masked whole. Or `user:password@` whose password holds a raw `/` (AWS secret keys
# do), told apart from `host:port/path@x` by the port being digits. One slash is enough: a URL in a
# config key typed as a path comes out as `s3:/key:secret@bucket`.
_URL_USERINFO = re.compile(
    r"(?i)\b([a-z][a-z0-9+.\-]+:/{1,2})"
    r"(?:[^\s/?#'\"<>]*@|[^\s/?#:@'\"<>]*:(?!\d*(?:[/?#\s'\"<>]|$))[^\s?#'\"<>]*?@)"
)
_CONTAINER_SCHEMES = frozenset({"abfs", "abfss", "wasb", "wasbs"})
# Credentials the process never saw as values: bearer tokens and the signatures of signed URLs.
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_SIGNED_URL_PARAM = re.compile(
    r"(?i)([?&](?:sig|signature|x-amz-signature|x-amz-security-token|x-goog-signature|token)=)[^&\s\"'<>]+"
)

# Values this process knows to be secret (the config's, short-lived credentials): log records and
# console lines are masked of them too, whoever prints them.
_remembered: set[str] = set()


def is_secret_key(key: str) -> bool:
    """Whether a key, or any part of a dotted key path, names a credential: `databricks.token`,
    `accessToken`, `aws_access_key_id` and `source.storage_options.x` do; `model.tokenizer` does not."""
    for name in key.split("."):
        words = [w.lower() for w in _KEY_WORD_SPLIT.split(name) if w]
        if any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_PAIRS for p in itertools.pairwise(words)):
            return True
        if words and words[-1] in _SECRET_LAST_WORDS:
            return True
    return False


def mask_url(text: str) -> str:
    """`text` with the user:password@ part of every URL in it replaced by `***@`; scheme, host and path
    stay, so the value is still recognisable. Azure storage's `abfss://container@account...` keeps its
    container name, which is no credential."""

    def masked(match: re.Match[str]) -> str:
        scheme, userinfo = match.group(1), match.group(0)[len(match.group(1)) : -1]
        if scheme.lower().rstrip(":/") in _CONTAINER_SCHEMES and ":" not in userinfo:
            return match.group(0)
        # With one slash only `user:secret@` is a credential: MLflow's `models:/name@alias` names an alias.
        if not scheme.endswith("//") and ":" not in userinfo:
            return match.group(0)
        return f"{scheme}{MASK}@"

    return _URL_USERINFO.sub(masked, text)


def env_secrets(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The credential values set in the environment (long enough to mask as text)."""
    env = os.environ if env is None else env
    return tuple(v for var in SECRET_ENV_VARS if len(v := env.get(var, "").strip()) >= MIN_SECRET_LENGTH)


def remember(*values: str | None) -> None:
    """Mask these values in every log record, console line and scrubbed text of this process from now on."""
    _remembered.update(v for v in values if v and len(v) >= MIN_SECRET_LENGTH)


def scrub(text: str, values: Iterable[str] = ()) -> str:
    """`text` with every secret masked: the given values, the remembered ones, the credential environment
    variables' values, URL userinfo, bearer tokens and signed-URL signatures."""
    known = {v for v in values if len(v) >= MIN_SECRET_LENGTH} | _remembered | set(env_secrets())
    for value in sorted(known, key=len, reverse=True):  # a longer secret may contain a shorter one
        if value in text:
            text = text.replace(value, MASK)
    text = _BEARER.sub(rf"\1{MASK}", text)
    text = _SIGNED_URL_PARAM.sub(rf"\1{MASK}", text)
    return mask_url(text)


class Secrets:
    """The credential values one adapter masks in its messages; grows as short-lived credentials
    (temporary table credentials, presigned URLs) are issued during a read. Values added here are
    remembered process-wide too, so a vendor's log line cannot print them either."""

    def __init__(self, values: Iterable[str | None] = ()) -> None:
        self._values: set[str] = set()
        self.add(*values)

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= MIN_SECRET_LENGTH:
                self._values.add(value)
        remember(*values)

    def scrub(self, text: str) -> str:
        return scrub(text, self._values)


def mask_value(value: Any, secrets: Secrets | None = None) -> Any:
    """A copy of plain data (a config dump) with pydantic secrets masked and every string scrubbed.
    Keys keep their type; a secret that is not set stays None, so a dump still shows it unset."""
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, Mapping):
        return {k: mask_value(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v, secrets) for v in value]
    if isinstance(value, str | Path):
        return secrets.scrub(str(value)) if secrets is not None else scrub(str(value))
    return value


def mask_data(value: Any, secrets: Secrets | None = None) -> Any:
    """Like `mask_value`, for data whose secrets are not typed (params, tags, manifests, metadata): every
    value under a secret key is masked too, and keys become strings."""
    if isinstance(value, Mapping):
        return {str(k): MASK if is_secret_key(str(k)) else mask_data(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_data(v, secrets) for v in value]
    return mask_value(value, secrets)


# ---------------------------------------------------------------------------------------------------
# What other code prints: log records, warnings, the console streams.


class SecretFilter(logging.Filter):
    """Masks secrets in a log record: its message (args merged in), traceback and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose args do not fit its format: logging reports that itself
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


_scrubbing = False


def scrub_logs() -> None:
    """Mask secrets in every log record and warning of this process from now on.

    The filter runs where records are made (the log record factory), not on some handlers: vendor
    libraries add handlers of their own (mlflow does, when imported), stop propagation, or have none
    (Python then prints through `logging.lastResort`), and a filter on a logger misses its children's
    records. So no handler can print an unmasked record, whichever library made it."""
    global _scrubbing
    if _scrubbing:
        return
    _scrubbing = True
    make_record = logging.getLogRecordFactory()
    secret_filter = SecretFilter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        secret_filter.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    format_warning = warnings.formatwarning

    def formatwarning(*args: Any, **kwargs: Any) -> str:  # used by the default showwarning and by logging
        return scrub(format_warning(*args, **kwargs))

    warnings.formatwarning = formatwarning


class ScrubbedStream:
    """A text stream that writes to the current sys.stdout or sys.stderr (looked up at each write, so
    a redirection made later still applies) with secrets masked."""

    def __init__(self, name: str) -> None:
        if name not in ("stdout", "stderr"):
            raise ValueError(f"no standard stream {name!r}")
        self._name = name

    def _stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self._name)
        return stream

    def write(self, text: str) -> int:
        return self._stream().write(scrub(text))

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding: the stream's own
        return getattr(self._stream(), name)
