"""The SQLite index: pages are newest-first, disjoint and complete; filters; cursors;
Idempotency-Key claims."""

from __future__ import annotations

from pathlib import Path

import pytest

from psik_api_core import JobState
from psik_api_server.jobs.store import BadCursor, JobRow, JobStore


def _row(i: int, owner: str = "u", state: JobState = JobState.new, created: float | None = None) -> JobRow:
    return JobRow(
        jobid=f"{1700000000 + i}.{i % 1000:03d}",
        backend="default",
        owner=owner,
        name=f"n{i % 3}",
        state=state,
        jobndx=0,
        created=float(1700000000 + i) if created is None else created,
        updated=float(1700000000 + i),
    )


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "index.sqlite").open()


def test_pages_cover_everything_once_newest_first(store: JobStore) -> None:
    rows = [_row(i) for i in range(53)]
    # Equal creation times must not lose or repeat a job across a page boundary.
    rows += [_row(100 + i, created=1700000010.0) for i in range(7)]
    for r in rows:
        store.put(r)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list("u", limit=10, cursor=cursor)
        seen += [r.jobid for r in page]
        if cursor is None:
            break
    expected = [r.jobid for r in sorted(rows, key=lambda r: (r.created, r.jobid), reverse=True)]
    assert seen == expected


def test_owner_and_filters(store: JobStore) -> None:
    for i in range(10):
        store.put(
            _row(i, owner="alice" if i < 6 else "bob", state=JobState.failed if i % 2 else JobState.new)
        )
    assert len(store.list("alice")[0]) == 6
    assert {r.jobid for r in store.list("bob")[0]} == {_row(i).jobid for i in range(6, 10)}
    failed, _ = store.list("alice", states=[JobState.failed])
    assert {r.jobid for r in failed} == {_row(i).jobid for i in (1, 3, 5)}
    assert [r.jobid for r in store.list("alice", name="n0")[0]] == [_row(3).jobid, _row(0).jobid]
    assert [r.jobid for r in store.list("alice", ids=[_row(2).jobid, _row(8).jobid])[0]] == [_row(2).jobid]


def test_set_state_reports_change(store: JobStore) -> None:
    store.put(_row(1))
    jobid = _row(1).jobid
    assert store.set_state(jobid, JobState.queued, 1, 5.0, exit_code=None)
    assert not store.set_state(jobid, JobState.queued, 1, 5.0, exit_code=None)
    row = store.get(jobid)
    assert row is not None and (row.state, row.jobndx) == (JobState.queued, 1)
    assert [r.jobid for r in store.live()] == [jobid]
    store.set_state(jobid, JobState.completed, 1, 6.0, exit_code=0)
    assert store.live() == []


@pytest.mark.parametrize("bad", ["", "x", "%%%", "WyJhIl0", "eyJ4IjogMX0"])
def test_bad_cursors(store: JobStore, bad: str) -> None:
    with pytest.raises(BadCursor):
        store.list("u", cursor=bad or "=")


def test_idempotency_claims(store: JobStore) -> None:
    assert store.claim_key("u", "k", "h1", 1.0) is None
    seen = store.claim_key("u", "k", "h1", 2.0)
    assert seen is not None and seen.jobid is None and seen.created == 1.0
    store.settle_key("u", "k", "1.1")
    seen = store.claim_key("u", "k", "h2", 3.0)
    assert seen is not None and (seen.body_hash, seen.jobid) == ("h1", "1.1")
    assert store.claim_key("other-user", "k", "h2", 3.0) is None  # keys are per owner
    store.release_key("u", "k")  # settled keys are kept
    assert store.claim_key("u", "k", "h1", 4.0) is not None


def test_index_survives_reopen(tmp_path: Path) -> None:
    s = JobStore(tmp_path / "i.sqlite").open()
    s.put(_row(1))
    s.close()
    assert JobStore(tmp_path / "i.sqlite").open().get(_row(1).jobid) == _row(1)


def test_building_a_store_touches_no_file_and_use_before_open_is_refused(tmp_path: Path) -> None:
    s = JobStore(tmp_path / "sub" / "i.sqlite")
    assert not (tmp_path / "sub").exists()
    with pytest.raises(RuntimeError, match="not open"):
        s.get("1.1")


def test_a_transaction_is_all_or_nothing(store: JobStore) -> None:
    with pytest.raises(ZeroDivisionError), store.transaction():
        store.put(_row(1))
        1 / 0  # noqa: B018
    assert store.get(_row(1).jobid) is None
    store.set_states([(_row(2).jobid, JobState.active, 1, 5.0, None, None)])  # no such row: nothing, no error
    store.put(_row(2))
    store.set_states([(_row(2).jobid, JobState.active, 1, 5.0, None, None)])
    got = store.get(_row(2).jobid)
    assert got is not None and (got.state, got.jobndx, got.updated) == (JobState.active, 1, 5.0)


