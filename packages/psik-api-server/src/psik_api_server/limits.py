"""Connection limits: slow or idle connections (slowloris) cannot take the server down.

What uvicorn does not do by itself, and what goes wrong without it (measured: 1,200 idle
TCP connections against a soft open-file limit of 1,024 grew the log by 150 MB in 25 s
and the server stopped answering):

* **A request head has a deadline.** uvicorn's h11 and httptools protocols start no timer
  on a new connection, and their keep-alive timer stops at the first byte of the next
  request: a client that connects and says nothing, or sends a header byte every few
  seconds, holds its connection for ever. :func:`install` arms a timer when a connection
  starts waiting for a request head (accepted, or the first byte after a keep-alive
  pause) and closes it if the head is not complete within ``header_timeout`` (with a
  ``408`` when part of a head had come).
* **A request body must keep coming.** A complete head (``POST /v1/jobs``,
  ``Content-Length: 100000``) then one byte and silence held its connection for ever,
  counted as a request in progress and never made room: 60 of them locked everyone out
  of a server capped at 50. While the app waits for the client's bytes (the body is
  not complete, no response has started, uvicorn is reading: not paused because the app
  is slow to take what came, not waiting to send ``100 Continue``), the time is charged
  to the client. A body that gets no byte for ``header_timeout`` seconds of that time,
  or, once ``header_timeout`` seconds have been charged, has averaged less than
  :data:`MIN_BODY_RATE` (1 KiB/s) over them, is closed with a ``408``. Time the app
  spends not reading is not charged (a slow disk is not the client's fault), and once
  the response has started (a log follow streams for as long as the job runs, the
  client reading) nothing is: that connection is the server's to finish.
* **Open connections are capped**, below what the open-file limit allows. At the cap,
  a new connection makes room by closing the connection that has waited longest for a
  request head (idle, keep-alive or trickling); if none is waiting for a head, the
  request body that has been stalled longest (by the rules above: charged, and silent
  for :data:`STALL_GRACE` seconds or below the rate floor after that long) is closed
  with a ``408``; only when every connection has a request the server is working on
  (or a body that is coming at a decent pace) is the new one closed. Idle sockets and
  stalled bodies thus cannot lock out a real client (``/healthz``, a submit): a client
  that sends its request at once is never the longest waiting. uvicorn's own
  ``limit_concurrency`` is not used: it counts idle connections too and answers 503 to
  every request past it, so 1,000 idle sockets would shut out every real one until they
  go.
* **The soft open-file limit is raised to the hard one** (:func:`raise_open_file_limit`),
  and the cap and listen backlog are fitted under it (:func:`fit`): asyncio accepts up
  to ``backlog`` connections in one go before any of them is seen, and an accept that
  fails with EMFILE is logged with a traceback once per pending connection, in a loop.
* **The same error is not logged per connection**: :class:`RepeatFilter` passes the
  first of a kind, counts the next ones for ``window`` seconds and says "N more like
  this in the last M s" with the next one after that (or at exit).

The hook is process-wide, as uvicorn's protocol classes are: ``serve`` and
``psik_api_server.main`` install it with the settings' values; an app built by hand (the
tests) runs without it unless :func:`install` was called.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .settings import Settings

_logger = logging.getLogger(__name__)

#: File descriptors kept for the server itself (index, job files, launcher, watcher).
RESERVE_FDS = 256
#: Bytes per second a request body must average once ``header_timeout`` seconds of it
#: have been charged to the client (see the module doc): one byte every 9 s would
#: otherwise hold a connection for ever. 1 KiB/s moves a 4 GiB upload in 49 days, so
#: no real client is near it; a trickle of a few bytes a second is cut.
MIN_BODY_RATE = 1024
#: Seconds a body must have been stalled (charged and silent, or below the rate floor
#: for that long) to be closed to make room for a new connection at the cap.
STALL_GRACE = 1.0
#: The loggers that can say something per connection; :func:`quiet_repeats` filters them.
PER_CONNECTION_LOGGERS = (
    "asyncio",
    "uvicorn.error",
    "psik_api_server.limits",
    "psik_api_server.peer",
    "psik_api_server.security",
)

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nRequest Timeout\n"
)


@dataclass(frozen=True)
class ConnectionLimits:
    """What :func:`install` enforces: at most ``max_connections`` open connections, a
    request head complete within ``header_timeout`` seconds of waiting for it, and a
    request body that never stalls that long or averages less than ``min_body_rate``
    bytes/s after it (time the app is not reading is not counted)."""

    max_connections: int
    header_timeout: float
    min_body_rate: float = MIN_BODY_RATE


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (before, after).

    Where the hard limit is "unlimited" but the kernel has a lower ceiling (macOS:
    ``OPEN_MAX``), the highest value it accepts of a few is taken."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return (soft, soft)
    candidates = [hard] if hard != resource.RLIM_INFINITY else []
    unlimited = hard == resource.RLIM_INFINITY
    candidates += [c for c in (1 << 20, 65536, 10240) if c > soft and (unlimited or c < hard)]
    for candidate in candidates:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
        except (ValueError, OSError):
            continue
        return (soft, candidate)
    return (soft, soft)


def fit(max_connections: int, backlog: int, open_files: int) -> tuple[int, int]:
    """The connection cap and listen backlog to use under ``open_files`` descriptors:
    ``cap + backlog + RESERVE_FDS`` must fit (a burst of accepts holds up to ``backlog``
    descriptors before any is closed). The backlog gives way first, down to 64."""
    if open_files <= 0:  # unknown (not POSIX): trust the settings
        return max_connections, backlog
    budget = max(open_files - RESERVE_FDS, 32)
    backlog = max(min(backlog, budget - max_connections), min(64, budget // 2))
    cap = max(min(max_connections, budget - backlog), 16)
    return cap, backlog


def start(
    settings: Settings, *, backlog: int, keep_alive: bool = True, logger: logging.Logger | None = None
) -> tuple[int, int]:
    """At server start: raise the open-file limit, fit the connection cap and backlog
    under it, :func:`install` the limits and say in one line what they are (``keep_alive``:
    whether the settings' keep-alive timeout is the one uvicorn uses). Returns the cap
    and the backlog to listen with."""
    before, after = raise_open_file_limit()
    cap, backlog = fit(settings.max_connections, backlog, after)
    install(ConnectionLimits(cap, settings.header_timeout))
    log = logger or _logger
    files = f"{before} -> {after}" if after != before else f"{after}"
    idle = f"{settings.keep_alive_timeout} s" if keep_alive else "uvicorn's --timeout-keep-alive"
    log.info(
        "limits: open files %s (hard limit), connections at most %d, request head within %g s, "
        "request body stalled at most %g s and at least %d bytes/s after that, keep-alive %s",
        files, cap, settings.header_timeout, settings.header_timeout, MIN_BODY_RATE, idle,
    )  # fmt: skip
    if cap < settings.max_connections:
        log.warning(
            "limits: max_connections %d lowered to %d to fit the open-file limit (%d); "
            "raise the hard limit (ulimit -Hn) to allow more",
            settings.max_connections, cap, after,
        )  # fmt: skip
    return cap, backlog


# --- the same error once, then how many more ------------------------------------------


@dataclass
class _Seen:
    since: float
    text: str  # the first line of the one that was logged
    count: int = 0


class RepeatFilter(logging.Filter):
    """Passes the first record of a kind (same logger, level, message template and
    exception), then drops the same kind for ``window`` seconds, counting; the next one
    after that passes with "(N more like this in the last M s)" appended.
    :meth:`flush` logs what is still counted (at exit). Records below ``level`` pass."""

    def __init__(
        self,
        window: float = 60.0,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 1000,
    ) -> None:
        super().__init__()
        self.window = window
        self.level = level
        self.clock = clock
        self.max_kinds = max_kinds
        self._seen: dict[tuple[str, int, str, str], _Seen] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _kind(record: logging.LogRecord) -> tuple[str, int, str, str]:
        exc = record.exc_info[1] if record.exc_info else None
        what = f"{type(exc).__qualname__}: {exc}"[:200] if exc is not None else ""
        return (record.name, record.levelno, str(record.msg)[:500], what)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, "psik_api_summary", False):
            return True
        kind = self._kind(record)
        with self._lock:
            now = self.clock()
            seen = self._seen.get(kind)
            if seen is not None and now - seen.since < self.window:
                seen.count += 1
                return False
            text = _first_line(record)
            if seen is not None and seen.count:
                record.msg = f"{record.msg} ({_more(seen.count, now - seen.since)})"
            self._seen.pop(kind, None)
            self._seen[kind] = _Seen(now, text)
            while len(self._seen) > self.max_kinds:
                del self._seen[next(iter(self._seen))]
        return True

    def flush(self) -> None:
        """Log, for each kind still being counted, how many more there were."""
        with self._lock:
            now = self.clock()
            pending = [(kind, seen, now - seen.since) for kind, seen in self._seen.items() if seen.count]
            for kind, seen, _seconds in pending:
                self._seen[kind] = _Seen(now, seen.text)
        for (name, level, _msg, _what), seen, seconds in pending:
            logging.getLogger(name).log(
                level, "%s: %s", _more(seen.count, seconds), seen.text, extra={"psik_api_summary": True}
            )


def _first_line(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # a broken format: the template, as logging would show it
        text = str(record.msg)
    return text.split("\n", 1)[0][:300]


def _more(count: int, seconds: float) -> str:
    return f"{count} more like this in the last {max(seconds, 0.0):.0f} s"


_filters: dict[str, RepeatFilter] = {}


def quiet_repeats(names: Iterable[str] = PER_CONNECTION_LOGGERS, window: float = 60.0) -> RepeatFilter:
    """Put one :class:`RepeatFilter` on each of the loggers ``names`` (idempotent). What
    it counted is logged every ``window`` seconds while connections come (see
    :func:`install`), when the app stops (:func:`flush_repeats`) and at exit."""
    shared = _filters.get("")
    if shared is None:
        shared = _filters[""] = RepeatFilter(window)
        atexit.register(shared.flush)
    for name in names:
        logger = logging.getLogger(name)
        if shared not in logger.filters:
            logger.addFilter(shared)
    return shared


def flush_repeats() -> None:
    """Log what the filter of :func:`quiet_repeats` has counted (if it is in place)."""
    shared = _filters.get("")
    if shared is not None:
        shared.flush()


def _flush_every(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    flush_repeats()
    loop.call_later(seconds, _flush_every, loop, seconds)


# --- the hook on uvicorn's protocols --------------------------------------------------


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
    """The guarded connections of one event loop; ``waiting`` in the order they started
    to wait (the first is the one to close at the cap); ``bodies``, those whose request
    body is coming (checked every ``tick`` seconds while there are any)."""

    def __init__(self) -> None:
        self.open: set[Any] = set()
        self.waiting: dict[Any, None] = {}
        self.bodies: dict[Any, None] = {}
        self.ticking = False


class _Active:
    limits: ClassVar[ConnectionLimits | None] = None
    loops: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Connections]] = (
        weakref.WeakKeyDictionary()
    )


_GUARD = "_psik_api_guard"
_MARK = "_psik_api_limits"
_PROTOCOLS = [
    ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
    ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
    ("uvicorn.protocols.http.zttp_impl", "ZttpProtocol"),
]


def install(limits: ConnectionLimits | None) -> list[str]:
    """Enforce ``limits`` on every connection uvicorn's h11, httptools and zttp (HTTP/1.1)
    protocols accept from now on (None: stop enforcing); returns the classes hooked. Idempotent."""
    _Active.limits = limits
    hooked: list[str] = []
    for module_name, class_name in _PROTOCOLS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # that protocol's library is not installed
        wrappers: dict[str, Callable[..., None]] = {
            "connection_made": _made,
            "data_received": _received,
            "on_response_complete": _responded,
            "connection_lost": _lost,
        }
        if not all(callable(getattr(cls, name, None)) for name in wrappers):
            continue  # not the uvicorn this was written for: leave it alone
        for name, after in wrappers.items():
            if not is_wrapped(getattr(cls, name), _MARK):
                setattr(cls, name, _wrap(getattr(cls, name), after))
        hooked.append(f"{module_name}.{class_name}")
    return hooked


def is_wrapped(func: Any, mark: str) -> bool:
    """True if ``func`` or a function it wraps (``__wrapped__``) carries ``mark``."""
    seen = 0
    while func is not None and seen < 32:
        if getattr(func, mark, False):
            return True
        func = getattr(func, "__wrapped__", None)
        seen += 1
    return False


def _wrap(original: Callable[..., Any], after: Callable[..., None]) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any) -> Any:
        before = getattr(self, "cycle", None)
        result = original(self, *args)
        try:
            after(self, before, *args)
        except Exception:  # never break uvicorn's connection handling
            _logger.exception("connection limits: cannot follow a connection")
        return result

    setattr(wrapper, _MARK, True)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__name__ = getattr(original, "__name__", "wrapper")
    return wrapper


def _made(proto: Any, _before: Any, transport: Any) -> None:
    limits = _Active.limits
    if limits is None or transport.is_closing():
        return
    loop = asyncio.get_running_loop()
    conns = _Active.loops.get(loop)
    if conns is None:
        conns = _Active.loops[loop] = _Connections()
        shared = _filters.get("")
        if shared is not None:  # say what was counted while connections come
            loop.call_later(shared.window, _flush_every, loop, shared.window)
    guard = _Guard(getattr(proto, "cycle", None))
    setattr(proto, _GUARD, guard)
    conns.open.add(proto)
    if len(conns.open) > limits.max_connections:
        victim = next(iter(conns.waiting), None)
        if victim is not None:
            _logger.warning(
                "at the connection limit (%d): closed the connection that waited longest for a request (%s)",
                limits.max_connections,
                _peer(victim),
            )
            _forget(victim)
            victim.transport.close()
        elif (victim := _most_stalled_body(conns, limits, loop.time())) is not None:
            _logger.warning(
                "at the connection limit (%d): closed the connection whose request body was stalled "
                "longest (%s)",
                limits.max_connections,
                _peer(victim),
            )
            _close_with_408(victim)
        else:
            _logger.warning(
                "at the connection limit (%d) and every connection has a request in progress: "
                "closed a new connection from %s",
                limits.max_connections,
                _peer(proto),
            )
            _forget(proto)
            transport.close()
            return
    _start_waiting(proto, guard, conns, limits)


def _received(proto: Any, _before: Any, data: bytes) -> None:
    guard: _Guard | None = getattr(proto, _GUARD, None)
    limits = _Active.limits
    conns = _Active.loops.get(asyncio.get_running_loop())
    if guard is None or conns is None or limits is None:
        return
    transport = getattr(proto, "transport", None)
    if transport is not None and transport.get_protocol() is not proto:
        _forget(proto)  # upgraded (websocket): no longer ours to follow
        return
    cycle = getattr(proto, "cycle", None)
    if cycle is not guard.cycle:
        guard.cycle = cycle  # a request head is complete
        _stop_waiting(proto, conns)
        _end_body(proto, guard, conns)
        if cycle is not None and _body_coming(cycle):
            loop = asyncio.get_running_loop()
            guard.body = _Body(cycle, len(getattr(cycle, "body", b"")), loop.time())
            conns.bodies[proto] = None
            if not conns.ticking:
                conns.ticking = True
                loop.call_later(_tick(limits), _check_bodies, loop, conns)
    elif guard.body is not None:
        guard.body.received += len(data)
        guard.body.idle = 0.0
    elif guard.waiting:
        guard.partial = True
        if guard.timer is None:  # the first byte after a keep-alive pause
            guard.timer = asyncio.get_running_loop().call_later(limits.header_timeout, _expire, proto)


def _responded(proto: Any, _before: Any) -> None:
    guard: _Guard | None = getattr(proto, _GUARD, None)
    conns = _Active.loops.get(asyncio.get_running_loop())
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


def _lost(proto: Any, _before: Any, _exc: Any) -> None:
    _forget(proto)


def _start_waiting(proto: Any, guard: _Guard, conns: _Connections, limits: ConnectionLimits) -> None:
    guard.waiting = True
    conns.waiting[proto] = None
    guard.timer = asyncio.get_running_loop().call_later(limits.header_timeout, _expire, proto)


def _stop_waiting(proto: Any, conns: _Connections) -> None:
    guard: _Guard | None = getattr(proto, _GUARD, None)
    conns.waiting.pop(proto, None)
    if guard is not None:
        guard.waiting = False
        guard.partial = False
        if guard.timer is not None:
            guard.timer.cancel()
            guard.timer = None


def _forget(proto: Any) -> None:
    guard: _Guard | None = getattr(proto, _GUARD, None)
    if guard is None:
        return
    if guard.timer is not None:
        guard.timer.cancel()
        guard.timer = None
    guard.waiting = False
    guard.body = None
    for conns in list(_Active.loops.values()):
        conns.open.discard(proto)
        conns.waiting.pop(proto, None)
        conns.bodies.pop(proto, None)
    delattr(proto, _GUARD)


def _expire(proto: Any) -> None:
    guard: _Guard | None = getattr(proto, _GUARD, None)
    limits = _Active.limits
    if guard is None:
        return
    guard.timer = None
    transport = proto.transport
    if not guard.waiting or transport.is_closing():
        return
    timeout = limits.header_timeout if limits is not None else 0
    _logger.warning(
        "closed a connection from %s: no complete request head within %g s", _peer(proto), timeout
    )
    if guard.partial:
        transport.write(_TIMEOUT_RESPONSE)
    _forget(proto)
    transport.close()


# --- request bodies ---------------------------------------------------------------------


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


def _check_bodies(loop: asyncio.AbstractEventLoop, conns: _Connections) -> None:
    limits = _Active.limits
    if limits is None or not conns.bodies:
        conns.ticking = False
        return
    now = loop.time()
    for proto in list(conns.bodies):
        guard: _Guard | None = getattr(proto, _GUARD, None)
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
            _close_with_408(proto)
    if conns.bodies:
        loop.call_later(_tick(limits), _check_bodies, loop, conns)
    else:
        conns.ticking = False


def _most_stalled_body(conns: _Connections, limits: ConnectionLimits, now: float) -> Any:
    """The connection whose body has been silent longest of those charged and stalled
    (silent for ``STALL_GRACE`` s, or below the rate floor after that long), or None."""
    grace = min(STALL_GRACE, limits.header_timeout)
    best, best_idle = None, -1.0
    for proto in conns.bodies:
        guard: _Guard | None = getattr(proto, _GUARD, None)
        body = guard.body if guard is not None else None
        if body is None or getattr(proto, "cycle", None) is not body.cycle or not _charge(proto, body, now):
            continue
        slow = body.owed >= grace and body.received < limits.min_body_rate * body.owed
        if (body.idle >= grace or slow) and body.idle > best_idle:
            best, best_idle = proto, body.idle
    return best


def _close_with_408(proto: Any) -> None:
    """Close a connection whose response has not started, saying why (408)."""
    transport = proto.transport
    if not transport.is_closing():
        transport.write(_TIMEOUT_RESPONSE)
    _forget(proto)
    transport.close()


def _peer(proto: Any) -> str:
    client = getattr(proto, "client", None)
    if isinstance(client, tuple) and len(client) >= 2:
        return f"{client[0]}:{client[1]}"
    return "a UNIX socket peer" if client is None else str(client)
