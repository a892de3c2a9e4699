"""The one seam into uvicorn: what the server does with each HTTP connection it accepts.

Two things, both at the protocol level because the ASGI app never sees a connection
before its first request, nor one that never sends a request:

* **Who is calling** (``authz: local``): each connection's :class:`~psik_api_server.auth.peer.Connection` is
  built at accept, the peer's uid looked up there with the app's lookup (the later the
  lookup, the likelier the client has closed its end: ``peer``'s module doc), and every
  request of the connection carries it in ``scope["extensions"]`` (``peer.CONNECTION``).
* **Connection limits** (with a :class:`~psik_api_server.serving.limits.ConnectionLimits`): a request head has
  a deadline, a request body must keep coming, open connections are capped and the
  longest waiting (or most stalled) one makes room (``limits``' module doc).
* **A client that half-closes** after its request (``shutdown(SHUT_WR)``, as ``nc -N``
  does) gets its answer. uvicorn's ``eof_received`` returns None, and asyncio then
  closes the transport: the request already read was run (a job created) and its
  response lost. :meth:`ConnectionHooks.eof` keeps the connection half-open while a
  whole request is being answered, and has uvicorn close it once the response is
  written (``cycle.keep_alive = False``, as uvicorn's own shutdown does); with no
  request in progress, or only part of one, the EOF closes the connection at once, as
  before (nothing more can come). Not over TLS: asyncio's TLS transport closes on EOF
  whatever the protocol answers.

:class:`ConnectionHooks` holds that work and its state (the limits, the connections of
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
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, cast

from starlette.types import Receive, Scope, Send

from ..auth.peer import CONNECTION, Connection
from .limits import STALL_GRACE, ConnectionLimits, flush_repeats, repeat_filter

_logger = logging.getLogger("psik_api_server.serving.limits")  # one of limits.PER_CONNECTION_LOGGERS
_peer_logger = logging.getLogger("psik_api_server.auth.peer")

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nRequest Timeout\n"
)

#: uvicorn's HTTP/1.1 protocol classes, by module: the ones :func:`install` patches.
UVICORN_PROTOCOLS = [
    ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
    ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
    ("uvicorn.protocols.http.zttp_impl", "ZttpProtocol"),
]
_HOOKED = ("connection_made", "data_received", "on_response_complete", "connection_lost", "eof_received")


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


class _Body:
    """A request body in progress: what came, and the time charged to the client."""

    __slots__ = ("checked", "cycle", "idle", "owed", "received")

    def __init__(self, cycle: Any, received: int, now: float) -> None:
        self.cycle = cycle
        self.received = received  # bytes since the head
        self.owed = 0.0  # seconds the app waited for the client's bytes
        self.idle = 0.0  # of which since the last byte
        self.checked = now  # loop time ``owed`` and ``idle`` are counted up to


class _Guard:
    """One connection's state: waiting for a request head or not, its timer, the body
    of its request while one is coming."""

    __slots__ = ("body", "cycle", "partial", "timer", "waiting")

    def __init__(self, cycle: Any) -> None:
        self.cycle = cycle
        self.waiting = True
        self.partial = False
        self.timer: asyncio.TimerHandle | None = None
        self.body: _Body | None = None


class _Connections:
    """The guarded connections of one event loop, by protocol: ``waiting`` in the order
    they started to wait (the first is the one to close at the cap); ``bodies``, those
    whose request body is coming (checked every ``tick`` seconds while there are any)."""

    def __init__(self) -> None:
        self.guards: dict[Any, _Guard] = {}
        self.waiting: dict[Any, None] = {}
        self.bodies: dict[Any, None] = {}
        self.ticking = False


class ConnectionHooks:
    """What one server does with each connection (see the module doc): tag it with its
    peer (``tag_peer``) and, given ``limits``, enforce them. Called by a
    :meth:`protocol` class or by :func:`install`'s wrappers, after uvicorn's own method;
    never lets an error of its own break uvicorn's connection handling."""

    def __init__(self, limits: ConnectionLimits | None = None, *, tag_peer: bool = True) -> None:
        self.limits = limits
        self.tag_peer = tag_peer
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Connections] = (
            weakref.WeakKeyDictionary()
        )

    def protocol(self, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
        """A subclass of ``base`` (default: the one uvicorn's ``http="auto"`` picks, h11
        or httptools) whose connections these hooks follow: for ``uvicorn.Config(http=...)``."""
        if base is None:
            from uvicorn.protocols.http.auto import AutoHTTPProtocol

            base = AutoHTTPProtocol
        return type(f"Served{base.__name__}", (ServedProtocol, base), {"hooks": self})

    # --- the four moments of a connection ---------------------------------------------

    def made(self, proto: Any, transport: Any) -> None:
        self._call(self._guard_new, proto, transport)
        if self.tag_peer:
            self._call(tag_connection, proto, transport)

    def received(self, proto: Any, before: Any, data: bytes) -> None:
        self._call(self._received, proto, before, data)

    def responded(self, proto: Any) -> None:
        self._call(self._responded, proto)

    def lost(self, proto: Any) -> None:
        self._call(self._forget, proto)

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

    # --- the limits -------------------------------------------------------------------

    def _conns(self) -> _Connections | None:
        return self._loops.get(asyncio.get_running_loop())

    def _guard_new(self, proto: Any, transport: Any) -> None:
        limits = self.limits
        if limits is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        conns = self._loops.get(loop)
        if conns is None:
            conns = self._loops[loop] = _Connections()
            shared = repeat_filter()
            if shared is not None:  # say what was counted while connections come
                loop.call_later(shared.window, _flush_every, loop, shared.window)
        guard = conns.guards[proto] = _Guard(getattr(proto, "cycle", None))
        if len(conns.guards) > limits.max_connections:
            victim = next(iter(conns.waiting), None)
            if victim is not None:
                _logger.warning(
                    "at the connection limit (%d): closed the connection that waited longest for a "
                    "request (%s)",
                    limits.max_connections,
                    _peer(victim),
                )
                self._forget(victim)
                victim.transport.close()
            elif (victim := self._most_stalled_body(conns, limits, loop.time())) is not None:
                _logger.warning(
                    "at the connection limit (%d): closed the connection whose request body was stalled "
                    "longest (%s)",
                    limits.max_connections,
                    _peer(victim),
                )
                self._close_with_408(victim)
            else:
                _logger.warning(
                    "at the connection limit (%d) and every connection has a request in progress: "
                    "closed a new connection from %s",
                    limits.max_connections,
                    _peer(proto),
                )
                self._forget(proto)
                transport.close()
                return
        guard.waiting = True
        conns.waiting[proto] = None
        guard.timer = loop.call_later(limits.header_timeout, self._expire, proto)

    def _received(self, proto: Any, _before: Any, data: bytes) -> None:
        limits, conns = self.limits, self._conns()
        guard = conns.guards.get(proto) if conns is not None else None
        if guard is None or conns is None or limits is None:
            return
        transport = getattr(proto, "transport", None)
        if transport is not None and transport.get_protocol() is not proto:
            self._forget(proto)  # upgraded (websocket): no longer ours to follow
            return
        cycle = getattr(proto, "cycle", None)
        if cycle is not guard.cycle:
            guard.cycle = cycle  # a request head is complete
            self._stop_waiting(proto, guard, conns)
            _end_body(proto, guard, conns)
            if cycle is not None and _body_coming(cycle):
                loop = asyncio.get_running_loop()
                guard.body = _Body(cycle, len(getattr(cycle, "body", b"")), loop.time())
                conns.bodies[proto] = None
                if not conns.ticking:
                    conns.ticking = True
                    loop.call_later(_tick(limits), self._check_bodies, loop, conns)
        elif guard.body is not None:
            guard.body.received += len(data)
            guard.body.idle = 0.0
        elif guard.waiting:
            guard.partial = True
            if guard.timer is None:  # the first byte after a keep-alive pause
                guard.timer = asyncio.get_running_loop().call_later(
                    limits.header_timeout, self._expire, proto
                )

    def _responded(self, proto: Any) -> None:
        conns = self._conns()
        guard = conns.guards.get(proto) if conns is not None else None
        if guard is None or conns is None or proto.transport.is_closing():
            return
        cycle = getattr(proto, "cycle", None)
        guard.cycle = cycle
        _end_body(proto, guard, conns)
        if cycle is not None and not getattr(cycle, "response_complete", True):
            return  # a pipelined request is in progress
        # Waiting for the next request: uvicorn's keep-alive timer runs until its first
        # byte, the head timer from then on (see _received).
        guard.waiting = True
        guard.partial = False
        conns.waiting.pop(proto, None)
        conns.waiting[proto] = None

    @staticmethod
    def _stop_waiting(proto: Any, guard: _Guard, conns: _Connections) -> None:
        conns.waiting.pop(proto, None)
        guard.waiting = False
        guard.partial = False
        if guard.timer is not None:
            guard.timer.cancel()
            guard.timer = None

    def _forget(self, proto: Any) -> None:
        for conns in list(self._loops.values()):
            guard = conns.guards.pop(proto, None)
            conns.waiting.pop(proto, None)
            conns.bodies.pop(proto, None)
            if guard is not None:
                if guard.timer is not None:
                    guard.timer.cancel()
                    guard.timer = None
                guard.waiting = False
                guard.body = None

    def _guard_of(self, proto: Any) -> _Guard | None:
        for conns in list(self._loops.values()):
            guard = conns.guards.get(proto)
            if guard is not None:
                return guard
        return None

    def _expire(self, proto: Any) -> None:
        guard = self._guard_of(proto)
        if guard is None:
            return
        guard.timer = None
        transport = proto.transport
        if not guard.waiting or transport.is_closing():
            return
        timeout = self.limits.header_timeout if self.limits is not None else 0
        _logger.warning(
            "closed a connection from %s: no complete request head within %g s", _peer(proto), timeout
        )
        if guard.partial:
            transport.write(_TIMEOUT_RESPONSE)
        self._forget(proto)
        transport.close()

    def _check_bodies(self, loop: asyncio.AbstractEventLoop, conns: _Connections) -> None:
        limits = self.limits
        if limits is None or not conns.bodies:
            conns.ticking = False
            return
        now = loop.time()
        for proto in list(conns.bodies):
            guard = conns.guards.get(proto)
            body = guard.body if guard is not None else None
            transport = getattr(proto, "transport", None)
            if (
                guard is None
                or body is None
                or transport is None
                or transport.is_closing()
                or getattr(proto, "cycle", None) is not body.cycle
                or not _body_coming(body.cycle)
            ):
                conns.bodies.pop(proto, None)
                if guard is not None:
                    guard.body = None
                continue
            if not _charge(proto, body, now):
                continue
            why = _why_stalled(body, limits)
            if why is not None:
                # One template for every connection, so that RepeatFilter counts them.
                _logger.warning("closed a connection from %s: %s", _peer(proto), why)
                self._close_with_408(proto)
        if conns.bodies:
            loop.call_later(_tick(limits), self._check_bodies, loop, conns)
        else:
            conns.ticking = False

    @staticmethod
    def _most_stalled_body(conns: _Connections, limits: ConnectionLimits, now: float) -> Any:
        """The connection whose body has been silent longest of those charged and stalled
        (silent for ``STALL_GRACE`` s, or below the rate floor after that long), or None."""
        grace = min(STALL_GRACE, limits.header_timeout)
        best, best_idle = None, -1.0
        for proto in conns.bodies:
            guard = conns.guards.get(proto)
            body = guard.body if guard is not None else None
            if (
                body is None
                or getattr(proto, "cycle", None) is not body.cycle
                or not _charge(proto, body, now)
            ):
                continue
            slow = body.owed >= grace and body.received < limits.min_body_rate * body.owed
            if (body.idle >= grace or slow) and body.idle > best_idle:
                best, best_idle = proto, body.idle
        return best

    def _close_with_408(self, proto: Any) -> None:
        """Close a connection whose response has not started, saying why (408)."""
        transport = proto.transport
        if not transport.is_closing():
            transport.write(_TIMEOUT_RESPONSE)
        self._forget(proto)
        transport.close()


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


# --- request bodies ---------------------------------------------------------------------


def _flush_every(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    flush_repeats()
    loop.call_later(seconds, _flush_every, loop, seconds)


def _tick(limits: ConnectionLimits) -> float:
    """How often bodies are checked: a stalled one is closed at most a quarter of the
    timeout (or a second) late."""
    return max(min(limits.header_timeout / 4, 1.0), 0.05)


def _body_coming(cycle: Any) -> bool:
    """The request's body is not complete and no response has started."""
    return bool(
        getattr(cycle, "more_body", False)
        and not getattr(cycle, "response_started", True)
        and not getattr(cycle, "response_complete", True)
        and not getattr(cycle, "disconnected", False)
    )


def _owed(proto: Any, cycle: Any) -> bool:
    """Whether the app is waiting for the client's bytes: the body is coming, uvicorn is
    reading (not paused because the app has not taken what came) and not holding the
    client back until it sends ``100 Continue``."""
    flow = getattr(proto, "flow", None)
    return (
        _body_coming(cycle)
        and not getattr(flow, "read_paused", False)
        and not getattr(cycle, "waiting_for_100_continue", False)
    )


def _end_body(proto: Any, guard: _Guard, conns: _Connections) -> None:
    guard.body = None
    conns.bodies.pop(proto, None)


def _charge(proto: Any, body: _Body, now: float) -> bool:
    """Count the time since the last check to the client if it owed bytes; whether it did."""
    owed = _owed(proto, body.cycle)
    if owed:
        elapsed = max(now - body.checked, 0.0)
        body.owed += elapsed
        body.idle += elapsed
    body.checked = now
    return owed


def _why_stalled(body: _Body, limits: ConnectionLimits) -> str | None:
    if body.idle >= limits.header_timeout:
        return f"no byte of the request body for {body.idle:.0f} s"
    if body.owed >= limits.header_timeout and body.received < limits.min_body_rate * body.owed:
        return (
            f"the request body came at {body.received / body.owed:.0f} bytes/s, "
            f"under {limits.min_body_rate:.0f}"
        )
    return None


def _peer(proto: Any) -> str:
    client = getattr(proto, "client", None)
    if isinstance(client, tuple) and len(client) >= 2:
        return f"{client[0]}:{client[1]}"
    return "a UNIX socket peer" if client is None else str(client)
