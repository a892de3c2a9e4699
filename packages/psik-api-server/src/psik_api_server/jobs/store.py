"""The SQLite index of jobs: what lists, filters and ownership checks read.

The job directories stay the source of truth (see ``reconcile``); the index only makes
``GET /v1/jobs`` cost O(page) instead of reading every job, and holds what psik has no
place for: each job's owner, the Idempotency-Keys seen, and who is starting a job now.

Changes that must happen once are conditional updates, atomic in SQLite even between
processes sharing the file: taking a key (``claim_key``), taking a job's start
(``claim_start``), and a state that only moves forward (``set_state`` never goes back
to an earlier run).

Each row also keeps its current run's exit code (``exit_code``, as :func:`run_outcome`
reads it from the history), recorded with the state from the same read, so a list page
carries it without reading any job directory.

Every method is blocking: the JobService calls them from worker threads (one hop per
request), never on the event loop. One connection serves all threads, behind a lock;
SQLite's WAL mode lets several server processes share one index.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psik_api_core import JobState, JobSummary, utc

from . import deps, eventlog
from .eventlog import EventLog

if TYPE_CHECKING:
    from .directory import Row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    jobid   TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    owner   TEXT NOT NULL,
    name    TEXT,
    state   TEXT NOT NULL,
    jobndx  INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    claim   TEXT, -- 'start' while a request submits the job (see claim_start)
    exit_code INTEGER, -- the current run's exit status once it ended (run_outcome), else NULL
    slot    INTEGER,   -- 1 while the job holds one of its backend's job slots (see claim_slot)
    rows_seen INTEGER NOT NULL DEFAULT 0, -- status rows already in the event log (eventlog.py)
    labels  TEXT,     -- JobSpec.labels as JSON, NULL for none (job_labels finds jobs by them)
    grp     TEXT      -- the group (groups.id) that made the job, if one did
);
-- POST /v1/groups: a group is made (settled = 0), its members made and linked to it
-- (jobs.grp, in each member's own index transaction), then settled; started = 1 once
-- every member was handed to its backend (or to its dependencies). See groups.py.
CREATE TABLE IF NOT EXISTS groups (
    id        TEXT PRIMARY KEY,
    owner     TEXT NOT NULL,
    created   REAL NOT NULL,
    size      INTEGER NOT NULL,
    key       TEXT,           -- the request's Idempotency-Key, if it had one
    body_hash TEXT,
    settled   INTEGER NOT NULL DEFAULT 0,
    started   INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS groups_by_key ON groups (owner, key) WHERE key IS NOT NULL;
-- One row per label of a job, in page order: ``?label=k=v`` reads a page of it.
CREATE TABLE IF NOT EXISTS job_labels (
    owner   TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    created REAL NOT NULL,
    jobid   TEXT NOT NULL,
    PRIMARY KEY (owner, key, value, created, jobid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_labels_by_job ON job_labels (jobid);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (owner, state, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_by_backend ON jobs (owner, backend, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (owner, name, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_live ON jobs (state) WHERE state IN ('new', 'queued', 'active');
CREATE TABLE IF NOT EXISTS idempotency (
    owner       TEXT NOT NULL,
    key         TEXT NOT NULL,
    body_hash   TEXT NOT NULL,
    jobid       TEXT,                       -- NULL until psik made the job
    created     REAL NOT NULL,
    settled     INTEGER NOT NULL DEFAULT 1, -- 0 until the request has been answered
    submit      INTEGER NOT NULL DEFAULT 0, -- the request also submits the job
    fingerprint TEXT,                       -- the spec psik will write (jobdir.fingerprint)
    PRIMARY KEY (owner, key)
);
"""

#: Columns added since the first release: an older index gets them at open. Rows it
#: already has were settled when they got their job (the old servers settled at once).
_ADDED = {
    "jobs": {
        "claim": "TEXT",
        "exit_code": "INTEGER",
        "slot": "INTEGER",
        "rows_seen": "INTEGER NOT NULL DEFAULT 0",
        "labels": "TEXT",
        "grp": "TEXT",
    },
    "events": {"labels": "TEXT"},
    "idempotency": {
        "settled": "INTEGER NOT NULL DEFAULT 1",
        "submit": "INTEGER NOT NULL DEFAULT 0",
        "fingerprint": "TEXT",
    },
}

