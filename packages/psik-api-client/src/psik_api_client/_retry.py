"""When a request is worth sending again, and how long to wait first.

A request is retried only if sending it twice cannot do anything twice: GET, PUT and
DELETE, and a POST carrying an ``Idempotency-Key`` (the server answers a replay with
the first result); and any request the server refused as ``rate_limited`` (429: it
did nothing, so nothing can be done twice). Only transient failures are retried:
connection errors and timeouts, 429, 502 (except ``submit_failed``: the backend refused
the job, and the job now exists), 503, 504, and 409 ``idempotency_in_flight`` (a retry
that overtook its first attempt; the server says when to come back). Delays grow
exponentially with jitter, and a ``Retry-After`` header wins (up to
``RetryPolicy.max_retry_after``: past it the error is raised at once).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from ._exceptions import parse_problem

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_RETRY_STATUSES = frozenset({429, 502, 503, 504, 409})


def is_idempotent(request: httpx.Request) -> bool:
    """True if sending ``request`` twice has the effect of sending it once."""
    return request.method in IDEMPOTENT_METHODS or "Idempotency-Key" in request.headers


def is_transient(response: httpx.Response) -> bool:
    """True if the error response may well go away if the request is sent again."""
    status = response.status_code
    if status not in _RETRY_STATUSES:
        return False
    if status in (409, 502):
        # Both statuses have one retryable meaning among others: read the problem code.
        problem = parse_problem(response)
        code = problem.code if problem else None
        return code == "idempotency_in_flight" if status == 409 else code != "submit_failed"
    return True


def _rate_limited(outcome: httpx.Response | httpx.TransportError) -> bool:
    """Whether the server refused the request for its rate limits, before doing anything."""
    if not isinstance(outcome, httpx.Response) or outcome.status_code != 429:
        return False
    problem = parse_problem(outcome)
    return problem is not None and problem.code == "rate_limited"


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """Decides whether and when to retry. ``rng`` returns floats in [0, 1) for jitter.

    A ``Retry-After`` longer than ``max_retry_after`` seconds is not waited for: the
    error is raised instead, since blocking a caller for that long is worse.
    """

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    rng: Callable[[], float] = field(default=random.random)

    def delay(
        self,
        request: httpx.Request,
        outcome: httpx.Response | httpx.TransportError,
        attempt: int,
    ) -> float | None:
        """Seconds to wait before sending ``request`` again after failed try number
        ``attempt`` (0 for the first), or None to stop and report ``outcome``."""
        if attempt >= self.max_retries:
            return None
        if not is_idempotent(request) and not _rate_limited(outcome):
            return None
        if isinstance(outcome, httpx.TransportError):
            # An unsupported scheme or a bad proxy URL will not fix itself.
            if isinstance(outcome, httpx.UnsupportedProtocol | httpx.ProxyError):
                return None
            return self.backoff(attempt)
        if not is_transient(outcome):
            return None
        retry_after = parse_retry_after(outcome.headers.get("Retry-After"))
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        return self.backoff(attempt)

    def backoff(self, attempt: int) -> float:
        """Exponential delay for retry ``attempt``, less up to 25 % jitter so that
        clients failing together do not all come back together."""
        base = min(self.max_delay, self.initial_delay * 2.0**attempt)
        return base * (1.0 - 0.25 * self.rng())


@dataclass
class PollBackoff:
    """Delays between status polls: quick at first (most short jobs end within a
    second), then ``growth`` times longer each round, up to ``cap`` seconds."""

    first: float = 0.02
    cap: float = 1.0
    growth: float = 1.5
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next = min(self.first, self.cap)

    def next(self) -> float:
        """The delay before the next poll."""
        delay = self._next
        self._next = min(self.cap, self._next * self.growth)
        return delay
