"""The local secret: how the client shows it is the server's owner where the server
cannot tell a caller's uid (``authz: local`` over TCP on a system without Linux's socket
tables, e.g. macOS). Jupyter's way, with nothing for the user to do.

Such a server keeps a secret for each port it listens on in ``local-PORT.json``
(``{"secret": ...}``, mode 0600) under ``$XDG_RUNTIME_DIR/psik_api``, else
``$XDG_DATA_HOME/psik_api/runtime`` (``~/.local/share/psik_api/runtime``), where only
the user can read it. :class:`LocalSecretAuth` sends it as the ``Psik-Local-Secret``
header, only to a loopback URL (``localhost``, ``127.0.0.0/8``, ``[::1]``) and never
over a UNIX socket (whose peer the kernel names); a ``localhost`` URL is connected to
the very address the server wrote its secret for. The server makes a new secret at each
start, and asks for it with 401 ``WWW-Authenticate: Psik-Local-Secret``: the client then
reads the file again and repeats the request once (the server refused it before doing
anything). A caller that sets the header itself is left alone.

The server's side is ``psik_api_server.auth.local``: the header name and the two
directories must match (a test checks they do).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Generator, Mapping
from pathlib import Path

import httpx

HEADER = "Psik-Local-Secret"


def secret_files(port: int, environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Where the secret of a local server on ``port`` may be, in the order looked at."""
    name = f"local-{port}.json"
    found: list[Path] = []
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        found.append(Path(runtime) / "psik_api" / name)
    data = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    found.append(Path(data).expanduser() / "psik_api" / "runtime" / name)
    return found


def read_secret(port: int, environ: Mapping[str, str] = os.environ, host: str | None = None) -> str | None:
    """The secret in the first readable file of :func:`secret_files`, or None. With
    ``host``, only a secret the server wrote for that very address: another user may
    listen on the same port of another loopback address (``[::1]`` beside
    ``127.0.0.1``), and must not be handed the secret."""
    for secret, served in _records(port, environ):
        if host is None or _same_host(served, host):
            return secret
    return None


def _records(port: int, environ: Mapping[str, str]) -> Generator[tuple[str, str], None, None]:
    """``(secret, host served)`` of each readable file of :func:`secret_files`."""
    for path in secret_files(port, environ):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            secret, served = doc.get("secret"), doc.get("host")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(secret, str) and secret and isinstance(served, str):
            yield secret, served


def _loopback_ip(host: str) -> str | None:
    """``host`` as a loopback IP address (without brackets), else None."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return str(address) if address.is_loopback else None


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.lower() == b.lower()


def loopback_port(url: httpx.URL) -> int | None:
    """The port of an ``http://`` URL naming this machine's loopback, else None."""
    if url.scheme != "http":
        return None
    host = url.host.lower()
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            return None
    return url.port or 80


class LocalSecretAuth(httpx.Auth):
    """Adds the local secret to requests for a loopback server (see the module doc).
    One instance serves the sync and the async client alike: it reads small files only."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ
        self._known: dict[tuple[str, int], str | None] = {}

    def _read(self, host: str, port: int) -> str | None:
        self._known[host, port] = read_secret(port, self._environ, host)
        return self._known[host, port]

    def _served(self, port: int) -> str | None:
        """The loopback address a server on ``port`` wrote its secret for, if any."""
        for _, served in _records(port, self._environ):
            address = _loopback_ip(served)
            if address is not None:
                return address
        return None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        port = loopback_port(request.url)
        if port is None or HEADER in request.headers:
            yield request
            return
        host = request.url.host
        if host.lower() == "localhost" and read_secret(port, self._environ, host) is None:
            served = self._served(port)
            if served is not None:
                # "localhost" may resolve to the other loopback address first, where another
                # user could listen: connect to the address the server wrote, Host unchanged.
                request.url = request.url.copy_with(host=served)
                host = served
        sent = self._known[host, port] if (host, port) in self._known else self._read(host, port)
        if sent is not None:
            request.headers[HEADER] = sent
        response = yield request
        if response.status_code != 401 or not response.headers.get("www-authenticate", "").startswith(HEADER):
            return
        fresh = self._read(host, port)
        if fresh is not None and fresh != sent:
            request.headers[HEADER] = fresh
            yield request
