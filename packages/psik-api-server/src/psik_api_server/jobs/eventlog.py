"""The event log: every row of every job's history, numbered server-wide, in the index.

Each time the server records a job's state from a read of its status.csv
(:meth:`.store.JobStore.set_state` with the rows read), the rows it had not seen yet
become events, in the same transaction as the state: ``jobs.rows_seen`` counts the
rows already logged (status.csv is only ever appended to, so the new rows are the ones
past that count). An event's id is SQLite's AUTOINCREMENT: it only grows, across
restarts too, and rows a job wrote while the server was down become events at
start-up, after every event from before.

Once a transaction that logged events commits, they are handed to :attr:`EventLog.on_commit`
(the :class:`~.events.EventHub`), in id order, for the live streams.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psik_api_core import Event, JobState, derive_state, run_outcome, utc

if TYPE_CHECKING:
    from .directory import Row
    from .store import JobStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    jobid     TEXT NOT NULL,
    owner     TEXT NOT NULL,
    jobndx    INTEGER NOT NULL,
    state     TEXT NOT NULL,
    info      TEXT NOT NULL,
    time      REAL NOT NULL,
    job_state TEXT NOT NULL,
    native_id TEXT,
    exit_code INTEGER,
    labels    TEXT -- the job's labels as JSON (NULL: none), for ?label= on the stream
);
CREATE INDEX IF NOT EXISTS events_by_owner ON events (owner, id);
CREATE INDEX IF NOT EXISTS events_by_job ON events (jobid, id);
"""

#: Past this many rows in a job's history, the job's state after each new row is not
#: derived row by row (each derivation reads the whole history): every event of one
#: read then carries the state after the last row. Only a job writing its own
#: status.csv reaches it.
EXACT_ROWS = 256
#: At most this many new rows of one read become events: a job that appends thousands
#: of rows at once (it can write its own status.csv) gets its last ones logged.
MAX_NEW = 1000
#: The longest ``info`` an event carries (a row's info is bounded only by the file's size).
MAX_INFO = 4096

_COLUMNS = "id, jobid, owner, jobndx, state, info, time, job_state, native_id, exit_code, labels"


@dataclass(frozen=True)
class EventRow:
    """An event as the index holds it (with its job's owner, which the wire form leaves out)."""

    id: int
    jobid: str
    owner: str
    jobndx: int
    state: JobState
    info: str
    time: float
    job_state: JobState
    native_id: str | None
    exit_code: int | None
    labels: dict[str, str] = field(default_factory=dict)

    def event(self) -> Event:
        return Event(
            id=self.id,
            jobid=self.jobid,
            jobndx=self.jobndx,
            state=self.state,
            info=self.info,
            time=utc(self.time),
            job_state=self.job_state,
            native_id=self.native_id,
            exit_code=self.exit_code,
        )


def _event_row(r: Sequence[Any]) -> EventRow:
    return EventRow(
        id=int(r[0]),
        jobid=str(r[1]),
        owner=str(r[2]),
        jobndx=int(r[3]),
        state=JobState(str(r[4])),
        info=str(r[5]),
        time=float(r[6]),
        job_state=JobState(str(r[7])),
        native_id=None if r[8] is None else str(r[8]),
        exit_code=None if r[9] is None else int(r[9]),
        labels={} if not r[10] else dict(json.loads(str(r[10]))),
    )


def _after_each(rows: Sequence[Row], start: int) -> list[tuple[JobState, str | None, int | None]]:
    """The job's state, native id and exit code once each of ``rows[start:]`` is counted
    (past :data:`EXACT_ROWS` rows, the state after the last row for each)."""
    if len(rows) > EXACT_ROWS:
        native_id, exit_code = run_outcome(rows)
        return [(derive_state(rows)[0], native_id, exit_code)] * (len(rows) - start)
    return [(derive_state(rows[: k + 1])[0], *run_outcome(rows[: k + 1])) for k in range(start, len(rows))]


