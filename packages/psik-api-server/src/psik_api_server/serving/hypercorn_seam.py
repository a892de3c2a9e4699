"""hypercorn's connections carry their socket, as uvicorn's do (:mod:`.uvicorn_seam`).

``hypercorn psik_api_server.main:app`` reports a UNIX socket's requests with
``server=None, client=None`` and never hands the app its socket: without this hook
``authz: local`` could not tell who calls over a UNIX socket (refused), and over TCP it
would look the uid up again for every request. :func:`install_hypercorn_hook` wraps
the asyncio worker's ``TCPServer.__init__`` (it is built once per accepted connection,
with the connection's stream writer), so that its app adds the connection's
:class:`~psik_api_server.auth.peer.Connection` to every request's ``scope["extensions"]`` under the key
``peer`` reads, and the peer's uid is looked up at accept: the same work as uvicorn's
connections get (:func:`.peer_tag.tag_connection`). hypercorn offers no protocol
class to pass, so this patch is the only way in. The wrapper calls hypercorn's own
``__init__`` first and changes nothing it does. The trio worker is not hooked (psik is
asyncio-only): its requests carry no connection and get ``security``'s fallback (a
lookup per request over TCP, refusal over a UNIX socket).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from .peer_tag import tag_connection

_logger = logging.getLogger(__name__)

_MARK = "_psik_api_hook"


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


def is_wrapped(func: Any, mark: str) -> bool:
    """True if ``func`` or a function it wraps (``__wrapped__``) carries ``mark``."""
    seen = 0
    while func is not None and seen < 32:
        if getattr(func, mark, False):
            return True
        func = getattr(func, "__wrapped__", None)
        seen += 1
    return False


def _hooked(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        writer = getattr(self, "writer", None)
        if writer is None:
            return
        try:  # the work uvicorn's connections get (a StreamWriter answers get_extra_info)
            tag_connection(self, writer)
        except Exception:  # never break hypercorn's accept path
            _logger.exception("cannot follow a new connection")

    setattr(__init__, _MARK, True)
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    return __init__