def test_a_key_is_linked_to_its_job_before_it_is_settled(store: JobStore) -> None:
    assert store.claim_key("u", "k", "h", 1.0, submit=True, fingerprint="f") is None
    assert store.claim_key("u", "other", "h", 1.0) is None
    (claimed, _) = sorted(store.open_keys(), key=lambda k: k.key)
    assert (claimed.key, claimed.jobid, claimed.submit, claimed.fingerprint) == ("k", None, True, "f")
    store.link_key("u", "k", "1.1")
    seen = store.claim_key("u", "k", "h", 2.0)
    assert seen is not None and seen.jobid == "1.1" and not seen.settled
    assert store.release_claims() == 1  # only the claim that has no job
    assert [(k.key, k.jobid) for k in store.open_keys()] == [("k", "1.1")]
    store.settle_key("u", "k", "1.1")
    seen = store.claim_key("u", "k", "h", 3.0)
    assert seen is not None and seen.settled and store.open_keys() == []


def test_a_run_never_goes_back(store: JobStore) -> None:
    """A state read before the next run was recorded, written last, changes nothing."""
    store.put(_row(1))
    jobid = _row(1).jobid
    assert store.set_state(jobid, JobState.queued, 2, 5.0, exit_code=None)
    assert not store.set_state(jobid, JobState.completed, 1, 4.0, exit_code=0)
    row = store.get(jobid)
    assert row is not None and (row.state, row.jobndx) == (JobState.queued, 2)


def test_an_ended_run_is_never_set_back_by_an_older_read(store: JobStore) -> None:
    """Within one run, a read from before the end, written after the end was recorded
    (a submit's last read racing the watcher), changes nothing: nothing would repair
    it, since the watcher stops following a job once it ends (CI: 1 of 300 jobs was
    left 'queued' for good). A read that saw more rows, even all older ones, still
    counts; so does the next run."""
    store.put(_row(1))
    jobid = _row(1).jobid
    assert store.set_state(jobid, JobState.completed, 1, 6.0, exit_code=0)  # the watcher
    assert not store.set_state(jobid, JobState.queued, 1, 5.0, exit_code=None)  # the older read
    row = store.get(jobid)
    assert row is not None and (row.state, row.jobndx, row.updated) == (JobState.completed, 1, 6.0)
    assert store.set_state(jobid, JobState.completed, 1, 6.0, exit_code=3) is True  # same read, more said
    assert store.set_state(jobid, JobState.queued, 2, 5.5, exit_code=None)  # a new run
    row = store.get(jobid)
    assert row is not None and (row.state, row.jobndx) == (JobState.queued, 2)


def test_start_claims_are_cleared_with_their_holder(store: JobStore) -> None:
    store.put(_row(1), claim=True)  # a create-and-submit's job is born claimed
    assert store.claimed(_row(1).jobid) and not store.claim_start(_row(1).jobid, 0)
    assert store.clear_claims() == 1
    assert store.claim_start(_row(1).jobid, 0)


_FIRST_SCHEMA = """
CREATE TABLE jobs (jobid TEXT PRIMARY KEY, backend TEXT NOT NULL, owner TEXT NOT NULL, name TEXT,
    state TEXT NOT NULL, jobndx INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE idempotency (owner TEXT NOT NULL, key TEXT NOT NULL, body_hash TEXT NOT NULL, jobid TEXT,
    created REAL NOT NULL, PRIMARY KEY (owner, key));
INSERT INTO jobs VALUES ('1700000001.001', 'default', 'u', 'n', 'completed', 1, 1.0, 2.0);
INSERT INTO idempotency VALUES ('u', 'k', 'h', '1700000001.001', 1.0);
"""


def test_an_index_of_the_first_release_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(_FIRST_SCHEMA)
    store = JobStore(path).open()
    row = store.get("1700000001.001")
    assert row is not None and row.state is JobState.completed
    seen = store.claim_key("u", "k", "h", 5.0)
    assert seen is not None and seen.jobid == "1700000001.001" and seen.settled  # answered back then
    assert store.open_keys() == []
    assert store.claim_start("1700000001.001", 1)


@pytest.mark.parametrize("content", [b"not an index\n" * 500, b"SQLite format 3\x00" + b"\xff" * 8000])
def test_a_corrupt_index_is_told_apart_and_moved_aside_with_its_wal(tmp_path: Path, content: bytes) -> None:
    from psik_api_server.jobs.store import CorruptIndex

    path = tmp_path / "index.sqlite"
    path.write_bytes(content)
    store = JobStore(path)
    with pytest.raises(CorruptIndex):
        store.open()
    Path(f"{path}-wal").write_bytes(b"old wal")  # left over: replayed into a new index, it would harm
    aside = store.move_aside(0.0)
    assert aside.name.startswith("index.sqlite.corrupt-") and aside.read_bytes() == content
    assert Path(f"{aside}-wal").read_bytes() == b"old wal"
    assert not path.exists() and not Path(f"{path}-wal").exists()
    store.open().put(_row(1))  # a new, empty index
    assert store.count() == 1
