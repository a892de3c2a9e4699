"""The event stream (``GET /v1/events``), followed across reconnects, as flows (see ``_base``).

A :class:`Subscription` is one logical stream of :class:`~psik_api_core.Event`s made of
as many HTTP responses as it takes: when a response ends (the server dropped a slow
reader, or is shutting down) or breaks (a reset, heartbeats that stopped coming), it
asks again with ``Last-Event-ID`` set to the last id it handed out, and the server
replays what came meanwhile. Ids only grow, so any event at or below that id is a
repeat and is skipped: nothing is handed out twice. Reconnects back off (quick at
first, at most :data:`RECONNECT_CAP` seconds apart) and give up after
:data:`RECONNECT_FOR` seconds without an answer, with the last failure's error.

The server sends a heartbeat comment every 15 s (its default), so a stream's read
timeout is a few of those (:data:`STREAM_READ_TIMEOUT`), not the client's timeout for
ordinary requests: a quiet stream stays open, a dead one is noticed.

A server older than the stream answers 404 or 405: :class:`EventsUnavailable`, which
``wait`` turns into polling and ``watch`` into the server's own error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import httpx
import pydantic

from psik_api_core import Event, JobSummary

from ._base import Close, Emit, EmitFlow, Flow, Read, ReadChunk, Sleep, Stream
from ._exceptions import (
    APIResponseValidationError,
    InvalidRequestError,
    error_from_response,
    error_from_transport,
)
from ._inputs import path_jobid
from ._pagination import Params, StateFilter, job_query
from ._retry import is_transient, parse_retry_after
from ._sse import SSEParser
from ._types import DEFAULT_OPTIONS, RequestOptions

if TYPE_CHECKING:
    from ._base import BaseClient

#: The read timeout of a stream: four of the server's default heartbeat intervals.
STREAM_READ_TIMEOUT = 60.0
#: How long reconnecting is tried before the stream is given up.
RECONNECT_FOR = 60.0
#: The longest pause between two reconnects.
RECONNECT_CAP = 5.0
#: Up to this many jobs are named in the request (``jobs=``); more are filtered here,
#: from all of the caller's events, so that the URL stays short.
MAX_NAMED_JOBS = 100

_EVENT = pydantic.TypeAdapter(Event)
_SSE = {"Accept": "text/event-stream"}

#: ``jobs=`` of ``watch``: one job (an id or a job) or several.
JobsArg = str | JobSummary | Iterable[str | JobSummary] | None


class StreamGap(Exception):
    """The stream had to be opened again before any event said where it was: events
    in between may be missed, so whoever needs all of them must look again."""


class EventsUnavailable(Exception):
    """The server has no event stream (404 or 405 on ``/v1/events``): ``response``."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"no event stream at {response.request.url.path} (HTTP {response.status_code})")
        self.response = response


def event_params(*, jobs: Iterable[str] | None = None, state: StateFilter = None) -> Params:
    """The query of ``GET /v1/events``: only these jobs, only these job states."""
    params: Params = [("jobs", path_jobid(j)) for j in jobs] if jobs is not None else []
    return params + job_query(state=state)


def watched_ids(jobs: JobsArg) -> list[str] | None:
    """``jobs=`` of ``watch`` as checked ids (None: all of the caller's jobs)."""
    if jobs is None:
        return None
    if isinstance(jobs, str | JobSummary):
        jobs = [jobs]
    return [path_jobid(j.jobid if isinstance(j, JobSummary) else j) for j in jobs]


