"""The edge to a Databricks workspace: authentication through the SDK's unified configuration, the one
place vendor errors become cptkit errors, bounded retries, and the secrets every message is scrubbed of.

Every other Databricks module calls the workspace through here, so that no credential reaches a log line,
an exception message or a manifest by another route.
"""

from __future__ import annotations

import configparser
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cptkit import network
from cptkit.config import DatabricksConnection, DatabricksSourceConfig
from cptkit.errors import CptkitError, SourceError
from cptkit.secrets import Secrets, env_secrets, mask_url

T = TypeVar("T")

# Seconds slept between retries; tests replace it to run fast.
SLEEP: Callable[[float], None] = time.sleep


# The SDK's retry budget where the connection is not a source's (a Databricks Connect session).
DEFAULT_TIMEOUT_SECONDS = 600.0


def config_secrets(config: DatabricksConnection) -> Secrets:
    """What the adapter masks: the credential environment variables and the connection's own secrets."""
    values = list(env_secrets())
    values += [s.get_secret_value() for s in (config.token, config.client_secret) if s is not None]
    if isinstance(config, DatabricksSourceConfig):
        values += [v.get_secret_value() for v in config.storage_options.values()]
    return Secrets(values)


# ---------------------------------------------------------------------------------------------------
# Authentication.


def sdk_config(config: DatabricksConnection, secrets: Secrets, compute: dict[str, Any] | None = None) -> Any:
    """The SDK's unified configuration for this connection: explicit keys win, then DATABRICKS_* variables,
    then ~/.databrickscfg (a profile). PAT, OAuth M2M and profiles all resolve here, nowhere else.
    `compute` (cluster_id or serverless_compute_id, for a Databricks Connect session) replaces the SQL
    warehouse.

    The host is checked first: the SDK probes it while building its configuration and retries a refused
    connection or an unknown name for as long as its retry budget allows (up to 2 minutes)."""
    from databricks.sdk.core import Config

    timeout = config.timeout_seconds if isinstance(config, DatabricksSourceConfig) else DEFAULT_TIMEOUT_SECONDS
    host = configured_host(config)
    if host is not None:
        started = time.monotonic()
        reason = network.unreachable(host, min(network.CONNECT_TIMEOUT_SECONDS, timeout))
        if reason is not None:
            raise SourceError(
                f"cannot reach the Databricks host {mask_url(host)} ({reason}); check DATABRICKS_HOST "
                f"(failed after {time.monotonic() - started:.1f}s; a refused connection or unknown host is not retried)"
            )
    kwargs: dict[str, Any] = {
        "host": config.host,
        "token": config.token.get_secret_value() if config.token is not None else None,
        "profile": config.profile,
        "client_id": config.client_id,
        "client_secret": config.client_secret.get_secret_value() if config.client_secret is not None else None,
        **(compute if compute is not None else {"warehouse_id": config.warehouse_id}),
        # The SDK retries network failures within this budget (also its host-metadata probe at start-up).
        "retry_timeout_seconds": max(1, int(min(timeout, 120))),
        "http_timeout_seconds": min(60.0, timeout),
        "product": "cptkit",
    }
    try:
        return Config(**{k: v for k, v in kwargs.items() if v is not None})
    except Exception as exc:  # the SDK raises ValueError for every resolution problem
        first = _first_line(exc, secrets)
        raise SourceError(
            f"Databricks authentication is not configured ({first}); set DATABRICKS_HOST and DATABRICKS_TOKEN, "
            "or DATABRICKS_CLIENT_ID/DATABRICKS_CLIENT_SECRET, or DATABRICKS_CONFIG_PROFILE"
        ) from None


def configured_host(config: DatabricksConnection) -> str | None:
    """The workspace URL the SDK will use: the connection's host (DATABRICKS_HOST fills it), else the host of
    its profile in ~/.databrickscfg (DATABRICKS_CONFIG_FILE), else None (the SDK's other ways to find one)."""
    if config.host:
        return config.host
    if os.environ.get("DATABRICKS_HOST"):
        return os.environ["DATABRICKS_HOST"]
    profile = config.profile or os.environ.get("DATABRICKS_CONFIG_PROFILE") or "DEFAULT"
    path = Path(os.environ.get("DATABRICKS_CONFIG_FILE") or "~/.databrickscfg").expanduser()
    # As the SDK reads the file: [DEFAULT] is a profile like any other, not defaults for the rest.
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None  # the SDK reports a broken file in its own words
    return parser.get(profile, "host", fallback=None) or None


