"""hypercorn's connections carry their socket, as uvicorn's do (``peer``).

``hypercorn psik_api_server.main:app`` reports a UNIX socket's requests with
``server=None, client=None`` and never hands the app its socket: without this hook
``authz: local`` could not tell who calls over a UNIX socket (refused), and over TCP it
would look the uid up again for every request. :func:`install_hypercorn_hook` wraps
the asyncio worker's ``TCPServer.__init__`` (it is built once per accepted connection,
with the connection's stream writer), so that its app adds the connection's
:class:`~.peer.Connection` to every request's ``scope["extensions"]`` under the key
``peer`` reads. The wrapper calls hypercorn's own ``__init__`` first and changes nothing
it does. The trio worker is not hooked (psik is asyncio-only): its requests carry no
connection and get ``security``'s fallback (a lookup per request over TCP, refusal over
a UNIX socket).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from .limits import is_wrapped
from .peer import CONNECTION, Connection

_logger = logging.getLogger(__name__)

_MARK = "_psik_api_hook"


class _WithConnection:
    """hypercorn's app wrapper for one connection (``AppWrapper``: the ASGI call plus
    hypercorn's ``sync_spawn`` and ``call_soon``): adds the connection to each scope."""

    __slots__ = ("app", "connection")

    def __init__(self, app: Any, connection: Connection) -> None:
        self.app = app
        self.connection = connection

    async def __call__(self, scope: Any, receive: Any, send: Any, *rest: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["extensions"] = {**(scope.get("extensions") or {}), CONNECTION: self.connection}
        await self.app(scope, receive, send, *rest)


def install_hypercorn_hook() -> bool:
    """Hook hypercorn's asyncio connections (idempotent); False where hypercorn is not
    installed or does not look as expected (its requests then carry no connection)."""
    try:
        cls = importlib.import_module("hypercorn.asyncio.tcp_server").TCPServer
    except (ImportError, AttributeError):
        return False
    original = cls.__dict__.get("__init__")
    if original is None:
        return False
    if not is_wrapped(original, _MARK):
        cls.__init__ = _hooked(original)
    return True


def _hooked(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        writer, app = getattr(self, "writer", None), getattr(self, "app", None)
        if writer is None or app is None:
            return
        try:
            connection = Connection.of_transport(writer)  # a StreamWriter answers get_extra_info
        except Exception:  # never break hypercorn's accept path
            _logger.exception("cannot describe a new connection; its requests carry none")
            return
        self.app = _WithConnection(app, connection)
        try:  # now, while the client's end is surely open (peer's module doc)
            connection.look_up_at_accept(app)
        except Exception:  # the first request looks it up instead
            _logger.exception("cannot look up the peer of a new connection at accept")

    setattr(__init__, _MARK, True)
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    return __init__