#: A group's members, in page order (made after ``_ADDED``: an old index gets the column first).
_GROUP_INDEX = (
    "CREATE INDEX IF NOT EXISTS jobs_by_group ON jobs (owner, grp, created DESC, jobid DESC) "
    "WHERE grp IS NOT NULL"
)

#: The jobs holding a slot, per backend: a slot count reads at most ``max_running`` rows
#: of it, however many jobs the index has (made after ``_ADDED``: an old index gets the
#: column first).
_SLOT_INDEX = "CREATE INDEX IF NOT EXISTS jobs_slots ON jobs (backend) WHERE slot IS NOT NULL"

_FINAL = "('completed', 'failed', 'canceled')"

#: ``PRAGMA user_version`` of an index whose every row has its exit code. An older one
#: (0) has none: a ``completed`` row's is 0, filled at open; a ``failed`` row's is in
#: its job's history, read once by ``reconcile`` (see :meth:`JobStore.missing_exit_codes`).
_EXIT_CODES_VERSION = 1


class CorruptIndex(sqlite3.DatabaseError):
    """The index file is not a SQLite database, or SQLite finds it malformed."""


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    name = getattr(e, "sqlite_errorname", "")
    return name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT")


class BadCursor(ValueError):
    """The ``cursor`` query parameter is not one this server handed out."""


@dataclass(frozen=True)
class JobRow:
    jobid: str
    backend: str
    owner: str
    name: str | None
    state: JobState
    jobndx: int
    created: float
    updated: float
    exit_code: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    group: str | None = None

    def summary(self) -> JobSummary:
        return JobSummary(
            jobid=self.jobid,
            name=self.name,
            backend=self.backend,
            owner=self.owner,
            state=self.state,
            jobndx=self.jobndx,
            created=utc(self.created),
            updated=utc(self.updated),
            exit_code=self.exit_code,
            labels=self.labels,
            group=self.group,
        )


@dataclass(frozen=True)
class IdempotencyRecord:
    body_hash: str
    jobid: str | None  # None until the first request has made its job
    created: float
    settled: bool = True  # False until the first request has been answered


@dataclass(frozen=True)
class OpenKey:
    """A key whose request was not answered: what a server that died left of it."""

    owner: str
    key: str
    jobid: str | None
    created: float
    submit: bool
    fingerprint: str | None


