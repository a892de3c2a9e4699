"""Waiting for jobs to end, written once as flows (see ``_base``).

Waiting only ever reads: on timeout it raises :class:`WaitTimeout` and leaves the
job running, since giving up waiting is not a decision to stop the work.

With ``events`` (the client's ``events``: on by default over httpx's network
transports) a wait first subscribes to the event stream (``GET /v1/events``; once its
headers are in, no later change is missed), then reads the jobs' current states, then
only listens: a job's end is known within
milliseconds. Waiting for N jobs costs one stream and one list request per 1,000 jobs,
then, once every job is final, one ``GET /v1/jobs?view=full`` per 1,000 jobs for the
whole jobs returned: O(1) requests, not one per job. A server without the stream
(404/405), a stream that cannot be opened, or one lost for good, and the wait goes on
by polling: one request per round for all pending jobs (and one for the whole jobs of
those that ended in that round), quick at first, backing off to ``poll_interval``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

from psik_api_core import LIMITS, Group, Job, JobState, JobStatus, JobSummary
from psik_api_core.models import jobs_table

from ._base import BaseClient, Flow, Sleep
from ._events import MAX_NAMED_JOBS, EventsUnavailable, StreamGap, Subscription, event_params
from ._exceptions import APIConnectionError, InvalidRequestError, WaitTimeout
from ._groups import group_flow
from ._inputs import path_jobid
from ._pagination import page_params
from ._progress import Progress, reporter
from ._retry import PollBackoff
from ._types import DEFAULT_OPTIONS, RequestOptions


def wait_flow(
    api: BaseClient,
    jobid: str,
    *,
    timeout: float | None,
    poll_interval: float,
    options: RequestOptions = DEFAULT_OPTIONS,
    events: bool = False,
) -> Flow[Job]:
    """Wait until the job is final (listening to events, else polling its state),
    then return the whole job. ``options`` apply to every request."""
    path_jobid(jobid)
    _check_interval(poll_interval)
    deadline = None if timeout is None else api._clock() + timeout
    if events:
        job = yield from _listen_one(
            api, jobid, timeout=timeout, deadline=deadline, poll_interval=poll_interval, options=options
        )
        if job is not None:
            return job
    backoff = PollBackoff(cap=poll_interval)
    while True:
        status = yield from api._state_flow(jobid, options)
        if status.state.is_final:
            job = yield from api._get_flow(jobid, options)
            if job.state.is_final:  # else it was restarted meanwhile: keep waiting
                return job
        delay = _next_delay(api, backoff, deadline)
        if delay is None:
            raise _one_timeout(jobid, timeout, status)
        yield Sleep(delay)


def _listen_one(
    api: BaseClient,
    jobid: str,
    *,
    timeout: float | None,
    deadline: float | None,
    poll_interval: float,
    options: RequestOptions,
) -> Flow[Job | None]:
    """``wait_flow`` by the event stream; None if there is none (or it was lost): poll."""
    gaps = PollBackoff(cap=poll_interval)
    while True:
        sub = Subscription(api, event_params(jobs=[jobid]), options=options)
        if not (yield from sub.try_open(deadline)):
            return None
        status = yield from api._state_flow(jobid, options)
        try:
            while True:
                if status.state.is_final:
                    job = yield from api._get_flow(jobid, options)
                    if job.state.is_final:
                        yield from sub.close()
                        return job
                    status = JobStatus(jobid=jobid, state=job.state, jobndx=job.jobndx, updated=job.updated)
                event = yield from sub.next(deadline)
                if event is None:
                    raise _one_timeout(jobid, timeout, status)
                if event.jobid == jobid:
                    status = JobStatus(
                        jobid=jobid, state=event.job_state, jobndx=event.jobndx, updated=event.time
                    )
        except StreamGap:
            yield from sub.close()  # subscribe again, then look again
        except (EventsUnavailable, APIConnectionError):
            return None
        yield from _pause(api, gaps, deadline, functools.partial(_one_timeout, jobid, timeout, status))


def _one_timeout(jobid: str, timeout: float | None, status: JobStatus) -> WaitTimeout:
    # A job still new never ran: "left running" would send its user looking for it.
    fate = "it was never started" if status.state is JobState.new else "it was left running"
    return WaitTimeout(
        f"job {jobid} is not final after {timeout:g} s (last state: {status.state.value}); {fate}",
        status=status,
        pending=[jobid],
    )


def job_ids(jobs: Iterable[str | JobSummary]) -> list[str]:
    """The ids of ``jobs`` (ids, or Job/JobSummary objects), checked."""
    return [path_jobid(j.jobid if isinstance(j, JobSummary) else j) for j in jobs]


#: What ``wait_all`` waits for: ids or jobs, or a Group (all its members).
WaitArg = Iterable[str | JobSummary] | Group | None


def waited_ids(
    api: BaseClient, jobs: WaitArg, group: str | None, options: RequestOptions = DEFAULT_OPTIONS
) -> Flow[list[str]]:
    """The ids ``wait_all`` waits for, checked: ``jobs``'s, or (``group``) the members of
    that group, asked for once."""
    if (jobs is None) == (group is None):
        raise InvalidRequestError("wait_all takes jobs or group= (one of them)")
    if group is not None:
        jobs = yield from group_flow(api, group, options)
    if isinstance(jobs, Group):
        return job_ids(jobs.jobs)
    assert jobs is not None
    return job_ids(jobs)


class _Waiting:
    """What ``wait_all`` knows: the jobs still pending, the final ones fetched whole,
    the pending ones known to have ended (not yet fetched), the pending ones last seen
    ``new``; and whom to tell how many are done."""

    def __init__(self, ids: list[str], progress: Progress) -> None:
        self.pending = list(dict.fromkeys(ids))  # unique, in order
        self.watched = set(self.pending)  # the same, to look events up in
        self.total = len(self.pending)
        self.done: dict[str, Job] = {}
        self.ended: set[str] = set()
        self.never_started: set[str] = set()
        self.report = reporter(progress)
        self.reported = 0
        self.report(0, self.total)

    def close(self) -> None:
        """The wait is over, done or not: let the progress display go."""
        self.report.close()

    def seen(self, jobid: str, state: JobState) -> None:
        if state is JobState.new:
            self.never_started.add(jobid)
        else:
            self.never_started.discard(jobid)
        if state.is_final:
            self.ended.add(jobid)
        else:  # restarted since it ended
            self.ended.discard(jobid)

    def final(self, job: Job) -> None:
        self.done[job.jobid] = job
        self.ended.discard(job.jobid)

    def to_fetch(self) -> list[str]:
        """The pending jobs known to have ended, in order."""
        return [jobid for jobid in self.pending if jobid in self.ended]

    def all_ended(self) -> bool:
        """Whether every pending job is known to have ended. (``ended`` holds only
        pending jobs, and ``pending`` no fetched one once settled: counting is enough.)"""
        return len(self.ended) == len(self.pending)

    def settle(self) -> None:
        """Drop the fetched jobs from ``pending``; report if the count of the jobs
        known to be final changed."""
        if len(self.pending) + len(self.done) != self.total:  # some fetched since
            self.pending = [jobid for jobid in self.pending if jobid not in self.done]
            self.watched = set(self.pending)
        count = len(self.done) + len(self.ended)
        if count != self.reported:
            self.reported = count
            self.report(count, self.total)

    def timeout(self, timeout: float | None) -> WaitTimeout:
        pending, total = [j for j in self.pending if j not in self.ended], self.total
        new = sum(jobid in self.never_started for jobid in pending)
        fate = "they were left running"
        if new:
            rest = ", the others were left running" if new < len(pending) else ""
            fate = f"{new} of them were never started (state new){rest}"
        return WaitTimeout(
            f"{len(pending)} of {total} jobs not final after {timeout:g} s (first: {pending[0]}); {fate}",
            pending=pending,
        )


def wait_all_flow(
    api: BaseClient,
    jobs: WaitArg,
    *,
    group: str | None = None,
    timeout: float | None,
    poll_interval: float,
    progress: Progress,
    options: RequestOptions = DEFAULT_OPTIONS,
    events: bool = False,
) -> Flow[list[Job]]:
    """Wait until every job (of ``jobs``, or of ``group``) is final, listening to events
    (else polling all pending jobs with one list request per round: ``id=`` repeated, as
    many per request as the server's limits allow); return the jobs in the order given."""
    _check_interval(poll_interval)
    ids = yield from waited_ids(api, jobs, group, options)
    waiting = _Waiting(ids, progress)
    try:
        deadline = None if timeout is None else api._clock() + timeout
        if events and waiting.pending:
            yield from _listen_all(
                api, waiting, timeout=timeout, deadline=deadline, poll_interval=poll_interval, options=options
            )
        backoff = PollBackoff(cap=poll_interval)
        while waiting.pending:
            yield from _round(api, waiting, options)
            waiting.settle()
            if not waiting.pending:
                break
            delay = _next_delay(api, backoff, deadline)
            if delay is None:
                raise waiting.timeout(timeout)
            yield Sleep(delay)
    finally:
        waiting.close()
    return jobs_table(waiting.done[jobid] for jobid in ids)  # a notebook shows one table


def _listen_all(
    api: BaseClient,
    waiting: _Waiting,
    *,
    timeout: float | None,
    deadline: float | None,
    poll_interval: float,
    options: RequestOptions,
) -> Flow[None]:
    """``wait_all_flow`` by the event stream, until every job is final; returns early
    (with jobs still pending) if there is no stream or it was lost: poll the rest.
    Jobs that end are only noted; once all have, they are fetched whole together."""
    gaps = PollBackoff(cap=poll_interval)
    while waiting.pending:
        # Many jobs: all of the caller's events, filtered here, keep the URL short.
        named = waiting.pending if len(waiting.pending) <= MAX_NAMED_JOBS else None
        sub = Subscription(api, event_params(jobs=named), options=options)
        if not (yield from sub.try_open(deadline)):
            return
        yield from _round(api, waiting, options)
        waiting.settle()
        try:
            while waiting.pending:
                if waiting.all_ended():
                    # A job restarted meanwhile comes back not final: listen on for it.
                    yield from _fetch(api, waiting, waiting.to_fetch(), options)
                    waiting.settle()
                    continue
                event = yield from sub.next(deadline)
                if event is None:
                    raise waiting.timeout(timeout)
                if event.jobid not in waiting.watched:
                    continue
                waiting.seen(event.jobid, event.job_state)
                waiting.settle()
        except StreamGap:
            pass  # subscribe again, then look again
        except (EventsUnavailable, APIConnectionError):
            return
        yield from sub.close()
        if waiting.pending:
            yield from _pause(api, gaps, deadline, lambda: waiting.timeout(timeout))


def _pause(
    api: BaseClient, backoff: PollBackoff, deadline: float | None, timed_out: Callable[[], WaitTimeout]
) -> Flow[None]:
    """Wait a little before subscribing again (a server that ends every stream at once
    must not have us ask in a tight loop); raise ``timed_out()`` past the deadline."""
    delay = _next_delay(api, backoff, deadline)
    if delay is None:
        raise timed_out()
    yield Sleep(delay)


def _round(api: BaseClient, waiting: _Waiting, options: RequestOptions) -> Flow[None]:
    """Ask for the state of every pending job, with as few list requests as the
    server's limits allow; fetch the final ones whole, together."""
    pending = waiting.pending
    for chunk in _batches(pending):
        params = [("id", jobid) for jobid in chunk]
        page = yield from api._page_flow(page_params(params, limit=len(chunk), cursor=None), options)
        states = {s.jobid: s.state for s in page.items}
        for jobid in chunk:
            state = states.get(jobid)
            if state is None:
                # Not in the list (purged, or not ours): ask for it alone, so the
                # server's own error (404, 403) is what the caller sees.
                state = (yield from api._state_flow(jobid, options)).state
            waiting.seen(jobid, state)
    yield from _fetch(api, waiting, waiting.to_fetch(), options)


def _fetch(api: BaseClient, waiting: _Waiting, ids: list[str], options: RequestOptions) -> Flow[None]:
    """Fetch the jobs ``ids`` (known to have ended) whole, as few at once as the
    server's limits allow (``view=full``); one that is not final any more (restarted
    meanwhile) is pending again."""
    for chunk in _batches(ids):
        params = page_params([("id", jobid) for jobid in chunk], limit=len(chunk), cursor=None)
        page = yield from api._full_page_flow(params, options)
        whole = {item.jobid: item for item in page.items if isinstance(item, Job)}
        for jobid in chunk:
            job = whole.get(jobid)
            if job is None:
                # A summary (its directory unreadable) or gone: ask for it alone, so
                # the server's own error is what the caller sees.
                job = yield from api._get_flow(jobid, options)
            if job.state.is_final:
                waiting.final(job)
            else:
                waiting.seen(jobid, job.state)


def _batches(ids: list[str]) -> Iterator[list[str]]:
    """``ids`` in lists that fit both the id filter and one page of answers."""
    batch = min(LIMITS.max_ids, LIMITS.max_page_size)
    for start in range(0, len(ids), batch):
        yield ids[start : start + batch]


def _next_delay(api: BaseClient, backoff: PollBackoff, deadline: float | None) -> float | None:
    """How long to sleep before the next poll; None once the deadline has passed."""
    delay = backoff.next()
    if deadline is None:
        return delay
    remaining = deadline - api._clock()
    return None if remaining <= 0 else min(delay, remaining)


def _check_interval(poll_interval: float) -> None:
    if not poll_interval > 0:
        raise InvalidRequestError(f"poll_interval must be > 0 seconds, not {poll_interval}")