class Subscription:
    """One stream of events across reconnects (see the module docstring). Its flows
    are driven by the flow that owns it; :meth:`close` ends the response in use.

    ``after`` (an event id) replays the events after it first; without it the stream
    starts with the events after the moment it is opened. ``read_timeout`` is the
    longest silence (no event, no heartbeat) a response is trusted for; the other
    phases of the timeout are those of ``options`` (else the client's).

    A reconnect resumes from the last event id seen. With none yet (no ``after``, no
    event, and no ``id`` from the server), it cannot: with ``gaps=False`` it raises
    :class:`StreamGap` instead, for the caller to open a new subscription and look at
    the jobs again; with ``gaps=True`` it opens the stream from now on (``watch``)."""

    def __init__(
        self,
        api: BaseClient,
        params: Params,
        *,
        after: int | None = None,
        read_timeout: float = STREAM_READ_TIMEOUT,
        options: RequestOptions = DEFAULT_OPTIONS,
        gaps: bool = False,
    ) -> None:
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise InvalidRequestError(f"after= is an event id (an int >= 0), not {after!r}")
        if isinstance(read_timeout, bool) or not read_timeout > 0:
            raise InvalidRequestError(f"read_timeout must be > 0 seconds, not {read_timeout!r}")
        self._api = api
        self._gaps = gaps
        self._params = params
        self._options = options
        self._read_timeout = read_timeout
        #: The id of the last event handed out (or ``after``): what a reconnect resumes from.
        self.last_id = after
        self._response: httpx.Response | None = None
        self._parser = SSEParser()
        self._ready: deque[Event] = deque()
        self._read_limit = read_timeout  # the read timeout of the response in use
        self._failures = 0  # reconnects in a row that got no event
        self._failing_since: float | None = None  # when opening began to fail
        self._delivered = False  # the response in use gave an event

    def open(self) -> Flow[None]:
        """Open the stream, retrying as the module docstring says; once this returns
        the server has subscribed us, so no later event is missed. Raises
        :class:`EventsUnavailable` for a server without the stream."""
        opened = yield from self._reconnect(None)
        assert opened  # no deadline

    def try_open(self, deadline: float | None = None) -> Flow[bool]:
        """Open the stream with one request; False if that failed, however it failed
        (the caller has another way: polling)."""
        request = self._request(deadline)
        outcome = yield Stream(request)
        try:
            answer = yield from self._accepted(request, outcome)
        except (EventsUnavailable, APIResponseValidationError):
            return False
        return isinstance(answer, httpx.Response) and answer.is_success

    def next(self, deadline: float | None = None) -> Flow[Event | None]:
        """The next event not handed out before, reconnecting as needed; None once
        ``deadline`` (of the client's clock) has passed."""
        clock = self._api._clock
        while not self._ready:
            if deadline is not None and clock() >= deadline:
                return None
            if self._response is None:
                if self.last_id is None and not self._gaps:
                    raise StreamGap()
                if not (yield from self._reconnect(deadline)):
                    return None
            assert self._response is not None
            chunk = yield ReadChunk(self._response)
            if isinstance(chunk, bytes):
                self._take(chunk)
                # The next read may wait _read_limit: never (much) past the deadline.
                late = deadline is not None and clock() + self._read_limit > deadline + 0.5
                if late and not self._ready:
                    yield from self._drop()
                continue
            if chunk is not None and not isinstance(chunk, httpx.TransportError):
                raise RuntimeError(f"a flow driver answered a chunk read with {chunk!r}")
            # The server ended the response, or it broke: resume from the last id at
            # once, unless it gave nothing (then back off: it may do so again).
            if not self._delivered:
                self._failures += 1
            yield from self._drop()
        return self._ready.popleft()

    def close(self) -> Flow[None]:
        """End the response in use, if any (on a normal end: a flow that raises or is
        closed has its responses closed by the driver)."""
        yield from self._drop()

    # ---- the parts ----

    def _request(self, deadline: float | None) -> httpx.Request:
        api = self._api
        default = self._options.timeout_for(api._timeout)
        read = self._read_timeout
        if deadline is not None:
            read = max(0.001, min(read, deadline - api._clock()))
        self._read_limit = read
        timeout = httpx.Timeout(connect=default.connect, read=read, write=default.write, pool=default.pool)
        headers = dict(_SSE)
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        options = RequestOptions(timeout, self._options.extra_headers)
        return api._build_request("GET", "/v1/events", params=self._params, headers=headers, options=options)

    def _accepted(
        self, request: httpx.Request, outcome: object
    ) -> Flow[httpx.Response | httpx.TransportError]:
        """``outcome`` of opening: the stream (now in use), an error response (its
        body read), or a transport error. Raises :class:`EventsUnavailable` on
        404/405, :class:`APIResponseValidationError` for a 2xx that is not a stream."""
        if isinstance(outcome, httpx.TransportError):
            return outcome
        if not isinstance(outcome, httpx.Response):
            raise RuntimeError(f"a flow driver answered a request with {outcome!r}")
        if outcome.is_success:
            kind = outcome.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if kind != "text/event-stream":
                yield Close(outcome)
                raise APIResponseValidationError(
                    f"GET {request.url.path} answered {kind or 'no Content-Type'}, not text/event-stream",
                    response=outcome,
                )
            self._response, self._parser, self._delivered = outcome, SSEParser(), False
            return outcome
        body = yield Read(outcome)
        if isinstance(body, httpx.TransportError):
            return body
        if outcome.status_code in (404, 405):
            raise EventsUnavailable(outcome)
        return outcome

    def _reconnect(self, deadline: float | None) -> Flow[bool]:
        """Open the stream again, backing off while it fails; False if ``deadline``
        passed first. A failure that will not go away by itself is raised at once;
        others once they lasted :data:`RECONNECT_FOR` seconds."""
        clock = self._api._clock
        retry_after: float | None = None
        while True:
            if self._failures:
                delay = retry_after if retry_after is not None else self._backoff()
                if deadline is not None:
                    if clock() >= deadline:
                        return False
                    delay = min(delay, deadline - clock())
                yield Sleep(delay)
            request = self._request(deadline)
            outcome = yield Stream(request)
            answer = yield from self._accepted(request, outcome)
            if isinstance(answer, httpx.Response) and answer.is_success:
                self._failing_since = None
                return True
            if isinstance(answer, httpx.Response):
                if not is_transient(answer):
                    raise error_from_response(answer)
                retry_after = parse_retry_after(answer.headers.get("Retry-After"))
            elif isinstance(answer, httpx.UnsupportedProtocol | httpx.ProxyError):
                raise error_from_transport(answer, request, self._api._where()) from answer
            now = clock()
            if self._failing_since is None:
                self._failing_since = now
            elif now - self._failing_since > RECONNECT_FOR:
                if isinstance(answer, httpx.TransportError):
                    raise error_from_transport(answer, request, self._api._where()) from answer
                raise error_from_response(answer)
            self._failures += 1

    def _backoff(self) -> float:
        """Quick at first (a server restarting is back within a second or two), then
        doubling, with jitter so that many clients do not come back at once."""
        base = min(RECONNECT_CAP, 0.05 * 2.0**self._failures)
        return base * (1.0 - 0.25 * self._api._retry.rng())

    def _take(self, chunk: bytes) -> None:
        for message in self._parser.feed(chunk):
            if message.event != "status":
                continue  # a kind of event this client does not know
            try:
                event = _EVENT.validate_json(message.data)
            except pydantic.ValidationError as exc:
                assert self._response is not None
                raise APIResponseValidationError(
                    f"unexpected event in GET {self._response.request.url.path}: "
                    f"{exc.error_count()} validation error(s), first: {exc.errors()[0]['msg']}",
                    response=self._response,
                ) from exc
            if self.last_id is not None and event.id <= self.last_id:
                continue  # replayed after a reconnect: handed out already
            self.last_id = event.id
            self._ready.append(event)
            self._delivered, self._failures = True, 0
        # The server may say where the stream stands before any event: resume from there.
        cursor = self._parser.last_event_id
        if cursor is not None and cursor.isascii() and cursor.isdigit():
            self.last_id = max(int(cursor), self.last_id or 0)

    def _drop(self) -> Flow[None]:
        if self._response is not None:
            response, self._response = self._response, None
            yield Close(response)


def watch_flow(
    api: BaseClient,
    *,
    jobs: JobsArg = None,
    state: StateFilter = None,
    after: int | None = None,
    read_timeout: float = STREAM_READ_TIMEOUT,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> EmitFlow[Event]:
    """Emit every event of the caller's jobs (or of ``jobs``; with ``state``, only
    those whose job is then in one of these states), for as long as the caller
    iterates. A server without the stream raises its own 404/405 error."""
    params = event_params(jobs=watched_ids(jobs), state=state)
    # Without after= and before the first event, a reconnect starts from then on:
    # there is nothing to resume from.
    sub = Subscription(api, params, after=after, read_timeout=read_timeout, options=options, gaps=True)
    try:
        yield from sub.open()
        while True:
            event = yield from sub.next()
            assert event is not None  # no deadline
            yield Emit(event)
    except EventsUnavailable as exc:
        raise error_from_response(exc.response) from None
