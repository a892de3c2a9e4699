"""TLS handshake refusals, logged: a client whose certificate the server does not trust
is told nothing but a closed connection, and without this the server said nothing either.

asyncio's TLS layer drops a failed handshake silently (its ``_fatal_error`` logs an
``OSError`` only in debug mode), before uvicorn's protocol is ever told of the
connection. The seam is the one ``ssl`` documents for it: ``SSLContext.sslobject_class``,
the class ``wrap_bio`` (asyncio's TLS) makes its ``SSLObject`` with. :func:`install` sets
it to :class:`LoggedSSLObject`, whose ``do_handshake`` logs a server-side failure once
per (peer address, reason) per :data:`WINDOW` seconds, then says how many more there were.
The hook is process-wide, as the server's TLS context is made by ``certified serve``,
not by us; client-side handshakes (the callback relay) are left alone.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from types import FrameType
from typing import Any

_logger = logging.getLogger("psik_api_server.tls")

#: Seconds during which the same refusal from the same address is counted, not logged.
WINDOW = 60.0


class RefusalLog:
    """Logs each (peer, reason) once per ``window`` seconds; the next line after that
    says how many were left unsaid."""

    def __init__(self, window: float = WINDOW, clock: Any = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()  # the event loops of several threads may share it
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, peer: str, reason: str) -> None:
        now = self._clock()
        with self._lock:
            since, unsaid = self._seen.get((peer, reason), (None, 0))
            if since is not None and now - since < self._window:
                self._seen[peer, reason] = (since, unsaid + 1)
                return
            if len(self._seen) > 4096:  # a scan from many addresses: forget the oldest
                self._seen = dict(sorted(self._seen.items(), key=lambda i: i[1][0])[-2048:])
            self._seen[peer, reason] = (now, 0)
        more = f" ({unsaid} more like this in the last {self._window:g} s)" if unsaid else ""
        _logger.warning("TLS handshake with %s refused: %s%s", peer, reason, more)


REFUSALS = RefusalLog()


def describe(exc: ssl.SSLError) -> str:
    """Why a handshake failed, in words an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the client certificate is not trusted ({exc.verify_message})"
    reason = getattr(exc, "reason", None) or type(exc).__name__
    known = {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client presented no certificate",
        "HTTP_REQUEST": "plain http sent to the https port",
        "WRONG_VERSION_NUMBER": "not TLS, or an old TLS version",
        "UNSUPPORTED_PROTOCOL": "a TLS version the server does not accept",
        "NO_SHARED_CIPHER": "no cipher in common",
    }
    return known.get(reason, str(reason).lower().replace("_", " "))


def _peer() -> str:
    """The peer of the handshake being done: asyncio's SSLProtocol, which calls
    ``do_handshake``, holds the socket transport (the SSLObject itself knows no socket)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        transport = getattr(owner, "_transport", None)
        if transport is not None and hasattr(transport, "get_extra_info"):
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                return str(peer[0])
            if peer:
                return str(peer)
        frame = frame.f_back
    return "an unknown peer"


class LoggedSSLObject(ssl.SSLObject):
    """An SSLObject whose failed server-side handshake is logged (see the module doc)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # the handshake is going on
        except ssl.SSLError as exc:
            if self.server_side:
                try:
                    REFUSALS.refused(_peer(), describe(exc))
                except Exception:  # logging must never change what the handshake does
                    _logger.debug("cannot log a TLS refusal", exc_info=True)
            raise


def install() -> None:
    """Log failed server-side TLS handshakes from now on (idempotent)."""
    if not issubclass(ssl.SSLContext.sslobject_class, LoggedSSLObject):
        ssl.SSLContext.sslobject_class = LoggedSSLObject
