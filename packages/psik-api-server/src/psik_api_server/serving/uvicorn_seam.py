"""The one seam into uvicorn: what the server does with each HTTP connection it accepts.

Two things, both at the protocol level because the ASGI app never sees a connection
before its first request, nor one that never sends a request:

* **Who is calling** (``authz: local``): each connection carries its socket, the peer's
  uid looked up at accept (:mod:`.peer_tag`).
* **Connection limits** (with a :class:`~psik_api_server.serving.limits.ConnectionLimits`):
  a request head has a deadline, a request body must keep coming, open connections are
  capped and the longest waiting (or most stalled) one makes room
  (:mod:`.limit_enforcer`).
* **A client that half-closes** after its request (``shutdown(SHUT_WR)``, as ``nc -N``
  does) gets its answer. uvicorn's ``eof_received`` returns None, and asyncio then
  closes the transport: the request already read was run (a job created) and its
  response lost. :meth:`ConnectionHooks.eof` keeps the connection half-open while a
  whole request is being answered, and has uvicorn close it once the response is
  written (``cycle.keep_alive = False``, as uvicorn's own shutdown does); with no
  request in progress, or only part of one, the EOF closes the connection at once, as
  before (nothing more can come). Not over TLS: asyncio's TLS transport closes on EOF
  whatever the protocol answers.

:class:`ConnectionHooks` joins that work (its limit enforcer holds the connections of
each event loop): the server builds one. It reaches uvicorn in one of two ways:

* **A protocol subclass** (:meth:`ConnectionHooks.protocol`): ``psik-api-server serve``
  passes it as ``uvicorn.Config(http=...)``; uvicorn's own classes are left untouched.
* **A run-time patch** (:func:`install`), only where someone else launches the app and
  picks uvicorn's protocol (``uvicorn psik_api_server.main:app``, ``certified serve``):
  the same hooks are called from wrappers of uvicorn's h11, httptools and zttp classes.
  The patch is process-wide, as those classes are; its hooks live on the patched class.
  A connection of a :meth:`~ConnectionHooks.protocol` class is left to its own hooks.

Tested with uvicorn 0.55 and its h11 protocol (httptools and zttp are hooked the same
way where installed; the package pins the tested uvicorn release): the hooks
read the protocol's ``transport``, ``app``, ``cycle`` (``body``, ``more_body``,
``response_started``, ``response_complete``, ``disconnected``, ``keep_alive``,
``waiting_for_100_continue``), ``flow.read_paused`` and ``client``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from typing import Any, ClassVar, cast

from .limit_enforcer import LimitEnforcer
from .limits import ConnectionLimits
from .peer_tag import tag_connection

_logger = logging.getLogger("psik_api_server.serving.limits")  # one of limits.PER_CONNECTION_LOGGERS

#: uvicorn's HTTP/1.1 protocol classes, by module: the ones :func:`install` patches.
UVICORN_PROTOCOLS = [
    ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
    ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
    ("uvicorn.protocols.http.zttp_impl", "ZttpProtocol"),
]
_HOOKED = ("connection_made", "data_received", "on_response_complete", "connection_lost", "eof_received")


class ConnectionHooks:
    """What one server does with each connection (see the module doc): tag it with its
    peer (``tag_peer``) and, given ``limits``, enforce them. Called by a
    :meth:`protocol` class or by :func:`install`'s wrappers, after uvicorn's own method;
    never lets an error of its own break uvicorn's connection handling."""

    def __init__(self, limits: ConnectionLimits | None = None, *, tag_peer: bool = True) -> None:
        self.limits = limits
        self.tag_peer = tag_peer
        self._enforcer = LimitEnforcer(limits) if limits is not None else None

    def protocol(self, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
        """A subclass of ``base`` (default: the one uvicorn's ``http="auto"`` picks, h11
        or httptools) whose connections these hooks follow: for ``uvicorn.Config(http=...)``."""
        if base is None:
            from uvicorn.protocols.http.auto import AutoHTTPProtocol

            base = AutoHTTPProtocol
        return type(f"Served{base.__name__}", (ServedProtocol, base), {"hooks": self})

    # --- the four moments of a connection ---------------------------------------------

    def made(self, proto: Any, transport: Any) -> None:
        if self._enforcer is not None:
            self._call(self._enforcer.accepted, proto, transport)
        if self.tag_peer:
            self._call(tag_connection, proto, transport)

    def received(self, proto: Any, before: Any, data: bytes) -> None:
        if self._enforcer is not None:
            self._call(self._enforcer.received, proto, before, data)

    def responded(self, proto: Any) -> None:
        if self._enforcer is not None:
            self._call(self._enforcer.responded, proto)

    def lost(self, proto: Any) -> None:
        if self._enforcer is not None:
            self._call(self._enforcer.forget, proto)

    def eof(self, proto: Any) -> bool:
        """The client sent its EOF (uvicorn's ``eof_received`` has run): whether to keep
        the connection half-open, for asyncio. Only while a request read whole awaits its
        answer, not yet begun; uvicorn then closes the connection once it is written."""
        try:
            cycle = getattr(proto, "cycle", None)
            transport = getattr(proto, "transport", None)
            if (
                cycle is None
                or transport is None
                or transport.is_closing()
                or transport.get_extra_info("sslcontext") is not None  # asyncio's TLS ends anyway
                or getattr(cycle, "more_body", True)  # the body will never be complete
                or getattr(cycle, "response_complete", True)  # answered: nothing to wait for
                # A response under way (a log follow streams for as long as the job runs):
                # the EOF is the client leaving, which the app must learn of (http.disconnect)
                # rather than stream on to nobody, holding the log open.
                or getattr(cycle, "response_started", True)
                or getattr(cycle, "disconnected", True)
                or not hasattr(cycle, "keep_alive")
            ):
                return False
            cycle.keep_alive = False
            return True
        except Exception:  # never break uvicorn's connection handling
            _logger.exception("cannot follow a connection")
            return False

    @staticmethod
    def _call(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # never break uvicorn's connection handling
            _logger.exception("cannot follow a connection")


class ServedProtocol(asyncio.Protocol):
    """The part of a :meth:`ConnectionHooks.protocol` class before uvicorn's: each of
    uvicorn's methods runs unchanged, then the class's ``hooks`` follow."""

    hooks: ClassVar[ConnectionHooks]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.hooks.made(self, transport)

    def data_received(self, data: bytes) -> None:
        before = getattr(self, "cycle", None)
        super().data_received(data)
        self.hooks.received(self, before, data)

    def on_response_complete(self) -> None:
        cast(Any, super()).on_response_complete()
        self.hooks.responded(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.hooks.lost(self)

    def eof_received(self) -> bool | None:
        keep_open = super().eof_received()
        return self.hooks.eof(self) or keep_open


# --- the patch path: uvicorn launched by someone else ------------------------------------

_PATCH = "_psik_api_hooks"


class _Patch:
    """What :func:`install` left on a uvicorn class: the hooks its wrappers call."""

    def __init__(self, hooks: ConnectionHooks) -> None:
        self.hooks = hooks


def install(hooks: ConnectionHooks | None = None) -> list[str]:
    """Have uvicorn's h11, httptools and zttp protocols (whichever are importable) call
    ``hooks`` on every connection they accept from now on; returns the classes patched.
    Idempotent: a class is wrapped once, a second call only swaps the hooks (``None``
    keeps the ones in place, or tags peers only where there are none)."""
    patched: list[str] = []
    for module_name, class_name in UVICORN_PROTOCOLS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # that protocol's library is not installed
        if not all(callable(getattr(cls, name, None)) for name in _HOOKED):
            continue  # not the uvicorn this was written for: leave it alone
        patch = cls.__dict__.get(_PATCH)
        if not isinstance(patch, _Patch):
            patch = _Patch(hooks or ConnectionHooks())
            for name in _HOOKED:
                setattr(cls, name, _wrap(getattr(cls, name), name, patch))
            setattr(cls, _PATCH, patch)
        elif hooks is not None:
            patch.hooks = hooks
        patched.append(f"{module_name}.{class_name}")
    return patched


def installed(cls: type) -> ConnectionHooks | None:
    """The hooks :func:`install` put on ``cls`` (None: not patched)."""
    patch = cls.__dict__.get(_PATCH)
    return patch.hooks if isinstance(patch, _Patch) else None


def _wrap(original: Callable[..., Any], name: str, patch: _Patch) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any) -> Any:
        if isinstance(self, ServedProtocol):  # a protocol class of our own: its hooks follow
            return original(self, *args)
        before = getattr(self, "cycle", None)
        result = original(self, *args)
        hooks = patch.hooks
        if name == "connection_made":
            hooks.made(self, args[0])
        elif name == "data_received":
            hooks.received(self, before, args[0])
        elif name == "on_response_complete":
            hooks.responded(self)
        elif name == "eof_received":
            return hooks.eof(self) or result
        else:
            hooks.lost(self)
        return result

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__name__ = getattr(original, "__name__", name)
    return wrapper
