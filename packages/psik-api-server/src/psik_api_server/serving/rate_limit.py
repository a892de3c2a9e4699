"""Per-identity rate limits (``rate_limits`` in the config): one user cannot starve the
others by sending more requests, or submitting more jobs, than the site allows.

* **Who**: the identity is the request's principal, the user it acts for (a
  certificate's ``uid:alice``, or the user of the bearer token it carries: a token
  alice handed on is charged to alice); in token mode a request with no principal (the
  backends, the token routes) is charged to its caller (``uid:...``, or ``addr:<ip>``
  for one without a certificate). Local mode has one user.
* **What**: every request takes one from the identity's request bucket
  (``requests_per_second``, holding ``burst``); an event stream is one request, at its
  opening. A submit (``POST /v1/jobs``, ``POST /v1/jobs/{id}/start``, ``POST
  /v1/groups``) also takes one from its submit bucket (``submits_per_second``, holding
  one second's worth, at least 1). A group counts as its number of jobs: it is let in
  for one, and once made, the rest of its jobs are taken from the bucket, which may go
  below zero; the identity then submits nothing until the debt is paid (a group of 300
  at 10/s: 30 s). So one request of many jobs is no way around the submit rate, and
  still makes them all at once. (A replay of a group under its ``Idempotency-Key``
  counts again.)
* **Free**: the health check, the OpenAPI document and the docs page, and the jobs'
  signed callbacks (:data:`~psik_api_server.http.openapi.RATE_LIMIT_EXEMPT`); a request
  refused before its caller is known (401, 403) costs nothing here either.
* **Past the limit**: 429 ``rate_limited``, ``Retry-After`` the whole seconds (rounded
  up) until the request would be let in; nothing was done, so any request may be sent
  again (the client does).

:class:`RateLimit` is pure ASGI middleware inside the auth middleware (the identity is
known, nothing of the route has run; streamed answers pass untouched). The buckets live
in memory (:class:`RateLimiter`), one pair per identity, kept only while they matter: a
bucket that has filled up again is the same as a new one and is dropped, and past
``max_identities`` the least recently seen is dropped anyway, so that many identities
(``addr:`` callers, say) cannot grow memory without bound.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from psik_api_core import Principal, ProblemCode

from ..auth.authenticator import PRINCIPAL_KEY
from ..auth.token import CALLER_KEY, Caller
from ..errors import ApiError
from ..http.openapi import OPERATIONS, RATE_LIMIT_EXEMPT
from ..http.problems import problem_response
from ..settings import RateLimits

#: The paths no limit applies to (exact: a variant such as ``/healthz%0A`` is counted).
EXEMPT_PATHS = frozenset(op.path for op in OPERATIONS if op.operation_id in RATE_LIMIT_EXEMPT)
#: The submit routes, matched as the router matches (``$`` also before a final newline,
#: so ``/v1/jobs%0A``, which the router takes as ``POST /v1/jobs``, is a submit too).
_SUBMIT = re.compile(r"/v1/(jobs|jobs/[^/]+/start|groups)$")
_GROUP = "/v1/groups"
#: Identities whose buckets are kept at most (a pair is ~200 bytes).
MAX_IDENTITIES = 100_000


@dataclass
class _Buckets:
    """One identity's tokens, as of ``at`` (the limiter's clock)."""

    requests: float
    submits: float
    at: float
    #: When both are full again, at the latest: past it the pair is a new one's.
    full_at: float


@dataclass(frozen=True)
class Refusal:
    """Why a request is not let in: the limit it is over and the seconds until it would be."""

    submits: bool
    wait: float

    @property
    def retry_after(self) -> int:
        """``Retry-After``: whole seconds, rounded up, at least 1."""
        return max(1, math.ceil(self.wait))


class RateLimiter:
    """Token buckets per identity (the module doc). Not thread-safe: the event loop's
    own, called between awaits."""

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_identities: int = MAX_IDENTITIES,
    ) -> None:
        self.limits = limits
        self._rate = limits.requests_per_second
        self._burst = float(limits.burst)
        self._submit_rate = limits.submits_per_second
        self._submit_burst = max(1.0, limits.submits_per_second)
        self._clock = clock
        self._max = max_identities
        self._buckets: OrderedDict[str, _Buckets] = OrderedDict()

    def __len__(self) -> int:
        """How many identities have buckets now."""
        return len(self._buckets)

    def admit(self, identity: str, *, submit: bool = False) -> Refusal | None:
        """Take a request (and a submit) from ``identity``'s buckets, or say why not
        (then nothing is taken)."""
        now = self._clock()
        b = self._current(identity, now)
        wait = 0.0
        if self._rate > 0 and b.requests < 1:
            wait = (1 - b.requests) / self._rate
        if submit and self._submit_rate > 0 and b.submits < 1:
            wait_submit = (1 - b.submits) / self._submit_rate
            if wait_submit >= wait:
                return Refusal(True, wait_submit)
        if wait > 0:
            return Refusal(False, wait)
        if self._rate > 0:
            b.requests -= 1
        if submit and self._submit_rate > 0:
            b.submits -= 1
        self._settle(b)
        return None

    def charge_submits(self, identity: str, count: int) -> None:
        """Take ``count`` more submits (a group's other jobs), into debt if need be."""
        if self._submit_rate <= 0 or count <= 0:
            return
        b = self._current(identity, self._clock())
        b.submits -= count
        self._settle(b)

    def _current(self, identity: str, now: float) -> _Buckets:
        """``identity``'s buckets brought up to ``now`` (new ones full), the most recent."""
        b = self._buckets.get(identity)
        if b is None:
            self._evict(now)
            b = _Buckets(self._burst, self._submit_burst, now, now)
            self._buckets[identity] = b
            return b
        self._buckets.move_to_end(identity)
        elapsed = max(0.0, now - b.at)
        b.requests = min(self._burst, b.requests + elapsed * self._rate)
        b.submits = min(self._submit_burst, b.submits + elapsed * self._submit_rate)
        b.at = now
        return b

    def _settle(self, b: _Buckets) -> None:
        refill = 0.0
        if self._rate > 0:
            refill = (self._burst - b.requests) / self._rate
        if self._submit_rate > 0:
            refill = max(refill, (self._submit_burst - b.submits) / self._submit_rate)
        b.full_at = b.at + refill

    def _evict(self, now: float) -> None:
        """Drop the least recently seen pairs that are full again, then any past the cap.
        (A pair in debt at the front stops the first sweep; the cap still holds.)"""
        buckets = self._buckets
        while buckets and next(iter(buckets.values())).full_at <= now:
            buckets.popitem(last=False)
        while len(buckets) >= self._max:
            buckets.popitem(last=False)


def identity_of(scope: Scope) -> str | None:
    """Whom a request is charged to (the module doc); None: nobody it can be told."""
    state = scope.get("state") or {}
    found = state.get(PRINCIPAL_KEY)
    if isinstance(found, Principal):
        return found.user
    caller = state.get(CALLER_KEY)
    return caller.identity if isinstance(caller, Caller) else None


def refusal_error(identity: str, refusal: Refusal, limits: RateLimits) -> ApiError:
    """The 429 problem for ``refusal``, saying which limit and when to come back."""
    if refusal.submits:
        what = (
            f"its limit of {limits.submits_per_second:g} jobs submitted per second (a group"
            " counts as its number of jobs)"
        )
    else:
        what = f"its limit of {limits.requests_per_second:g} requests per second (burst {limits.burst})"
    return ApiError(
        ProblemCode.rate_limited,
        f"{identity} is over {what}; nothing was done: send it again in {refusal.retry_after} s",
        headers={"Retry-After": str(refusal.retry_after)},
    )


class RateLimit:
    """Pure ASGI middleware: the limits of :class:`RateLimiter`, per identity (the module doc)."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        identity = identity_of(scope) if scope["type"] == "http" and path not in EXEMPT_PATHS else None
        if identity is None:
            await self.app(scope, receive, send)
            return
        submit = scope.get("method") == "POST" and _SUBMIT.match(path) is not None
        refused = self.limiter.admit(identity, submit=submit)
        if refused is not None:
            error = refusal_error(identity, refused, self.limiter.limits)
            await problem_response(error, path)(scope, receive, send)
            return
        if not (submit and path.startswith(_GROUP)):
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _GroupCount(send, identity, self.limiter))


class _GroupCount:
    """The ``send`` of a group request: passes every message on, keeps a copy of a 201's
    body (the group as JSON), and when it is whole charges the group's other jobs."""

    def __init__(self, send: Send, identity: str, limiter: RateLimiter) -> None:
        self.send = send
        self.identity = identity
        self.limiter = limiter
        self.body: list[bytes] | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 201:
            self.body = []
        elif message["type"] == "http.response.body" and self.body is not None:
            self.body.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.limiter.charge_submits(self.identity, _members(b"".join(self.body)) - 1)
                self.body = None
        await self.send(message)


def _members(body: bytes) -> int:
    """How many jobs a group answer holds (1 if it cannot be read: the admission's own)."""
    try:
        jobs = json.loads(body).get("jobs")
    except (ValueError, AttributeError):
        return 1
    return len(jobs) if isinstance(jobs, list) else 1


def rate_limit_middleware(limits: RateLimits | None) -> list[Middleware]:
    """The app's rate-limit middleware for ``limits`` (none when they are off)."""
    if limits is None or not limits.enabled:
        return []
    return [Middleware(RateLimit, limiter=RateLimiter(limits))]
