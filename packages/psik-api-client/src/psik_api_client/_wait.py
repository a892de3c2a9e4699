"""Waiting for jobs to end, written once as flows (see ``_base``).

Waiting only ever reads: on timeout it raises :class:`WaitTimeout` and leaves the
job running, since giving up waiting is not a decision to stop the work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from psik_api_core import LIMITS, Job, JobState, JobSummary

from ._base import BaseClient, Flow, Sleep
from ._exceptions import InvalidRequestError, WaitTimeout
from ._inputs import path_jobid
from ._pagination import page_params
from ._retry import PollBackoff
from ._types import DEFAULT_OPTIONS, RequestOptions

#: ``progress=`` of ``wait_all``: False, True (a line on stderr) or ``f(done, total)``.
Progress = bool | Callable[[int, int], None]


def wait_flow(
    api: BaseClient,
    jobid: str,
    *,
    timeout: float | None,
    poll_interval: float,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[Job]:
    """Poll the job's state until it is final, then return the whole job. ``options``
    apply to every request."""
    path_jobid(jobid)
    _check_interval(poll_interval)
    deadline = None if timeout is None else api._clock() + timeout
    backoff = PollBackoff(cap=poll_interval)
    while True:
        status = yield from api._state_flow(jobid, options)
        if status.state.is_final:
            job = yield from api._get_flow(jobid, options)
            if job.state.is_final:  # else it was restarted meanwhile: keep waiting
                return job
        delay = _next_delay(api, backoff, deadline)
        if delay is None:
            # A job still new never ran: "left running" would send its user looking for it.
            fate = "it was never started" if status.state is JobState.new else "it was left running"
            raise WaitTimeout(
                f"job {jobid} is not final after {timeout:g} s (last state: {status.state.value}); {fate}",
                status=status,
                pending=[jobid],
            )
        yield Sleep(delay)


def job_ids(jobs: Iterable[str | JobSummary]) -> list[str]:
    """The ids of ``jobs`` (ids, or Job/JobSummary objects), checked."""
    return [path_jobid(j.jobid if isinstance(j, JobSummary) else j) for j in jobs]


def wait_all_flow(
    api: BaseClient,
    ids: list[str],
    *,
    timeout: float | None,
    poll_interval: float,
    progress: Progress,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[list[Job]]:
    """Poll all pending jobs with one list request per round (``id=`` repeated, as many
    per request as the server's limits allow) until every one is final; return the jobs
    in ``ids`` order."""
    _check_interval(poll_interval)
    report = _reporter(progress)
    pending = list(dict.fromkeys(ids))  # unique, in order
    total = len(pending)
    done: dict[str, Job] = {}
    never_started: set[str] = set()  # pending jobs last seen in state new
    deadline = None if timeout is None else api._clock() + timeout
    backoff = PollBackoff(cap=poll_interval)
    report(0, total)
    # Each request's ids must fit both the id filter and one page of answers.
    batch = min(LIMITS.max_ids, LIMITS.max_page_size)
    while pending:
        for start in range(0, len(pending), batch):
            chunk = pending[start : start + batch]
            params = [("id", jobid) for jobid in chunk]
            page = yield from api._page_flow(page_params(params, limit=len(chunk), cursor=None), options)
            states = {s.jobid: s.state for s in page.items}
            for jobid in chunk:
                state = states.get(jobid)
                if state is None:
                    # Not in the list (purged, or not ours): ask for it alone, so the
                    # server's own error (404, 403) is what the caller sees.
                    state = (yield from api._state_flow(jobid, options)).state
                if state is JobState.new:
                    never_started.add(jobid)
                else:
                    never_started.discard(jobid)
                if state.is_final:
                    job = yield from api._get_flow(jobid, options)
                    if job.state.is_final:
                        done[jobid] = job
        before = len(pending)
        pending = [jobid for jobid in pending if jobid not in done]
        if len(pending) != before:
            report(len(done), total)
        if not pending:
            break
        delay = _next_delay(api, backoff, deadline)
        if delay is None:
            new = sum(jobid in never_started for jobid in pending)
            fate = "they were left running"
            if new:
                rest = ", the others were left running" if new < len(pending) else ""
                fate = f"{new} of them were never started (state new){rest}"
            raise WaitTimeout(
                f"{len(pending)} of {total} jobs not final after {timeout:g} s (first: {pending[0]}); {fate}",
                pending=pending,
            )
        yield Sleep(delay)
    return [done[jobid] for jobid in ids]


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


def _reporter(progress: Progress) -> Callable[[int, int], None]:
    if progress is True:
        return _print_progress
    if progress is False:
        return lambda done, total: None
    return progress


def _print_progress(done: int, total: int) -> None:
    # One line, rewritten in place; the newline comes once everything is final.
    end = "\n" if done == total else ""
    print(f"\r{done}/{total} final", end=end, file=sys.stderr, flush=True)