def encode_cursor(row: JobRow) -> str:
    raw = json.dumps([row.created, row.jobid], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, jobid = json.loads(raw)
        return float(created), str(jobid)
    except (binascii.Error, ValueError, TypeError) as e:
        raise BadCursor("not a cursor from this server; pass next_cursor back unchanged") from e


_COLUMNS = "jobid, backend, owner, name, state, jobndx, created, updated, exit_code, labels, grp"


#: :meth:`JobStore.lookup`'s query: the row of a job id, or the same columns blank.
_LOOKUP = (
    "SELECT j.jobid IS NOT NULL, COALESCE(j.jobid, ?), COALESCE(j.backend, ''), COALESCE(j.owner, ''), "
    "j.name, COALESCE(j.state, 'new'), COALESCE(j.jobndx, 0), COALESCE(j.created, 0.0), "
    "COALESCE(j.updated, 0.0), j.exit_code, j.labels, j.grp "
    "FROM (SELECT 1) LEFT JOIN jobs AS j ON j.jobid = ?"
)


def _row(r: Sequence[object]) -> JobRow:
    return JobRow(
        jobid=str(r[0]),
        backend=str(r[1]),
        owner=str(r[2]),
        name=None if r[3] is None else str(r[3]),
        state=JobState(str(r[4])),
        jobndx=int(r[5]),  # type: ignore[call-overload]
        created=float(r[6]),  # type: ignore[arg-type]
        updated=float(r[7]),  # type: ignore[arg-type]
        exit_code=None if r[8] is None else int(r[8]),  # type: ignore[call-overload]
        labels={} if not r[9] else dict(json.loads(str(r[9]))),
        group=None if r[10] is None else str(r[10]),
    )


class JobStore:
    """The index. Building one does no I/O; :meth:`open` creates or opens the file.
    Safe to use from several threads (each call holds the connection's lock)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._depth = 0  # of nested transaction() blocks
        #: Every row of every job's history, numbered: what event streams read.
        self.events = EventLog(self)

    def open(self) -> JobStore:
        """Create (owner-only) or open the index file; idempotent. Returns self.

        Raises :class:`CorruptIndex` if the file is not a SQLite database or SQLite
        finds it malformed (see :meth:`move_aside`); OSError or another sqlite3 error
        if it cannot be opened at all."""
        with self._lock:
            if self._conn is not None:
                return self
            path = self.path
            if str(path) != ":memory:":
                Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # The index says who owns what: readable by the server's user only.
                Path(path).touch(mode=0o600, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                # quick_check reads every page once (milliseconds for thousands of
                # jobs): damage is found here, not by some request later.
                verdict = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                if verdict != "ok":
                    found = " ".join(str(verdict).split())[:200]  # SQLite's report spans lines
                    raise CorruptIndex(f"database disk image is malformed: {found}")
                fresh = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone() is None
                conn.executescript(_SCHEMA)
                conn.executescript(eventlog.SCHEMA)
                conn.executescript(deps.SCHEMA)
                _add_columns(conn)
                conn.execute(_SLOT_INDEX)
                conn.execute(_GROUP_INDEX)
                _fill_exit_codes(conn, fresh)
            except CorruptIndex:
                conn.close()
                raise
            except sqlite3.DatabaseError as e:
                conn.close()
                if _is_corruption(e):
                    raise CorruptIndex(str(e)) from e
                raise
            self._conn = conn
            return self

    def move_aside(self, now: float | None = None) -> Path:
        """Rename the (closed, corrupt) index file to ``<name>.corrupt-<time>``, with its
        ``-wal``/``-shm`` files, so that :meth:`open` starts a new one. Returns the new name."""
        with self._lock:
            if self._conn is not None:
                raise RuntimeError("close the index before moving it aside")
            path = Path(self.path)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(time.time() if now is None else now))
            aside = path.with_name(f"{path.name}.corrupt-{stamp}")
            n = 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
            # The WAL goes with its file: left behind, it would be replayed into the new one.
            for suffix in ("-wal", "-shm"):
                side = Path(f"{path}{suffix}")
                if side.exists():
                    os.replace(side, f"{aside}{suffix}")
            os.replace(path, aside)
            return aside

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def _db(self) -> _Locked:
        if self._conn is None:
            raise RuntimeError("the job index is not open (the app's lifespan opens it)")
        return _Locked(self._conn, self._lock)

    @property
    def db(self) -> _Locked:
        """The connection, each statement under the store's lock (for :class:`EventLog`)."""
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several calls as one atomic step (and one lock hold). Nested blocks join the
        outermost one. Events logged in it are published once it commits."""
        with self._lock:
            db = self._db
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self.events.rolled_back()
                # SQLite has already rolled back after some errors (SQLITE_FULL, ...): a
                # second ROLLBACK would fail and hide the error that matters.
                if self._conn is not None and self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                db.execute("COMMIT")
            except sqlite3.Error:
                self.events.rolled_back()
                if self._conn is not None and self._conn.in_transaction:  # e.g. SQLITE_FULL
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
            self.events.committed()

    def set_states(
        self,
        changes: Iterable[tuple[str, JobState, int, float, int | None, Sequence[Row] | None]],
        hold: Collection[str] = (),
    ) -> int:
        """Several :meth:`set_state` calls in one transaction, each ``(jobid, state,
        jobndx, updated, exit_code, rows)``, the jobs in ``hold`` keeping their slot; how
        many rows changed. All or nothing: on an error (a full disk: SQLITE_FULL) none is
        recorded."""
        changed = 0
        with self.transaction():
            for jobid, state, jobndx, updated, exit_code, rows in changes:
                changed += self.set_state(
                    jobid, state, jobndx, updated, exit_code=exit_code, rows=rows, hold=jobid in hold
                )
        return changed

    # ---- jobs ----

    def put(self, row: JobRow, *, claim: bool = False, rows: Sequence[Row] = ()) -> None:
        """Insert or replace the row of ``row.jobid``; ``claim``: born with its start
        claimed (see :meth:`claim_start`) by the request that creates and submits it;
        ``rows``: its history so far, logged as events."""
        with self.transaction():
            self._put(row, claim)
            self.events.log_rows(row.jobid, rows)

    def _put(self, row: JobRow, claim: bool) -> None:
        self._put_labels([row])
        self._db.execute(
            f"INSERT OR REPLACE INTO jobs ({_COLUMNS}, claim) VALUES ({', '.join('?' * 12)})",
            (
                row.jobid,
                row.backend,
                row.owner,
                row.name,
                row.state.value,
                row.jobndx,
                row.created,
                row.updated,
                row.exit_code,
                json.dumps(row.labels) if row.labels else None,
                row.group,
                "start" if claim else None,
            ),
        )

    def put_many(self, rows: Iterable[JobRow], seen: Mapping[str, int] | None = None) -> None:
        """:meth:`put` of each row (none claimed), in one transaction: all or none.
        ``seen``: how many history rows of each job count as logged already (a job
        imported from its directory: its past is not news)."""
        seen = seen or {}
        rows = builtins.list(rows)
        with self.transaction():
            self._put_labels(rows)
            self._db.executemany(
                f"INSERT OR REPLACE INTO jobs ({_COLUMNS}, rows_seen) VALUES ({', '.join('?' * 12)})",
                [
                    (
                        r.jobid,
                        r.backend,
                        r.owner,
                        r.name,
                        r.state.value,
                        r.jobndx,
                        r.created,
                        r.updated,
                        r.exit_code,
                        json.dumps(r.labels) if r.labels else None,
                        r.group,
                        seen.get(r.jobid, 0),
                    )
                    for r in rows
                ],
            )

    def _put_labels(self, rows: Sequence[JobRow]) -> None:
        """The ``job_labels`` rows of ``rows`` (replacing any of the same jobs)."""
        self._db.executemany("DELETE FROM job_labels WHERE jobid = ?", [(r.jobid,) for r in rows])
        self._db.executemany(
            "INSERT INTO job_labels (owner, key, value, created, jobid) VALUES (?, ?, ?, ?, ?)",
            [(r.owner, k, v, r.created, r.jobid) for r in rows for k, v in r.labels.items()],
        )

    def delete_many(self, jobids: Iterable[str]) -> None:
        """:meth:`delete` of each job, in one transaction."""
        with self.transaction():
            for jobid in jobids:
                self.delete(jobid)

    def get(self, jobid: str) -> JobRow | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE jobid = ?", (jobid,))
        r = cur.fetchone()
        return None if r is None else _row(r)

    def lookup(self, jobid: str) -> tuple[bool, JobRow]:
        """Whether ``jobid`` has a row, and that row or a blank one (owner ``""``, no
        one's), by the same work either way: one query that always yields one row (a
        LEFT JOIN on a constant), one :class:`JobRow` built. An ownership check on it
        then takes as long for another user's job as for one that does not exist."""
        cur = self._db.execute(_LOOKUP, (jobid, jobid))
        r = cur.fetchone()
        return bool(r[0]), _row(r[1:])

    def set_state(
        self,
        jobid: str,
        state: JobState,
        jobndx: int,
        updated: float,
        *,
        exit_code: int | None,
        rows: Sequence[Row] | None = None,
        hold: bool = False,
    ) -> bool:
        """Record a job's derived state and its run's ``exit_code`` (None while it runs
        or when it has none: a new run clears the last one's), both from the same read
        of its history; True if anything changed. A read older than the one recorded
        (an older read finishing last) changes nothing: runs only ever go forward (a
        start claim relies on it), and within a run a read that saw fewer rows has an
        older ``updated`` (the newest row's time; status.csv is only appended to), so a
        run that was recorded ended is never set back to running by a read from before
        its end (which no later read would repair: the watcher stops following a job
        once it ends). A job that ended gives its slot back, unless ``hold`` (its process
        still runs: :meth:`release_slot_after` gives it back). ``rows``: the whole history
        that read found (file order), whose rows not logged yet become events."""
        if rows is not None:
            with self.transaction():
                changed = self.set_state(jobid, state, jobndx, updated, exit_code=exit_code, hold=hold)
                self.events.log_rows(jobid, rows)
            return changed
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, jobndx = ?, updated = ?, exit_code = ?, "
            f"slot = CASE WHEN ? IN {_FINAL} AND NOT ? THEN NULL ELSE slot END "
            "WHERE jobid = ? AND (jobndx < ? OR (jobndx = ? AND updated <= ?)) "
            "AND (state != ? OR jobndx != ? OR updated != ? OR exit_code IS NOT ?)",
            (
                state.value,
                jobndx,
                updated,
                exit_code,
                state.value,
                hold,
                jobid,
                jobndx,
                jobndx,
                updated,
                state.value,
                jobndx,
                updated,
                exit_code,
            ),
        )
        return cur.rowcount > 0

    def record_failed(self, jobid: str, jobndx: int, updated: float, info: str) -> bool:
        """Record run ``jobndx`` failed in the index alone (its files cannot take the row:
        the job made them invalid), with an event saying ``info``; True if it changed."""
        with self.transaction():
            if not self.set_state(jobid, JobState.failed, jobndx, updated, exit_code=None):
                return False
            row = self.get(jobid)
            if row is not None:
                self.events.add(
                    jobid,
                    row.owner,
                    jobndx,
                    JobState.failed,
                    info,
                    updated,
                    JobState.failed,
                    labels=row.labels,
                )
            return True

    # ---- job slots ----

    def claim_slot(self, jobid: str, backend: str, limit: int) -> bool:
        """Take one of ``backend``'s ``limit`` job slots for ``jobid`` (True if it holds
        one now, False if all are taken). One UPDATE: two submits, even from two
        processes, never both take the last slot, and no lock is held while the job is
        launched. The count reads only the rows holding a slot (``jobs_slots``)."""
        cur = self._db.execute(
            "UPDATE jobs SET slot = 1 WHERE jobid = ? AND slot IS NULL "
            "AND (SELECT count(*) FROM jobs WHERE backend = ? AND slot IS NOT NULL) < ?",
            (jobid, backend, limit),
        )
        if cur.rowcount > 0:
            return True
        held = self._db.execute("SELECT slot FROM jobs WHERE jobid = ?", (jobid,)).fetchone()
        return held is not None and held[0] is not None

    def release_slot_after(self, jobid: str, jobndx: int) -> bool:
        """Give back the slot a job kept past its recorded end at run ``jobndx``
        (``set_state(hold=True)``), now that its process has exited; nothing if the job
        has moved on to another run. True if a slot was freed."""
        cur = self._db.execute(
            f"UPDATE jobs SET slot = NULL WHERE jobid = ? AND jobndx = ? AND state IN {_FINAL} "
            "AND slot IS NOT NULL",
            (jobid, jobndx),
        )
        return cur.rowcount > 0

    def release_slot(self, jobid: str) -> None:
        """Give ``jobid``'s slot back (its launch failed or was cut short)."""
        self._db.execute("UPDATE jobs SET slot = NULL WHERE jobid = ? AND slot IS NOT NULL", (jobid,))

    def slots_held(self, backend: str) -> int:
        """How many of ``backend``'s jobs hold a slot."""
        r = self._db.execute("SELECT count(*) FROM jobs WHERE backend = ? AND slot IS NOT NULL", (backend,))
        return int(r.fetchone()[0])

    def recount_slots(self, limited: Iterable[str], waiting: Iterable[str]) -> None:
        """Set who holds a slot from the states (at start-up, so that a crash between a
        claim and its job's end loses no slot): every job of a ``limited`` backend that
        is queued with it or active, but none ``waiting`` for a slot."""
        backends, waits = sorted(set(limited)), sorted(set(waiting))
        with self.transaction():
            self._db.execute("UPDATE jobs SET slot = NULL WHERE slot IS NOT NULL")
            if backends:
                marks = ", ".join("?" * len(backends))
                self._db.execute(
                    f"UPDATE jobs SET slot = 1 WHERE state IN ('queued', 'active') AND backend IN ({marks})",
                    backends,
                )
            for i in range(0, len(waits), 500):
                part = waits[i : i + 500]
                self._db.execute(
                    f"UPDATE jobs SET slot = NULL WHERE jobid IN ({', '.join('?' * len(part))})", part
                )

    # ---- start claims ----

    def claim_start(self, jobid: str, jobndx: int) -> bool:
        """Take the right to submit run ``jobndx + 1`` of a job that is new or final at run
        ``jobndx`` in the index; False if another request holds it or the job moved on.
        One UPDATE: of two starts, even from two processes, exactly one gets True."""
        cur = self._db.execute(
            "UPDATE jobs SET claim = 'start' WHERE jobid = ? AND claim IS NULL AND jobndx = ? "
            "AND state IN ('new', 'completed', 'failed', 'canceled')",
            (jobid, jobndx),
        )
        return cur.rowcount > 0

    def release_start(
        self,
        jobid: str,
        state: JobState | None = None,
        jobndx: int = 0,
        updated: float = 0.0,
        exit_code: int | None = None,
        rows: Sequence[Row] | None = None,
        hold: bool = False,
    ) -> None:
        """Give the claim back, recording the state (and exit code) the start left (one
        step, so no other start sees the job startable between the two); ``state``
        None: unknown. ``rows``: the history read, as for :meth:`set_state`."""
        with self.transaction():
            if state is not None:
                self.set_state(jobid, state, jobndx, updated, exit_code=exit_code, rows=rows, hold=hold)
            self._db.execute("UPDATE jobs SET claim = NULL WHERE jobid = ?", (jobid,))

    def claimed(self, jobid: str) -> bool:
        r = self._db.execute("SELECT claim FROM jobs WHERE jobid = ?", (jobid,)).fetchone()
        return r is not None and r[0] is not None

    def clear_claims(self) -> int:
        """Forget every start claim (at start-up: their holder is dead); how many."""
        return self._db.execute("UPDATE jobs SET claim = NULL WHERE claim IS NOT NULL").rowcount

    def delete(self, jobid: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM jobs WHERE jobid = ?", (jobid,))
            self._db.execute("DELETE FROM idempotency WHERE jobid = ?", (jobid,))
            self._db.execute("DELETE FROM job_labels WHERE jobid = ?", (jobid,))
            # Its own dependencies go; a job that waits for it keeps its row (a parent
            # that is gone can no longer be met: deps.py cancels that job).
            self._db.execute("DELETE FROM job_deps WHERE child = ?", (jobid,))
            self.events.forget([jobid])

    def jobids(self) -> set[str]:
        return {str(r[0]) for r in self._db.execute("SELECT jobid FROM jobs")}

    def live(self) -> list[JobRow]:
        """Jobs that are not final (the watcher follows these)."""
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('new', 'queued', 'active')")
        return [_row(r) for r in cur]

    def submitted(self) -> list[JobRow]:
        """Jobs queued with their backend or active: those a backend may have lost (the
        liveness loop asks about these; a ``new`` job has nothing running to lose)."""
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'active')")
        return [_row(r) for r in cur]

    def missing_exit_codes(self) -> builtins.list[JobRow]:  # `list` here is the method below
        """The ``failed`` jobs of an index made before rows had exit codes, whose code
        is in their history (see :meth:`exit_codes_filled`); none once that was done."""
        if int(self._db.execute("PRAGMA user_version").fetchone()[0]) >= _EXIT_CODES_VERSION:
            return []
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = 'failed' AND exit_code IS NULL")
        return [_row(r) for r in cur]

    def exit_codes_filled(self) -> None:
        """Every row has its exit code now: :meth:`missing_exit_codes` has no more."""
        self._db.execute(f"PRAGMA user_version = {_EXIT_CODES_VERSION}")

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM jobs").fetchone()[0])

    def list(
        self,
        owner: str,
        *,
        states: Iterable[JobState] = (),
        backend: str | None = None,
        name: str | None = None,
        ids: Iterable[str] = (),
        limit: int = 100,
        cursor: str | None = None,
        labels: Sequence[tuple[str, str]] = (),
        group: str | None = None,
    ) -> tuple[list[JobRow], str | None]:
        """One page of ``owner``'s jobs, newest first, and the cursor of the next page.

        Every filter reads an index in page order, so a page costs O(limit) however
        deep it is (see :func:`page_query`)."""
        sql, args = page_query(
            owner,
            list(dict.fromkeys(s.value for s in states)),
            backend,
            name,
            list(ids),
            None if cursor is None else decode_cursor(cursor),
            limit + 1,
            list(dict.fromkeys(labels)),
            group,
        )
        rows = [_row(r) for r in self._db.execute(sql, args)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1]) if more else None)

    # ---- idempotency keys ----

    #
    # A key goes: claimed (no job yet) -> linked to its job (``link_key``, in the same
    # transaction as the job's row, before anything is submitted) -> settled once the
    # request has its answer. A replay finds the job from the link on.

    def claim_key(
        self,
        owner: str,
        key: str,
        body_hash: str,
        now: float,
        *,
        submit: bool = False,
        fingerprint: str | None = None,
    ) -> IdempotencyRecord | None:
        """Claim ``key`` for a new request; the earlier record if it was seen before."""
        try:
            self._db.execute(
                "INSERT INTO idempotency (owner, key, body_hash, jobid, created, settled, submit, "
                "fingerprint) VALUES (?, ?, ?, NULL, ?, 0, ?, ?)",
                (owner, key, body_hash, now, int(submit), fingerprint),
            )
            return None
        except sqlite3.IntegrityError:
            r = self._db.execute(
                "SELECT body_hash, jobid, created, settled FROM idempotency WHERE owner = ? AND key = ?",
                (owner, key),
            ).fetchone()
            return IdempotencyRecord(
                body_hash=str(r[0]),
                jobid=None if r[1] is None else str(r[1]),
                created=float(r[2]),
                settled=bool(r[3]),
            )

    def link_key(self, owner: str, key: str, jobid: str) -> None:
        """Record the job ``key``'s request made (not settled: it has no answer yet)."""
        self._db.execute("UPDATE idempotency SET jobid = ? WHERE owner = ? AND key = ?", (jobid, owner, key))

    def settle_key(self, owner: str, key: str, jobid: str) -> None:
        """The request with ``key`` has its answer: ``jobid``."""
        self._db.execute(
            "UPDATE idempotency SET jobid = ?, settled = 1 WHERE owner = ? AND key = ?", (jobid, owner, key)
        )

    def release_key(self, owner: str, key: str) -> None:
        """Forget a claim whose request made no job, so the client may retry it."""
        self._db.execute(
            "DELETE FROM idempotency WHERE owner = ? AND key = ? AND jobid IS NULL", (owner, key)
        )

    def open_keys(self) -> builtins.list[OpenKey]:  # `list` here is the method above
        """Keys whose request was not answered (at start-up: left by a server that died)."""
        cur = self._db.execute(
            "SELECT owner, key, jobid, created, submit, fingerprint FROM idempotency "
            "WHERE settled = 0 OR jobid IS NULL"
        )
        return [
            OpenKey(
                owner=str(r[0]),
                key=str(r[1]),
                jobid=None if r[2] is None else str(r[2]),
                created=float(r[3]),
                submit=bool(r[4]),
                fingerprint=None if r[5] is None else str(r[5]),
            )
            for r in cur
        ]

    def release_claims(self) -> int:
        """Forget every claim that has no job yet (at start-up: its request is dead)."""
        return self._db.execute("DELETE FROM idempotency WHERE jobid IS NULL").rowcount