def workspace_client(config: DatabricksSourceConfig, secrets: Secrets) -> Any:
    from databricks.sdk import WorkspaceClient

    return WorkspaceClient(config=sdk_config(config, secrets))


def warehouse_http_path(config: DatabricksSourceConfig, sdk_cfg: Any) -> str:
    if config.http_path:
        return config.http_path
    warehouse = config.warehouse_id or getattr(sdk_cfg, "warehouse_id", None)
    if warehouse:
        return f"/sql/1.0/warehouses/{warehouse}"
    raise SourceError("method sql needs a SQL warehouse: set DATABRICKS_HTTP_PATH or DATABRICKS_WAREHOUSE_ID")


def warehouse_id(config: DatabricksSourceConfig, sdk_cfg: Any) -> str:
    warehouse = config.warehouse_id or getattr(sdk_cfg, "warehouse_id", None)
    if not warehouse and config.http_path:
        match = re.search(r"/warehouses/([A-Za-z0-9]+)", config.http_path)
        warehouse = match.group(1) if match else None
    if not warehouse:
        raise SourceError(
            "method statement needs a SQL warehouse id: set DATABRICKS_WAREHOUSE_ID (or a /sql/1.0/warehouses/ "
            "http_path)"
        )
    return str(warehouse)


# ---------------------------------------------------------------------------------------------------
# Errors: translated once, here.

_NOT_FOUND = re.compile(
    r"TABLE_OR_VIEW_NOT_FOUND|SCHEMA_NOT_FOUND|CATALOG_NOT_FOUND|NOT_FOUND|does not exist|cannot be found|"
    r"not found",
    re.IGNORECASE,
)
_NO_COLUMN = re.compile(r"UNRESOLVED_COLUMN|column .*(?:not found|does not exist|cannot be resolved)", re.IGNORECASE)
_STOPPED = re.compile(r"warehouse.*(?:stopped|stopping|not running|is starting|not ready)", re.IGNORECASE)
_TRANSIENT = re.compile(
    r"TEMPORARILY_UNAVAILABLE|temporarily unavailable|\btimed out\b|\btimeout\b|connection reset|"
    r"\b503\b|\b429\b|try again later|is starting",
    re.IGNORECASE,
)


def _first_line(exc: BaseException, secrets: Secrets) -> str:
    text = str(exc).strip() or type(exc).__name__
    # The SDK appends its whole resolved config (". Config: host=..., token=***"): noise in one line.
    text = text.splitlines()[0].split(". Config: ")[0]
    return secrets.scrub(text)[:300]


def translate(exc: BaseException, what: str, secrets: Secrets) -> CptkitError:
    """One clear line for a vendor error (SDK, SQL connector, deltalake, requests, DB-API), scrubbed."""
    if isinstance(exc, CptkitError):
        return exc
    from databricks.sdk import errors as sdk_errors

    line = _first_line(exc, secrets)
    if isinstance(exc, sdk_errors.Unauthenticated) or _status(exc) == 401:
        return SourceError(f"{what}: not authenticated (HTTP 401): the token is missing, wrong or expired ({line})")
    if isinstance(exc, sdk_errors.PermissionDenied) or _status(exc) == 403:
        return SourceError(f"{what}: permission denied (HTTP 403): {line}")
    if _NO_COLUMN.search(line):
        return SourceError(f"{what}: a configured column does not exist ({line})")
    if isinstance(exc, sdk_errors.NotFound) or _status(exc) == 404 or _NOT_FOUND.search(line):
        return SourceError(f"{what}: not found ({line})")
    if _STOPPED.search(line):
        return SourceError(f"{what}: the SQL warehouse is not running ({line}); start it or raise timeout_seconds")
    if _is_connection_error(exc) or _is_refused_or_unknown_host(exc):
        reason = _innermost_os_error(exc, secrets) or line
        return SourceError(f"{what}: cannot reach the Databricks host ({reason}); check DATABRICKS_HOST")
    if isinstance(exc, TimeoutError):
        return SourceError(f"{what}: timed out ({line})")
    return SourceError(f"{what}: {type(exc).__name__}: {line}")


