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
  ``submit_burst``: by default the largest group). A group counts as its number of
  jobs: it is let in for one, and once made, the rest of its jobs are taken from the
  bucket, which may go below zero; the identity then submits nothing until the debt is
  paid. So one request of many jobs is no way around the submit rate, and still makes
  them all at once. (A replay of a group under its ``Idempotency-Key`` counts again.)
* **At once**: at most ``concurrent`` requests of an identity are in progress; the
  next ones wait their turn (:class:`Turns`: an event awaited, no CPU), first come first
  served, up to ``queued`` of them; past that, 429. So a flood queues behind itself
  while others' requests go straight in. An answer that streams (no ``Content-Length``:
  a log followed, a file downloaded) gives its turn back when it starts; the event
  routes take none (a stream lasts, and a long poll waits before it answers).
* **Free**: the health check, the OpenAPI document and the docs page, and the jobs'
  signed callbacks (:data:`~psik_api_server.http.openapi.RATE_LIMIT_EXEMPT`); a request
  refused before its caller is known (401, 403) costs nothing here either.
* **Past the limit**: 429 ``rate_limited``, ``Retry-After`` the whole seconds (rounded
  up) until the request would be let in (1 past ``queued``); nothing was done, so any
  request may be sent again (the client does). A refusal costs the server about as much
  as a cheap answer (TLS, HTTP, the checks), so a client that does not wait as told
  would cost the others still: a refusal less than a second after the identity's last
  one is held :data:`REFUSAL_HOLD` before it is sent (an await, no CPU; at most
  ``queued`` at once per identity), which bounds such a flood by its connections.

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
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
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
#: The event routes, which take no turn (the module doc), matched as the router does.
_EVENTS = re.compile(r"/v1/(jobs/[^/]+/)?events$")
#: Identities whose buckets are kept at most (a pair is ~200 bytes).
MAX_IDENTITIES = 100_000
#: Seconds a refusal is held when it follows another of its identity within a second.
REFUSAL_HOLD = 0.5


@dataclass
class _Buckets:
    """One identity's tokens, as of ``at`` (the limiter's clock)."""

    requests: float
    submits: float
    at: float
    #: When both are full again, at the latest: past it the pair is a new one's.
    full_at: float
    #: When the identity was last refused.
    refused_at: float = -math.inf


@dataclass(frozen=True)
class Refusal:
    """Why a request is not let in: the limit it is over and the seconds until it would be."""

    submits: bool
    wait: float
    #: Over ``concurrent`` with ``queued`` waiting already (then ``wait`` is 1).
    busy: bool = False

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
        self._submit_burst = float(limits.submit_burst)
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

    def refused(self, identity: str) -> bool:
        """Note a refusal of ``identity``: whether it comes less than a second after the
        last one (its client did not wait as told)."""
        now = self._clock()
        b = self._current(identity, now)
        again, b.refused_at = now - b.refused_at < 1.0, now
        return again

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
    if refusal.busy:
        what = (
            f"its limit of {limits.concurrent} requests in progress at once, with"
            f" {limits.queued} more waiting their turn"
        )
    elif refusal.submits:
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


@dataclass
class _Queue:
    """One identity's requests in progress, and the turns awaited, oldest first."""

    running: int = 0
    waiting: deque[anyio.Event] = field(default_factory=deque)


class Turns:
    """At most ``concurrent`` requests per identity in progress, up to ``queued`` more
    waiting their turn (the module doc). Kept only for identities with a request in
    progress. The event loop's own, as :class:`RateLimiter`."""

    def __init__(self, concurrent: int, queued: int) -> None:
        self.concurrent = concurrent
        self.queued = queued
        self._queues: dict[str, _Queue] = {}

    def __len__(self) -> int:
        """How many identities have a request in progress."""
        return len(self._queues)

    def full(self, identity: str) -> bool:
        """Whether ``identity`` has no turn free and no room left to wait for one."""
        q = self._queues.get(identity)
        return q is not None and q.running >= self.concurrent and len(q.waiting) >= self.queued

    def waiting(self, identity: str) -> int:
        """How many of ``identity``'s requests wait their turn."""
        q = self._queues.get(identity)
        return 0 if q is None else len(q.waiting)

    async def take(self, identity: str) -> None:
        """A turn for ``identity``: at once if one is free, else when it is handed over."""
        q = self._queues.setdefault(identity, _Queue())
        if q.running < self.concurrent and not q.waiting:
            q.running += 1
            return
        turn = anyio.Event()
        q.waiting.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self.give_back(identity)  # handed over as it was cancelled: pass it on
            else:
                q.waiting.remove(turn)
            raise

    def give_back(self, identity: str) -> None:
        """End a turn of ``identity``: hand it to the next in line, if any."""
        q = self._queues[identity]
        if q.waiting:
            q.waiting.popleft().set()  # still running: the turn changes hands
            return
        q.running -= 1
        if q.running == 0:
            del self._queues[identity]


class RateLimit:
    """Pure ASGI middleware: the limits of :class:`RateLimiter` and :class:`Turns`, per
    identity (the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        turns: Turns | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.turns = turns
        self._sleep = sleep
        #: Refusals held now, per identity (the module doc).
        self._held: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        identity = identity_of(scope) if scope["type"] == "http" and path not in EXEMPT_PATHS else None
        if identity is None:
            await self.app(scope, receive, send)
            return
        turns = self.turns if self.turns is not None and _EVENTS.match(path) is None else None
        submit = scope.get("method") == "POST" and _SUBMIT.match(path) is not None
        # Nothing is taken from the buckets for a request that cannot even wait.
        refused = Refusal(False, 1.0, busy=True) if turns is not None and turns.full(identity) else None
        refused = refused or self.limiter.admit(identity, submit=submit)
        if refused is not None:
            error = refusal_error(identity, refused, self.limiter.limits)
            response = problem_response(error, path)
            held = self._held.get(identity, 0)
            if self.limiter.refused(identity) and held < max(1, self.limiter.limits.queued):
                self._held[identity] = held + 1
                try:
                    await self._sleep(REFUSAL_HOLD)
                finally:
                    self._release_hold(identity)
            await response(scope, receive, send)
            return
        if submit and path.startswith(_GROUP):
            send = _GroupCount(send, identity, self.limiter)
        if turns is None:
            await self.app(scope, receive, send)
            return
        await turns.take(identity)
        turn = _Turn(send, identity, turns)
        try:
            await self.app(scope, receive, turn)
        finally:
            turn.end()

    def _release_hold(self, identity: str) -> None:
        left = self._held[identity] - 1
        if left:
            self._held[identity] = left
        else:
            del self._held[identity]


class _Turn:
    """The ``send`` of a request holding a turn: gives it back when an answer that
    streams (no ``Content-Length``) starts, or at :meth:`end`, whichever comes first."""

    def __init__(self, send: Send, identity: str, turns: Turns) -> None:
        self.send = send
        self.identity = identity
        self.turns: Turns | None = turns

    def end(self) -> None:
        if self.turns is not None:
            self.turns.give_back(self.identity)
            self.turns = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not any(
            name.lower() == b"content-length" for name, _ in message.get("headers", ())
        ):
            self.end()
        await self.send(message)


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
    turns = Turns(limits.concurrent, limits.queued) if limits.concurrent > 0 else None
    return [Middleware(RateLimit, limiter=RateLimiter(limits), turns=turns)]
