"""The SQLite index of jobs: what lists, filters and ownership checks read.

The job directories stay the source of truth (see ``reconcile``); the index only makes
``GET /v1/jobs`` cost O(page) instead of reading every job, and holds what psik has no
place for: each job's owner and the Idempotency-Keys seen.

Every method is blocking: the JobService calls them from worker threads (one hop per
request), never on the event loop. One connection serves all threads, behind a lock;
SQLite's WAL mode lets several server processes share one index.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psik_api_core import JobState, JobSummary, utc

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    jobid   TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    owner   TEXT NOT NULL,
    name    TEXT,
    state   TEXT NOT NULL,
    jobndx  INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (owner, state, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_by_backend ON jobs (owner, backend, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (owner, name, created DESC, jobid DESC);
CREATE INDEX IF NOT EXISTS jobs_live ON jobs (state) WHERE state IN ('new', 'queued', 'active');
CREATE TABLE IF NOT EXISTS idempotency (
    owner     TEXT NOT NULL,
    key       TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    jobid     TEXT,
    created   REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
"""


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
        )


@dataclass(frozen=True)
class IdempotencyRecord:
    body_hash: str
    jobid: str | None  # None while the first request is still being handled
    created: float


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


_COLUMNS = "jobid, backend, owner, name, state, jobndx, created, updated"


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
    )


class JobStore:
    """The index. Building one does no I/O; :meth:`open` creates or opens the file.
    Safe to use from several threads (each call holds the connection's lock)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    def open(self) -> JobStore:
        """Create (owner-only) or open the index file; idempotent. Returns self."""
        with self._lock:
            if self._conn is not None:
                return self
            path = self.path
            if str(path) != ":memory:":
                Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # The index says who owns what: readable by the server's user only.
                Path(path).touch(mode=0o600, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            self._conn = conn
            return self

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

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several calls as one atomic step (and one lock hold)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def set_states(self, changes: Iterable[tuple[str, JobState, int, float]]) -> None:
        """Several :meth:`set_state` calls in one transaction."""
        with self.transaction():
            for jobid, state, jobndx, updated in changes:
                self.set_state(jobid, state, jobndx, updated)

    # ---- jobs ----

    def put(self, row: JobRow) -> None:
        """Insert or replace the row of ``row.jobid``."""
        self._db.execute(
            f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.jobid,
                row.backend,
                row.owner,
                row.name,
                row.state.value,
                row.jobndx,
                row.created,
                row.updated,
            ),
        )

    def get(self, jobid: str) -> JobRow | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE jobid = ?", (jobid,))
        r = cur.fetchone()
        return None if r is None else _row(r)

    def set_state(self, jobid: str, state: JobState, jobndx: int, updated: float) -> bool:
        """Record a job's derived state; True if anything changed."""
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, jobndx = ?, updated = ? "
            "WHERE jobid = ? AND (state != ? OR jobndx != ? OR updated != ?)",
            (state.value, jobndx, updated, jobid, state.value, jobndx, updated),
        )
        return cur.rowcount > 0

    def delete(self, jobid: str) -> None:
        self._db.execute("DELETE FROM jobs WHERE jobid = ?", (jobid,))
        self._db.execute("DELETE FROM idempotency WHERE jobid = ?", (jobid,))

    def jobids(self) -> set[str]:
        return {str(r[0]) for r in self._db.execute("SELECT jobid FROM jobs")}

    def live(self) -> list[JobRow]:
        """Jobs that are not final (the watcher follows these)."""
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('new', 'queued', 'active')")
        return [_row(r) for r in cur]

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
    ) -> tuple[list[JobRow], str | None]:
        """One page of ``owner``'s jobs, newest first, and the cursor of the next page."""
        where = ["owner = ?"]
        args: list[object] = [owner]
        states = list(states)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(s.value for s in states)
        if backend is not None:
            where.append("backend = ?")
            args.append(backend)
        if name is not None:
            where.append("name = ?")
            args.append(name)
        ids = list(ids)
        if ids:
            where.append(f"jobid IN ({', '.join('?' * len(ids))})")
            args.extend(ids)
        if cursor is not None:
            created, jobid = decode_cursor(cursor)
            where.append("(created < ? OR (created = ? AND jobid < ?))")
            args.extend([created, created, jobid])
        sql = (
            f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
            "ORDER BY created DESC, jobid DESC LIMIT ?"
        )
        rows = [_row(r) for r in self._db.execute(sql, [*args, limit + 1])]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1]) if more else None)

    # ---- idempotency keys ----

    def claim_key(self, owner: str, key: str, body_hash: str, now: float) -> IdempotencyRecord | None:
        """Claim ``key`` for a new request; the earlier record if it was seen before."""
        try:
            self._db.execute(
                "INSERT INTO idempotency (owner, key, body_hash, jobid, created) VALUES (?, ?, ?, NULL, ?)",
                (owner, key, body_hash, now),
            )
            return None
        except sqlite3.IntegrityError:
            r = self._db.execute(
                "SELECT body_hash, jobid, created FROM idempotency WHERE owner = ? AND key = ?",
                (owner, key),
            ).fetchone()
            return IdempotencyRecord(
                body_hash=str(r[0]), jobid=None if r[1] is None else str(r[1]), created=float(r[2])
            )

    def settle_key(self, owner: str, key: str, jobid: str) -> None:
        self._db.execute("UPDATE idempotency SET jobid = ? WHERE owner = ? AND key = ?", (jobid, owner, key))

    def release_key(self, owner: str, key: str) -> None:
        """Forget a claim whose request made no job, so the client may retry it."""
        self._db.execute(
            "DELETE FROM idempotency WHERE owner = ? AND key = ? AND jobid IS NULL", (owner, key)
        )


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


class _Result:
    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None