def _status(exc: BaseException) -> int | None:
    for attr in ("status_code", "http_status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    context = getattr(exc, "context", None)  # databricks-sql-connector RequestError
    if isinstance(context, dict) and isinstance(context.get("http-code"), int):
        return int(context["http-code"])
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _is_connection_error(exc: BaseException) -> bool:
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.ConnectionError | ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and all(cause is not s for s in seen):
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return seen


def _innermost_os_error(exc: BaseException, secrets: Secrets) -> str | None:
    """The first line of the innermost OS error behind a vendor error (a refused connection, an unknown
    host), which says more than the vendor's wrapping (`Timed out after 0:02:00`)."""
    errors = [e for e in _chain(exc) if isinstance(e, OSError) and str(e).strip()]
    return _first_line(errors[-1], secrets) if errors else None


# How connectors that do not chain the OS error (databricks-sql-connector's RequestError) word them.
_REFUSED_OR_UNKNOWN = re.compile(
    r"connection refused|name or service not known|nodename nor servname|failed to resolve|getaddrinfo failed|"
    r"temporary failure in name resolution|no route to host|network is unreachable",
    re.IGNORECASE,
)


def _is_refused_or_unknown_host(exc: BaseException) -> bool:
    """Nothing listens at the address, or its name does not resolve: no retry fixes that soon."""
    return any(
        isinstance(e, socket.gaierror)
        or (isinstance(e, OSError) and e.errno in network.PERMANENT_ERRNOS)
        or bool(_REFUSED_OR_UNKNOWN.search(str(e)))
        for e in _chain(exc)
    )


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a network time-out or reset, throttling (HTTP 429), a server error (HTTP 503), a
    warehouse still starting. Not a refused connection or an unknown host name."""
    if isinstance(exc, CptkitError):
        return False
    if _status(exc) in (401, 403, 404) or _is_refused_or_unknown_host(exc):
        return False
    if _status(exc) in (429, 503) or _is_connection_error(exc) or isinstance(exc, TimeoutError):
        return True
    return bool(_TRANSIENT.search(str(exc).split(". Config: ")[0]))


@dataclass
class Retrying:
    """Bounded retries with exponential backoff (1, 2, 4, ... seconds, capped at 30) within a deadline.
    Keeps count of attempts and seconds waited so the manifest and any final error can say so."""

    max_retries: int
    timeout_seconds: float
    secrets: Secrets
    base_delay: float = 1.0
    retries: int = 0
    waited: float = 0.0
    log: list[str] = field(default_factory=list)
    # The failures since the last success: when the first began (SDK set-up included: its host-metadata
    # probe can take long and fail quietly), attempts made and seconds slept. A final error reports the
    # wall time from there, and the deadline counts from there.
    _since: float | None = field(default=None, init=False, repr=False)
    _attempts: int = field(default=0, init=False, repr=False)
    _slept: float = field(default=0.0, init=False, repr=False)

    def start_clock(self) -> None:
        """Count the time from now in the next call: SDK set-up that precedes it."""
        if self._since is None:
            self._since = time.monotonic()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        self.start_clock()
        assert self._since is not None
        attempt = 0
        while True:
            self._attempts += 1
            try:
                result = fn()
            except Exception as exc:
                elapsed = time.monotonic() - self._since
                delay = min(30.0, self.base_delay * 2**attempt)
                transient = is_transient(exc)
                if not transient or attempt >= self.max_retries or elapsed + delay > self.timeout_seconds:
                    error = translate(exc, what, self.secrets)
                    if transient or _is_connection_error(exc) or _is_refused_or_unknown_host(exc):
                        error = SourceError(
                            f"{error} (gave up after {self._attempts} attempt(s) over {elapsed:.1f}s, "
                            f"{self._slept:.1f}s of it waiting between retries)"
                        )
                    raise error from None
                attempt += 1
                self.retries += 1
                self.waited += delay
                self._slept += delay
                self.log.append(f"{what}: {_first_line(exc, self.secrets)}; retry {attempt} in {delay:.1f}s")
                SLEEP(delay)
            else:
                self._since, self._attempts, self._slept = None, 0, 0.0
                return result

    def summary(self) -> dict[str, Any]:
        return {"retries": self.retries, "waited_seconds": round(self.waited, 3)}