_NEWEST_FIRST = "ORDER BY created DESC, jobid DESC"


def page_query(
    owner: str,
    states: builtins.list[str],
    backend: str | None,
    name: str | None,
    ids: builtins.list[str],
    after: tuple[float, str] | None,
    limit: int,
    labels: Sequence[tuple[str, str]] = (),
    group: str | None = None,
) -> tuple[str, builtins.list[object]]:
    """:meth:`JobStore.list`'s query and its arguments. Each index is ``(owner, <filter
    column>, created DESC, jobid DESC)``: SQLite finds a page's first row in it and reads
    on in page order (the ``EXPLAIN QUERY PLAN`` of each filter is in the tests)."""
    if labels:
        return _label_page_query(owner, states, backend, name, ids, after, limit, labels, group)
    where, args = _column_filters("", group, backend, name)
    if ids:
        where.append(f"jobid IN ({', '.join('?' * len(ids))})")
        args.extend(ids)
    if after is not None:
        # A row value, not ``created < ? OR (created = ? AND jobid < ?)``: SQLite seeks
        # the index to it, where the OR made it walk every earlier page's rows.
        where.append("(created, jobid) < (?, ?)")
        args.extend(after)
    if ids or len(states) <= 1:
        # With ids (at most a thousand), their rows found by primary key and sorted cost
        # less than walking every job of the owner: ``+owner`` keeps that index out.
        head = ["+owner = ?" if ids else "owner = ?"]
        if states:
            head.append(f"state IN ({', '.join('?' * len(states))})")
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(head + where)} {_NEWEST_FIRST} LIMIT ?"
        return sql, [owner, *states, *args, limit]
    # Several states: one ordered page per state (jobs_by_state), merged. ``state IN``
    # would walk all the owner's jobs for a rare state, or sort all of a common one's.
    test = " AND ".join(["owner = ?", "state = ?", *where])
    arm = f"SELECT * FROM (SELECT {_COLUMNS} FROM jobs WHERE {test} {_NEWEST_FIRST} LIMIT ?)"
    sql = " UNION ALL ".join([arm] * len(states)) + f" {_NEWEST_FIRST} LIMIT ?"
    return sql, [a for state in states for a in (owner, state, *args, limit)] + [limit]


