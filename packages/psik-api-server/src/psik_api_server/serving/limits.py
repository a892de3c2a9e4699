"""Connection limits: slow or idle connections (slowloris) cannot take the server down.

What uvicorn does not do by itself, and what goes wrong without it (measured: 1,200 idle
TCP connections against a soft open-file limit of 1,024 grew the log by 150 MB in 25 s
and the server stopped answering):

* **A request head has a deadline.** uvicorn's h11 and httptools protocols start no timer
  on a new connection, and their keep-alive timer stops at the first byte of the next
  request: a client that connects and says nothing, or sends a header byte every few
  seconds, holds its connection for ever. A timer is armed when a connection
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

This module says what the limits are (:class:`ConnectionLimits`, :func:`start`) and
keeps the logs short; :mod:`.limit_enforcer` enforces them on each connection, through
:mod:`.uvicorn_seam`: ``serve`` through its own protocol class, ``psik_api_server.main`` (uvicorn launched by
someone else) by patching uvicorn's. An app built by hand (the tests) runs without them.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings

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
    "psik_api_server.serving.limits",  # uvicorn_seam's and limit_enforcer's
    "psik_api_server.auth.peer",  # peer_tag's, at accept
)


@dataclass(frozen=True)
class ConnectionLimits:
    """What :mod:`.uvicorn_seam` enforces: at most ``max_connections`` open connections, a
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
) -> tuple[ConnectionLimits, int]:
    """At server start: raise the open-file limit, fit the connection cap and backlog
    under it and say in one line what the limits are (``keep_alive``: whether the
    settings' keep-alive timeout is the one uvicorn uses). Returns the limits to enforce
    and the backlog to listen with."""
    before, after = raise_open_file_limit()
    cap, backlog = fit(settings.max_connections, backlog, after)
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
    return ConnectionLimits(cap, settings.header_timeout), backlog


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
    :mod:`psik_api_server.serving.uvicorn_seam`), when the app stops (:func:`flush_repeats`) and at exit."""
    shared = _filters.get("")
    if shared is None:
        shared = _filters[""] = RepeatFilter(window)
        atexit.register(shared.flush)
    for name in names:
        logger = logging.getLogger(name)
        if shared not in logger.filters:
            logger.addFilter(shared)
    return shared


def repeat_filter() -> RepeatFilter | None:
    """The filter :func:`quiet_repeats` put in place, if it did."""
    return _filters.get("")


def flush_repeats() -> None:
    """Log what the filter of :func:`quiet_repeats` has counted (if it is in place)."""
    shared = _filters.get("")
    if shared is not None:
        shared.flush()
