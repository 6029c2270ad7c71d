"""A quick check that a service's host can be reached, before a vendor client that retries for minutes.

The Databricks SDK and MLflow retry a refused connection and an unknown host name for 2 minutes or more,
as if they were passing glitches. They are not: nothing listens at that address, or the name is wrong.
This check says so in a second. Time-outs stay with the vendors' retries, which are meant for them.
"""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlsplit

# Long enough for a slow network to connect, short enough that a failure is reported quickly; a
# connection that takes longer is left to the vendor client and its own timeouts and retries.
CONNECT_TIMEOUT_SECONDS = 5.0
# Errors that no retry fixes soon: nothing listens there, or there is no way to that address.
PERMANENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})


def unreachable(url: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> str | None:
    """Why `url`'s host cannot be reached (its name does not resolve, or the connection is refused), or
    None when a connection was made or the check cannot tell: a time-out, or a proxy in between (the
    vendor client connects through it, and so does not reach the host directly)."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    host = parts.hostname
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        return f"the port of {parts.scheme}://{host} is not a number"
    if not host or _proxied(url):
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return f"unknown host name {host}: {exc.strerror or exc}"
    except TimeoutError:
        return None
    except OSError as exc:
        if exc.errno in PERMANENT_ERRNOS:
            return f"{exc.strerror or exc} at {host}:{port}"
        return None


def _proxied(url: str) -> bool:
    """Whether requests would send this URL through a proxy (HTTPS_PROXY and the like, minus NO_PROXY)."""
    from requests.utils import get_environ_proxies

    return bool(get_environ_proxies(url))