class EventLog:
    """The events table of a :class:`~.store.JobStore` (blocking, like the store)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        #: Called with each committed transaction's new events (from the committing thread).
        self.on_commit: Callable[[list[EventRow]], None] | None = None
        self._pending: list[EventRow] = []

    def log_rows(self, jobid: str, rows: Sequence[Row]) -> None:
        """Log the rows of ``jobid``'s history (all of it, in file order) not logged yet.
        Inside the caller's transaction; published when it commits."""
        db = self.store.db
        found = db.execute("SELECT owner, rows_seen, labels FROM jobs WHERE jobid = ?", (jobid,)).fetchone()
        if found is None:
            return
        owner, seen = str(found[0]), int(found[1])
        labels = {} if not found[2] else dict(json.loads(str(found[2])))
        # Never back: an older read can finish last (and a job that rewrites its own
        # status.csv shorter gets its rows past the old count logged as they come).
        if len(rows) <= seen:
            return
        db.execute("UPDATE jobs SET rows_seen = ? WHERE jobid = ?", (len(rows), jobid))
        start = max(seen, len(rows) - MAX_NEW)
        for row, (job_state, native_id, exit_code) in zip(
            rows[start:], _after_each(rows, start), strict=True
        ):
            self.add(
                jobid,
                owner,
                row.jobndx,
                row.state,
                row.info,
                row.time,
                job_state,
                native_id,
                exit_code,
                labels,
            )

    def add(
        self,
        jobid: str,
        owner: str,
        jobndx: int,
        state: JobState,
        info: str,
        time: float,
        job_state: JobState,
        native_id: str | None = None,
        exit_code: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        """Log one event (inside the caller's transaction)."""
        info = info[:MAX_INFO]
        labels = labels or {}
        cur = self.store.db.execute(
            "INSERT INTO events (jobid, owner, jobndx, state, info, time, job_state, native_id, exit_code, "
            "labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                jobid,
                owner,
                jobndx,
                state.value,
                info,
                time,
                job_state.value,
                native_id,
                exit_code,
                json.dumps(labels) if labels else None,
            ),
        )
        event_id = int(cur.fetchone()[0])
        self._pending.append(
            EventRow(
                event_id, jobid, owner, jobndx, state, info, time, job_state, native_id, exit_code, labels
            )
        )

    def mark_seen(self, jobid: str, count: int) -> None:
        """Count ``jobid``'s first ``count`` rows as logged without logging them (a job
        imported from its directory: its past is not news)."""
        self.store.db.execute("UPDATE jobs SET rows_seen = ? WHERE jobid = ?", (count, jobid))

    # ---- the store's transaction calls these ----

    def committed(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self.on_commit is not None:
            self.on_commit(pending)

    def rolled_back(self) -> None:
        self._pending = []

    # ---- reading ----

    def last_id(self) -> int:
        """The newest event's id (0: none yet)."""
        r = self.store.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return 0 if r is None else int(r[0])

    def after(
        self,
        after: int,
        *,
        owner: str,
        jobids: Sequence[str] = (),
        limit: int = 1000,
    ) -> list[EventRow]:
        """``owner``'s events with an id past ``after``, oldest first, at most ``limit``
        (only those of ``jobids`` if given); an index range either way."""
        if jobids:
            marks = ", ".join("?" * len(jobids))
            sql = (
                f"SELECT {_COLUMNS} FROM events WHERE jobid IN ({marks}) AND owner = ? AND id > ? "  # noqa: S608 (placeholders only)
                "ORDER BY id LIMIT ?"
            )
            args: tuple[Any, ...] = (*jobids, owner, after, limit)
        else:
            sql = f"SELECT {_COLUMNS} FROM events WHERE owner = ? AND id > ? ORDER BY id LIMIT ?"  # noqa: S608
            args = (owner, after, limit)
        return [_event_row(r) for r in self.store.db.execute(sql, args)]

    def forget(self, jobids: Sequence[str]) -> None:
        """Drop the events of purged jobs (inside the caller's transaction)."""
        self.store.db.executemany("DELETE FROM events WHERE jobid = ?", [(j,) for j in jobids])