def _column_filters(
    table: str, group: str | None, backend: str | None, name: str | None
) -> tuple[builtins.list[str], builtins.list[object]]:
    """The equality filters of a list on the jobs table (``table``: its alias and a dot)."""
    where: builtins.list[str] = []
    args: builtins.list[object] = []
    for column, value in (("grp", group), ("backend", backend), ("name", name)):
        if value is not None:
            where.append(f"{table}{column} = ?")
            args.append(value)
    return where, args


def _label_page_query(
    owner: str,
    states: builtins.list[str],
    backend: str | None,
    name: str | None,
    ids: builtins.list[str],
    after: tuple[float, str] | None,
    limit: int,
    labels: Sequence[tuple[str, str]],
    group: str | None = None,
) -> tuple[str, builtins.list[object]]:
    """A page of the owner's jobs with every one of ``labels``: read in page order off
    ``job_labels``' key for the first label, the others looked up by key."""
    (key, value), *more = labels
    where = ["l.owner = ?", "l.key = ?", "l.value = ?"]
    args: builtins.list[object] = [owner, key, value]
    if after is not None:
        where.append("(l.created, l.jobid) < (?, ?)")
        args.extend(after)
    for k, v in more:
        where.append(
            "EXISTS (SELECT 1 FROM job_labels AS m WHERE m.owner = l.owner AND m.key = ? AND m.value = ? "
            "AND m.created = l.created AND m.jobid = l.jobid)"
        )
        args.extend((k, v))
    if states:
        where.append(f"j.state IN ({', '.join('?' * len(states))})")
        args.extend(states)
    more_where, more_args = _column_filters("j.", group, backend, name)
    where += more_where
    args += more_args
    if ids:
        where.append(f"l.jobid IN ({', '.join('?' * len(ids))})")
        args.extend(ids)
    columns = ", ".join(f"j.{c}" for c in _COLUMNS.split(", "))
    sql = (
        f"SELECT {columns} FROM job_labels AS l JOIN jobs AS j ON j.jobid = l.jobid "
        f"WHERE {' AND '.join(where)} ORDER BY l.created DESC, l.jobid DESC LIMIT ?"
    )
    return sql, [*args, limit]


