"""The event routes: ``GET /v1/events`` (the caller's jobs) and ``GET /v1/jobs/{jobid}/events``.

As Server-Sent Events (``text/event-stream``, the default): first every event after
``Last-Event-ID`` (or ``after``) from the index, then live ones from the
:class:`~psik_api_server.jobs.events.EventHub`, with no gap and no repeat at the seam
(the stream subscribes before it reads the index, and skips ids it has sent). A comment
every ``event_heartbeat`` seconds keeps an idle stream open through proxies; a reader
that falls behind is dropped with a comment saying so, and so are all streams when the
server stops. With ``Accept: application/json``, a long poll: the events after ``after``
as a JSON list as soon as there is one, ``[]`` at ``timeout``.

Who sees what is the job routes' rule: only the caller's own jobs, within what its
token allows (``policy.allows(read)`` for each event); another's job is 404 on the job route.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from psik_api_core import Action, JobState, Principal, ProblemCode, field_error

from ..aio import in_thread
from ..auth.authenticator import principal
from ..auth.token import JOB_CHECK_KEY
from ..context import context
from ..errors import ApiError
from ..jobs.eventlog import EventRow
from ..jobs.events import EventHub, Subscription, matcher
from ..jobs.service import JobService
from .params import Params, label_filters

SSE = "text/event-stream"
#: Events read from the index per query while a stream catches up.
REPLAY_PAGE = 1000


def _after(request: Request, params: Params) -> int | None:
    """Where the caller left off: ``Last-Event-ID`` (what a browser's EventSource
    sends on reconnecting) wins over ``after``; None: from now on."""
    header = request.headers.get("last-event-id")
    if header is not None:
        # An event id is a SQLite INTEGER: at most 2**63 - 1, as ``after`` is.
        if not (header.isascii() and header.isdigit()) or len(header) > 19 or int(header) >= 2**63:
            raise ApiError(
                ProblemCode.validation_error,
                "Last-Event-ID must be an event id (a non-negative integer)",
                errors=[field_error(["header", "Last-Event-ID"], "not an event id")],
            )
        return int(header)
    return params.integer("after")


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and SSE not in accept


async def get_events(request: Request, params: Params) -> Response:
    states = params.texts("state")
    return await _events(request, params, params.texts("jobs"), states)


async def get_job_events(request: Request, params: Params) -> Response:
    service, who, jobid = _service(request), principal(request), params.path("jobid")
    await in_thread(service.access.owned, who, jobid, Action.read)  # 404 if not the caller's
    return await _events(request, params, [jobid], params.texts("state"))


def _service(request: Request) -> JobService:
    return context(request.app).service


async def _events(request: Request, params: Params, jobids: Sequence[str], states: Sequence[str]) -> Response:
    service, who = _service(request), principal(request)
    match = matcher(
        service.policy,
        who,
        frozenset(jobids) if jobids else None,
        frozenset(JobState(s) for s in states) if states else None,
        request.scope.get("state", {}).get(JOB_CHECK_KEY),
        label_filters(params.texts("label")) if "label" in params.values else (),
    )
    feed = _Feed(service, who, list(dict.fromkeys(jobids)), match)
    after = _after(request, params)
    if _wants_json(request):
        timeout = params.integer("timeout")
        limit = params.integer("limit")
        assert timeout is not None and limit is not None  # they have defaults
        return await _long_poll(service.events, feed, after, float(timeout), limit)
    if service.events.streams >= service.events.max_streams:
        raise ApiError(
            ProblemCode.too_many_streams,
            f"{service.events.streams} event streams are open, the most this server keeps; "
            "retry later, or use the long poll (Accept: application/json)",
            headers={"Retry-After": "5"},
        )
    heartbeat = context(request.app).settings.event_heartbeat
    return EventStream(service.events, feed, after, heartbeat)


class _Feed:
    """What one caller reads from the index: its events past an id that it asked for."""

    def __init__(
        self, service: JobService, who: Principal, jobids: list[str], match: Callable[[EventRow], bool]
    ) -> None:
        self.service = service
        self.who = who
        self.jobids = jobids
        self.match = match

    async def after(self, after: int, limit: int) -> tuple[list[EventRow], int]:
        """The matching events past ``after`` (at most ``limit`` read), and the id read up to."""
        log = self.service.store.events
        rows = await in_thread(log.after, after, owner=self.who.user, jobids=self.jobids, limit=limit)
        upto = rows[-1].id if rows else after
        return [r for r in rows if self.match(r)], upto

    async def last_id(self) -> int:
        return await in_thread(self.service.store.events.last_id)


async def _long_poll(hub: EventHub, feed: _Feed, after: int | None, seconds: float, limit: int) -> Response:
    with hub.subscribe(feed.who.user, feed.match) as sub:
        if after is None:
            after = await feed.last_id()
        deadline = time.monotonic() + seconds
        while True:
            found, upto = await feed.after(after, limit)
            if found:
                return _json_events(hub, found)
            if upto > after:  # a page of others' events (a narrowed token): read on
                after = upto
                continue
            left = deadline - time.monotonic()
            if left <= 0 or sub.ended is not None:
                found, _ = await feed.after(after, limit)  # another process's, if any
                return _json_events(hub, found)
            await sub.wait(left)
            if sub.queue:
                live = [e for e in sub.take() if e.id > after]
                if live:
                    return _json_events(hub, live[:limit])


def _json_events(hub: EventHub, rows: list[EventRow]) -> Response:
    hub.count_sent(len(rows))
    body = "[" + ",".join(r.event().model_dump_json() for r in rows) + "]"
    return Response(body, media_type="application/json")


def _frame(row: EventRow) -> bytes:
    return f"id: {row.id}\nevent: status\ndata: {row.event().model_dump_json()}\n\n".encode()


class EventStream(Response):
    """The SSE response: subscribes, replays from the index, then streams live events
    until the client leaves, falls too far behind, or the server stops."""

    media_type = SSE

    def __init__(self, hub: EventHub, feed: _Feed, after: int | None, heartbeat: float) -> None:
        # As starlette's StreamingResponse: no body, so no Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.hub, self.feed, self.after, self.heartbeat = hub, feed, after, heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.hub.subscribe(self.feed.who.user, self.feed.match) as sub:
            after = self.after if self.after is not None else await self.feed.last_id()
            # Subscribed before the headers go: an event from here on is not missed.
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            async with anyio.create_task_group() as tg:

                async def until_gone() -> None:
                    # uvicorn drops what is sent after the client left: stop at its leaving.
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(until_gone)
                # The stream's place from the start: a client that loses it before any
                # event resumes from here (an id with no data sets EventSource's lastEventId).
                start = f"retry: 1000\nid: {after}\n\n".encode()
                await send({"type": "http.response.body", "body": start, "more_body": True})
                await self._stream(sub, after, send)
                tg.cancel_scope.cancel()

    async def _stream(self, sub: Subscription, sent: int, send: Send) -> None:
        async def body(chunk: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

        async def events(rows: list[EventRow]) -> None:
            await body(b"".join(map(_frame, rows)))
            self.hub.count_sent(len(rows))

        # Catch up from the index a page at a time; ``sent`` is the last id read.
        while True:
            found, upto = await self.feed.after(sent, REPLAY_PAGE)
            if found:
                await events(found)
            if upto == sent:
                break
            sent = upto
        while True:
            await sub.wait(self.heartbeat)
            live = [e for e in sub.take() if e.id > sent]
            if live:
                sent = live[-1].id
                await events(live)
            if sub.ended is not None:
                await body(f": {sub.ended}\n\n".encode(), more=False)
                return
            if not live:
                # Quiet for a heartbeat: look in the index too (another server process
                # sharing it commits events this one never hears of), then say we're here.
                found, upto = await self.feed.after(sent, REPLAY_PAGE)
                if found:
                    await events(found)
                sent = max(sent, upto)
                await body(b": keep-alive\n\n")
