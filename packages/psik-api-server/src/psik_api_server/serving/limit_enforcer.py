"""The connection limits, enforced on each connection a uvicorn protocol accepts
(:class:`LimitEnforcer`, called by :class:`~psik_api_server.serving.uvicorn_seam.ConnectionHooks`).

With a :class:`~psik_api_server.serving.limits.ConnectionLimits`: a request head has a
deadline (408 if part of one came, else a silent close), a request body must keep coming
(no byte for ``header_timeout`` seconds, or under ``min_body_rate`` bytes/s after that
long: 408; time the app is not reading is not charged to the client), and open
connections are capped: at the cap, a new connection closes the one that waited longest
for a request, else the one whose body stalled longest, else itself (``limits``' module
doc). It reads the protocol's ``transport``, ``cycle`` (``body``, ``more_body``,
``response_started``, ``response_complete``, ``disconnected``,
``waiting_for_100_continue``), ``flow.read_paused`` and ``client``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from .limits import STALL_GRACE, ConnectionLimits, flush_repeats, repeat_filter

_logger = logging.getLogger("psik_api_server.serving.limits")  # one of limits.PER_CONNECTION_LOGGERS

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nRequest Timeout\n"
)


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


class LimitEnforcer:
    """Enforces ``limits`` on one server's connections, those of each event loop apart.
    Its four moments (:meth:`accepted`, :meth:`received`, :meth:`responded`,
    :meth:`forget`) run after uvicorn's own method; the caller keeps an error of theirs
    from uvicorn's connection handling."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Connections] = (
            weakref.WeakKeyDictionary()
        )

    def _conns(self) -> _Connections | None:
        return self._loops.get(asyncio.get_running_loop())

    def accepted(self, proto: Any, transport: Any) -> None:
        """A new connection: wait for its request head, making room at the cap."""
        limits = self.limits
        if transport.is_closing():
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
                self.forget(victim)
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
                self.forget(proto)
                transport.close()
                return
        guard.waiting = True
        conns.waiting[proto] = None
        guard.timer = loop.call_later(limits.header_timeout, self._expire, proto)

    def received(self, proto: Any, _before: Any, data: bytes) -> None:
        """Bytes came: a request head complete, a body under way, or a head begun."""
        limits, conns = self.limits, self._conns()
        guard = conns.guards.get(proto) if conns is not None else None
        if guard is None or conns is None:
            return
        transport = getattr(proto, "transport", None)
        if transport is not None and transport.get_protocol() is not proto:
            self.forget(proto)  # upgraded (websocket): no longer ours to follow
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

    def responded(self, proto: Any) -> None:
        """A response was written: wait for the next request head."""
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
        # byte, the head timer from then on (see received).
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

    def forget(self, proto: Any) -> None:
        """Follow this connection no more (it closed, or is closed here)."""
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
        timeout = self.limits.header_timeout
        _logger.warning(
            "closed a connection from %s: no complete request head within %g s", _peer(proto), timeout
        )
        if guard.partial:
            transport.write(_TIMEOUT_RESPONSE)
        self.forget(proto)
        transport.close()

    def _check_bodies(self, loop: asyncio.AbstractEventLoop, conns: _Connections) -> None:
        limits = self.limits
        if not conns.bodies:
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
        self.forget(proto)
        transport.close()


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
