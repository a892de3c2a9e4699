"""Who may call: ``authz: local``, the server that is the user's own (``authz: token``,
for other machines, is :mod:`.token`). Around the request-shape guard both modes share
(:mod:`.authenticator`), :class:`LocalAuthenticator` refuses, in this order:

1. a request that reached a socket listening on a public address (403; ``psik-api-server
   serve`` refuses to listen there at all, ``uvicorn --host 0.0.0.0`` is refused here)
   or that comes from another host (403);
2. a ``Host`` that is not a loopback name: ``localhost``, ``127.0.0.0/8`` or ``[::1]``,
   any port (403: DNS rebinding); then the guard reads the ``Origin``;
3. a caller that is another user (403). Over a UNIX socket the kernel says who it is
   (``SO_PEERCRED``); over loopback TCP, the owner of the client's socket (see
   :mod:`.peer`). Where that cannot be told (a system without those tables, e.g. macOS),
   the request must carry the local secret (401 otherwise; see :mod:`.local_secret`).

Every request it lets through acts for the user (:data:`LOCAL_PRINCIPAL`). Forwarded
headers (``X-Forwarded-For``, ``Forwarded``, ``X-Real-IP``) are never read: the peer is
the connection's own.

Which connections: the server's connections carry their socket (``serve``'s protocol
class, :mod:`psik_api_server.serving.uvicorn_seam`; the hooks ``main:app`` installs on uvicorn and
hypercorn: README, "What each launcher gets") and get every check. A request with
no socket behind it comes from an in-process ASGI transport (``httpx.ASGITransport``):
code already running in the server's own process, as its owner, so it gets no uid and no
Host check (its Host is a made-up name like ``testserver``); the other checks apply. A
request is taken as in-process only when it carries no connection *and* its
``scope["server"]`` is a host name without a port, which names no socket. Every other
request without its connection (another ASGI server) is checked as a real one: a host
name with a port is a socket too (a launcher reporting the name it bound); an IP address
with a port is looked up per request; no port (a UNIX socket: ``None``, or its path) or
an address of another shape (``()``, a one-element tuple) cannot be told and is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from starlette.types import Scope

from psik_api_core import LOCAL_USER, Principal, ProblemCode

from ..context import context
from ..errors import ApiError
from ..serving.hypercorn_seam import install_hypercorn_hook
from .authenticator import PRINCIPAL_KEY, register
from .local_secret import SECRET_HEADER
from .loopback import ip_of, is_loopback_authority, is_loopback_host
from .peer import Connection, connection_of
from .private_dir import user_name

__all__ = [
    "LOCAL_PRINCIPAL",
    "SECRET_HEADER",
    "Address",
    "LocalAuthenticator",
]

LOCAL_PRINCIPAL = Principal(user=LOCAL_USER)


#: An ASGI address: ``(host, port)``; the port is None for a UNIX socket.
Address = tuple[str, int | None]


def _address(scope: Scope, key: str) -> Address | None:
    """``scope[key]`` (``"server"`` or ``"client"``) as an :data:`Address`, None when the
    server reports none. Any other shape (``()``, a one-element tuple, a port that is
    not a number) is refused: a request must not be judged on an address half read."""
    value = scope.get(key)
    if value is None:
        return None
    if isinstance(value, tuple | list) and len(value) >= 2:
        host, port = value[0], value[1]
        if (
            isinstance(host, str)
            and host
            and (port is None or (isinstance(port, int) and not isinstance(port, bool)))
        ):
            return host, port
    raise ApiError(
        ProblemCode.forbidden,
        f"this server (authz: local) cannot tell who is calling: the ASGI server reports the "
        f"connection's {key} address as {str(value)[:80]!r}, which is not (host, port)",
    )


def _made_up(server: Address | None) -> bool:
    """Whether ``scope["server"]`` names no socket: a host name with no port, as an
    in-process transport makes up (httpx's ``("testserver", None)``). A real socket
    reports an IP address with its port, or a UNIX socket (no address, or its path): a
    host name *with* a port is a server reporting the name it was told to bind, a
    socket all the same."""
    if server is None or server[1] is not None:
        return False
    return ip_of(server[0]) is None and not server[0].startswith("/")


def _ends(scope: Scope) -> tuple[Connection | None, Any, Any]:
    """The request's connection, if it carries one, and its local and peer addresses."""
    conn = connection_of(scope)
    if conn is not None:
        return conn, conn.local, conn.peer
    return None, _address(scope, "server"), _address(scope, "client")


@register("local")
class LocalAuthenticator:
    """The checks of the module doc.

    The peer lookup and the local secrets are the app's (``context(app).peer_lookup``,
    ``context(app).local_secrets``; tests swap them). Building it hooks hypercorn's
    connections (idempotent; hypercorn has no protocol class to pass, and ``serve``
    never runs it), so that they carry their socket; uvicorn's get theirs from whoever
    runs the app (module doc)."""

    def __init__(self) -> None:
        install_hypercorn_hook()

    def admit(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Refuse a request from another host, to a public address, or for a ``Host``
        that is not a loopback name (steps 1 and 2)."""
        conn, local, peer = _ends(scope)
        if conn is None and _made_up(local):  # in-process: no socket, no Host to check
            error = self._peer_address(peer)
        else:
            error = self._socket(conn, local, peer) or self._host(headers.get("host"))
        if error is not None:
            raise error

    def identify(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Refuse a caller that is not the user (step 3); let the others act for the user."""
        conn, local, peer = _ends(scope)
        if not (conn is None and _made_up(local)):  # in-process: the server's own code
            error = self._caller(conn, local, peer, scope, headers)
            if error is not None:
                raise error
        scope.setdefault("state", {})[PRINCIPAL_KEY] = LOCAL_PRINCIPAL

    @staticmethod
    def _peer_address(client: Any) -> ApiError | None:
        if not (isinstance(client, tuple | list) and client) or is_loopback_host(str(client[0])):
            return None
        return ApiError(
            ProblemCode.forbidden,
            f"this server (authz: local) serves only this host; {client[0]} is not local",
        )

    def _socket(self, conn: Connection | None, local: Any, peer: Any) -> ApiError | None:
        """The socket's own ends: it must listen on loopback (or be a UNIX socket) and
        the peer must be on this host. Forwarded headers change neither."""
        if conn is not None and conn.is_unix:
            return None
        ip = ip_of(str(local[0])) if isinstance(local, tuple | list) and local else None
        if ip is not None and not ip.is_loopback:
            return ApiError(
                ProblemCode.forbidden,
                f"this server (authz: local) listens on {ip}, which is not loopback; "
                "it serves only 127.0.0.1, ::1 or a UNIX socket (run `psik-api-server serve`)",
            )
        return self._peer_address(peer)

    @staticmethod
    def _host(host: str | None) -> ApiError | None:
        if host is not None and is_loopback_authority(host):
            return None
        said = "no Host header" if host is None else f"Host {host!r}"
        return ApiError(
            ProblemCode.forbidden,
            f"{said} is not this machine's loopback name; this server (authz: local) answers "
            "only requests for localhost, 127.0.0.1 or [::1]",
        )

    def _caller(
        self, conn: Connection | None, local: Any, peer: Any, scope: Scope, headers: Mapping[str, str]
    ) -> ApiError | None:
        """The caller must be the server's own uid (or show the secret where no uid can
        be told over TCP)."""
        state = context(scope["app"])
        lookup = state.peer_lookup
        me = os.geteuid()
        if conn is not None:
            uid = conn.peer_uid(lookup)
            unix = conn.is_unix
        else:  # a server that does not tell us its connection: one lookup per request
            # No port: a UNIX socket (or a server that would not say): nobody to ask.
            unix = local is None or local[1] is None
            tcp = not unix and peer is not None and peer[1] is not None
            uid = lookup.tcp_uid(peer, local) if tcp else None
        if uid == me:
            return None
        if uid is not None:
            return ApiError(
                ProblemCode.forbidden,
                f"this server (authz: local) serves only its owner, {user_name(me)}; "
                f"the caller is {user_name(uid)}",
            )
        if unix or not (isinstance(local, tuple | list) and len(local) >= 2 and isinstance(local[1], int)):
            return ApiError(
                ProblemCode.forbidden,
                "this server (authz: local) cannot tell which user is calling over this socket; "
                "serve it with `psik-api-server serve --uds PATH`",
            )
        secrets_ = state.local_secrets
        port = int(local[1])
        given = headers.get(SECRET_HEADER.lower())
        try:
            if secrets_.check(port, None if given is None else given.encode("latin-1"), str(local[0])):
                return None
        except OSError as e:
            return ApiError(
                ProblemCode.forbidden,
                "this server (authz: local) cannot tell which user is calling here, and cannot write "
                f"the local secret to {secrets_.path(port)}: {e.strerror}",
            )
        return ApiError(
            ProblemCode.unauthorized,
            f"this server (authz: local) cannot tell which user is calling here; send the secret "
            f"in {secrets_.path(port)} as the {SECRET_HEADER} header (psik-api-client does this by itself)",
            headers={"WWW-Authenticate": f'{SECRET_HEADER} realm="psik-api"'},
        )
