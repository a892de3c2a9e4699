"""Who is calling: authentication for ``authz: local``.

In local mode the server is the user's own: it answers only connections from the
loopback interface or a UNIX socket, and every caller is ``local:psik_api``. The peer
address comes from the connection (``scope["client"]``) alone; ``X-Forwarded-For``,
``Forwarded`` and ``X-Real-IP`` are never read, so no header can make a remote caller
look local.
"""

from __future__ import annotations

import ipaddress

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from psik_api_core import LOCAL_USER, Principal, ProblemCode

from .errors import ApiError
from .problems import problem_response

LOCAL_PRINCIPAL = Principal(user=LOCAL_USER)


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and others."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_local_connection(scope: Scope) -> bool:
    """A UNIX-socket connection (uvicorn reports no client address) or a loopback one."""
    client = scope.get("client")
    if client is None:
        return True
    return is_loopback_host(str(client[0]))


class LocalOnly:
    """Pure ASGI middleware refusing every request that does not come from this host."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_local_connection(scope):
            client = scope.get("client")
            who = client[0] if client else "?"
            err = ApiError(
                ProblemCode.forbidden, f"this server (authz: local) serves only this host; {who} is not local"
            )
            await problem_response(err, scope.get("path"))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def principal(request: Request) -> Principal:
    """The caller. Local mode: everyone who got past :class:`LocalOnly` is the user."""
    return LOCAL_PRINCIPAL
