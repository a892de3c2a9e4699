"""Live events: the hub that hands each committed event to the streams that want it.

The event log (:mod:`.eventlog`) calls :meth:`EventHub.publish` from the thread that
committed; the hub moves the events to the event loop and offers them to the
subscriptions of the jobs' owners, one commit at a time. A reader that has left
``buffer`` events untaken when the next commit comes is dropped (its stream ends with a
comment saying so), and resumes with ``Last-Event-ID`` losing nothing, since every event
is in the index. A commit is queued whole: one larger than the buffer (a job that wrote
many rows at once) must not drop a reader that keeps up, which had no turn to take
them; so a subscription holds at most ``buffer`` events and one commit's.

A stream subscribes *before* it reads what it missed from the index, so an event
committed meanwhile is either in that read or delivered live (or both: the stream skips
ids it has sent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from psik_api_core import Action, JobState, Policy, Principal

from .eventlog import EventRow

#: Why a subscription ended, as its stream's last comment says.
DROPPED = "dropped: this reader fell too far behind; resume with Last-Event-ID"
SHUTDOWN = "server shutting down; resume with Last-Event-ID"


class Subscription:
    """One stream's share of the live events (used on the event loop only)."""

    def __init__(self, match: Callable[[EventRow], bool], buffer: int) -> None:
        self.match = match
        self.buffer = buffer
        self.queue: deque[EventRow] = deque()
        self.ended: str | None = None
        self._wake = asyncio.Event()

    def offer(self, events: list[EventRow]) -> bool:
        """Queue the wanted ones of one commit's ``events``; False (none queued) if the
        reader left a full buffer untaken since the last commit: drop it."""
        if len(self.queue) >= self.buffer:
            return False
        wanted = [e for e in events if self.match(e)]
        if wanted:
            self.queue.extend(wanted)
            self._wake.set()
        return True

    def end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        self._wake.set()

    async def wait(self, seconds: float) -> None:
        """Until an event is queued or the subscription ended, at most ``seconds``."""
        if self.queue or self.ended is not None:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def take(self) -> list[EventRow]:
        out = list(self.queue)
        self.queue.clear()
        return out


def matcher(
    policy: Policy,
    who: Principal,
    jobids: frozenset[str] | None,
    states: frozenset[JobState] | None,
    may_read: Callable[[str], bool] | None = None,
    labels: Sequence[tuple[str, str]] = (),
) -> Callable[[EventRow], bool]:
    """Whether an event of the caller's own jobs is one ``who`` may read and asked for
    (``may_read``: what a token that names jobs allows, job by job)."""

    def match(e: EventRow) -> bool:
        return (
            (jobids is None or e.jobid in jobids)
            and (states is None or e.job_state in states)
            and policy.allows(who, Action.read, e.owner, e.jobid)
            and all(e.labels.get(k) == v for k, v in labels)
            and (may_read is None or may_read(e.jobid))
        )

    return match


class EventHub:
    """The live subscriptions, by owner (built without a loop; :meth:`bind` at start)."""

    def __init__(self, *, buffer: int = 10_000, max_streams: int = 900) -> None:
        self.buffer = buffer
        self.max_streams = max_streams
        self._subs: dict[str, set[Subscription]] = {}
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        #: Events sent to readers (streams and long polls) so far, for the metrics.
        self.sent = 0

    @property
    def streams(self) -> int:
        """How many subscriptions are open."""
        return self._count

    def count_sent(self, n: int) -> None:
        """``n`` events were sent to a reader (on the event loop)."""
        self.sent += n

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.closed = False

    def publish(self, events: list[EventRow]) -> None:
        """Committed ``events`` (id order), from any thread."""
        loop = self._loop
        if loop is None or not self._count:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[EventRow]) -> None:
        by_owner: dict[str, list[EventRow]] = {}
        for event in events:
            by_owner.setdefault(event.owner, []).append(event)
        for owner, theirs in by_owner.items():
            for sub in list(self._subs.get(owner, ())):
                if not sub.offer(theirs):
                    sub.end(DROPPED)
                    self._remove(owner, sub)

    @contextlib.contextmanager
    def subscribe(self, owner: str, match: Callable[[EventRow], bool]) -> Iterator[Subscription]:
        """A subscription to the events of ``owner``'s jobs that ``match``, for the block."""
        sub = Subscription(match, self.buffer)
        if self.closed:
            sub.end(SHUTDOWN)
        self._subs.setdefault(owner, set()).add(sub)
        self._count += 1
        try:
            yield sub
        finally:
            self._remove(owner, sub)

    def _remove(self, owner: str, sub: Subscription) -> None:
        subs = self._subs.get(owner)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self._count -= 1
            if not subs:
                del self._subs[owner]

    def close(self) -> None:
        """End every stream (the server is stopping) and refuse new ones."""
        self.closed = True
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.end(SHUTDOWN)