def _add_columns(conn: sqlite3.Connection) -> None:
    for table, columns in _ADDED.items():
        have = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns.items():
            if name not in have:
                try:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
                except sqlite3.OperationalError as e:  # another process added it just now
                    if "duplicate column" not in str(e):
                        raise


def _fill_exit_codes(conn: sqlite3.Connection, fresh: bool) -> None:
    """Exit codes an index older than them lacks and SQL alone can tell: 0 for every
    ``completed`` row. A ``failed`` row's is left for ``reconcile`` (its history says);
    a new index has nothing to fill."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= _EXIT_CODES_VERSION:
        return
    if fresh:
        conn.execute(f"PRAGMA user_version = {_EXIT_CODES_VERSION}")
        return
    conn.execute("UPDATE jobs SET exit_code = 0 WHERE state = 'completed' AND exit_code IS NULL")


class _Locked:
    """The connection, with every statement run under the store's lock (the whole
    fetch included: rows are materialised before the lock is let go)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn = conn
        self._lock = lock

    def execute(self, sql: str, args: Sequence[object] = ()) -> _Result:
        with self._lock:
            cur = self._conn.execute(sql, args)
            return _Result(cur.fetchall(), cur.rowcount)

    def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        with self._lock:
            self._conn.executemany(sql, args)


class _Result:
    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None
