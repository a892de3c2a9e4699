"""Each connection carries its socket: the work both seams (:mod:`.uvicorn_seam`,
:mod:`.hypercorn_seam`) do at accept for ``authz: local``.

The connection's :class:`~psik_api_server.auth.peer.Connection` is built at accept, the
peer's uid looked up there with the app's lookup (the later the lookup, the likelier the
client has closed its end: ``peer``'s module doc), and every request of the connection
carries it in ``scope["extensions"]`` (``peer.CONNECTION``).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Receive, Scope, Send

from ..auth.peer import CONNECTION, Connection

_peer_logger = logging.getLogger("psik_api_server.auth.peer")  # one of limits.PER_CONNECTION_LOGGERS


class WithConnection:
    """The app a hooked connection calls: adds the connection to each request's scope.
    Extra arguments go through (hypercorn's app wrapper takes two more)."""

    __slots__ = ("app", "connection")

    def __init__(self, app: Any, connection: Connection) -> None:
        self.app = app
        self.connection = connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send, *rest: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["extensions"] = {**(scope.get("extensions") or {}), CONNECTION: self.connection}
        await self.app(scope, receive, send, *rest)


def tag_connection(holder: Any, transport: Any) -> None:
    """Make the app of ``holder`` (a server's per-connection object, with ``.app``) a
    :class:`WithConnection` for ``transport``'s connection, and look the peer's uid up
    now, at accept (``transport``: anything answering ``get_extra_info``)."""
    app = getattr(holder, "app", None)
    if app is None:
        return  # not the server this was written for: its requests carry no connection
    try:
        connection = Connection.of_transport(transport)
    except Exception:
        _peer_logger.exception("cannot describe a new connection; its requests carry none")
        return
    holder.app = WithConnection(app, connection)
    try:
        if not transport.is_closing():  # else refused (limits): no request will come
            connection.look_up_at_accept(app)
    except Exception:  # the first request looks it up instead
        _peer_logger.exception("cannot look up the peer of a new connection at accept")
