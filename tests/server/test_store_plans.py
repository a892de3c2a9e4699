"""The index at scale. Every list filter reads an index in page order: SQLite's plan for
each (EXPLAIN QUERY PLAN), with and without a cursor, and the pages each gives are the
jobs it should. A first start imports in batches, and one cut short loses no job."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from psik_api_core import JobState
from psik_api_server.jobs import reconcile as reconciling
from psik_api_server.jobs.directory import OWNER_NAME
from psik_api_server.jobs.store import JobRow, JobStore, page_query

CURSOR = (1700000050.0, "1700000050.050")

#: filter -> (states, backend, name, ids: page_query's filters; the index it must use)
FILTERS: dict[str, tuple[list[str], str | None, str | None, list[str], str]] = {
    "none": ([], None, None, [], "jobs_by_owner"),
    "state": (["queued"], None, None, [], "jobs_by_state"),
    "backend": ([], "default", None, [], "jobs_by_backend"),
    "name": ([], None, "n1", [], "jobs_by_name"),
    "ids": ([], None, None, ["1700000001.001", "1700000002.002"], "sqlite_autoindex_jobs_1"),
    "ids and states": (["new", "queued"], None, None, ["1700000001.001"], "sqlite_autoindex_jobs_1"),
    "several states": (["queued", "active", "failed"], None, None, [], "jobs_by_state"),
}


def _plan(db: Path, label: str, cursor: tuple[float, str] | None) -> list[str]:
    states, backend, name, ids, _ = FILTERS[label]
    sql, args = page_query("alice", states, backend, name, ids, cursor, 101)
    with sqlite3.connect(db) as conn:
        return [str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]


@pytest.fixture
def index(tmp_path: Path) -> Path:
    store = JobStore(tmp_path / "index.sqlite").open()
    store.close()
    return tmp_path / "index.sqlite"


@pytest.mark.parametrize("with_cursor", [False, True], ids=["first page", "with a cursor"])
@pytest.mark.parametrize("label", list(FILTERS))
def test_every_list_filter_searches_an_index(index: Path, label: str, with_cursor: bool) -> None:
    states, _, _, ids, expected = FILTERS[label]
    plan = _plan(index, label, CURSOR if with_cursor else None)
    reads = [step for step in plan if " jobs " in f"{step} "]
    assert reads, plan
    for step in reads:
        assert step.startswith("SEARCH jobs USING "), plan  # never a SCAN of the table
        assert f"INDEX {expected} (" in step, plan
        if with_cursor and expected != "sqlite_autoindex_jobs_1":
            # The cursor seeks the index: a deep page reads no earlier page's rows.
            assert "(created,jobid)<(?,?)" in step, plan
    sorts = [step for step in plan if "TEMP B-TREE" in step]
    if ids:
        pass  # sorts at most the ids' rows (up to LIMITS.max_ids)
    elif label == "several states":
        # Each state's page comes in index order, merged; only each arm's LIMIT rows
        # are sorted again (by SQLite's subquery wrapper), never the state's jobs.
        assert "MERGE (UNION ALL)" in plan, plan
        assert len(sorts) == len(states), plan
    else:
        assert not sorts, plan  # the index gives the order


def _rows() -> list[JobRow]:
    states = [JobState.new, JobState.queued, JobState.active, JobState.failed, JobState.completed]
    rows = []
    for i in range(120):
        rows.append(
            JobRow(
                jobid=f"{1700000000 + i // 3}.{i:03d}",
                backend="default" if i % 4 else "other",
                owner="alice" if i % 9 else "bob",
                name=f"n{i % 3}",
                state=states[i % len(states)],
                jobndx=0,
                # Runs of equal creation times cross page boundaries.
                created=float(1700000000 + i // 3),
                updated=float(1700000000 + i),
            )
        )
    return rows


def _pages(
    store: JobStore, states: tuple[JobState, ...], backend: str | None, name: str | None, ids: tuple[str, ...]
) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list(
            "alice", states=states, backend=backend, name=name, ids=ids, limit=7, cursor=cursor
        )
        assert len(page) <= 7
        seen += [r.jobid for r in page]
        if cursor is None:
            return seen


@pytest.mark.parametrize(
    ("states", "backend", "name", "ids"),
    list(
        itertools.product(
            [(), (JobState.queued,), (JobState.new, JobState.failed, JobState.new), tuple(JobState)],
            [None, "other"],
            [None, "n2"],
            [(), ("1700000010.031", "1700000020.061", "1700000030.091", "1700000003.009")],
        )
    ),
)
def test_pages_of_every_filter_are_its_jobs_newest_first(
    tmp_path: Path,
    states: tuple[JobState, ...],
    backend: str | None,
    name: str | None,
    ids: tuple[str, ...],
) -> None:
    store = JobStore(tmp_path / "index.sqlite").open()
    rows = _rows()
    with store.transaction():
        for r in rows:
            store.put(r)
    expected = [
        r.jobid
        for r in sorted(rows, key=lambda r: (r.created, r.jobid), reverse=True)
        if r.owner == "alice"
        and (not states or r.state in states)
        and (backend is None or r.backend == backend)
        and (name is None or r.name == name)
        and (not ids or r.jobid in ids)
    ]
    assert _pages(store, states, backend, name, ids) == expected


def test_a_first_start_cut_short_between_batches_loses_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "jobs"
    for i in range(10):
        base = prefix / f"{1700000000 + i}.{i:03d}"
        base.mkdir(parents=True)
        (base / "spec.json").write_text('{"script": "true"}')
        (base / "status.csv").write_text(f"{1700000000 + i},0,new,\n{1700000000 + i}.5,1,completed,\n")
        if i % 2:
            (base / OWNER_NAME).write_text("bob")
    monkeypatch.setattr(reconciling, "BATCH", 3)
    store = JobStore(tmp_path / "index.sqlite").open()
    batches = 0
    put_many = store.put_many

    def dies_in_the_second_batch(rows: Iterable[JobRow], seen: Mapping[str, int] | None = None) -> None:
        nonlocal batches
        batches += 1
        if batches == 2:
            with store.transaction():  # the server killed mid-transaction
                store.put(next(iter(rows)))
                raise KeyboardInterrupt
        put_many(rows)

    monkeypatch.setattr(store, "put_many", dies_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        reconciling.reconcile(store, prefix, "alice")
    assert store.count() == 3  # the first batch; none of the second
    monkeypatch.setattr(store, "put_many", put_many)
    done = reconciling.reconcile(store, prefix, "alice")  # the next start
    assert done.imported == 7
    owners = {r.jobid: r.owner for r in store.list("alice", limit=20)[0] + store.list("bob", limit=20)[0]}
    assert owners == {f"{1700000000 + i}.{i:03d}": "bob" if i % 2 else "alice" for i in range(10)}
    assert {r.state for r in store.list("alice")[0]} == {JobState.completed}
