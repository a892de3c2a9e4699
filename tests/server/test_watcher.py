"""The StatusWatcher sees each appended row once, copes with half-written lines and
out-of-order rows, and stops following a job once it is final."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anyio
import pytest

from psik_api_core import JobState, derive_state
from psik_api_server.jobs.directory import JobFileInvalid, Row
from psik_api_server.jobs.watcher import Change, StatusWatcher

pytestmark = pytest.mark.anyio


class Seen:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Row]]] = []
        self.changed = anyio.Event()

    async def __call__(self, changes: list[Change]) -> None:
        self.calls.extend((c.jobid, c.new) for c in changes)
        self.changed.set()

    async def next(self) -> list[Row]:
        with anyio.fail_after(5):
            await self.changed.wait()
        self.changed = anyio.Event()
        return self.calls[-1][1]


async def test_new_rows_are_reported_once_and_final_jobs_dropped(tmp_path: Path) -> None:
    status = tmp_path / "status.csv"
    status.write_text("1.0,0,new,{}\n")
    seen = Seen()
    w = StatusWatcher(seen, interval=0.01)
    w.follow("1.0", status)
    w.start()
    try:
        assert [r.state for r in await seen.next()] == [JobState.new]
        with status.open("a") as f:
            f.write("2.1,1,active,\n2.2,1,comp")  # active before queued; a half-written row
        assert [r.state for r in await seen.next()] == [JobState.active]
        with status.open("a") as f:
            f.write("leted,\n")
        assert [r.state for r in await seen.next()] == [JobState.completed]
        assert len(w) == 0  # final: no longer followed
        with status.open("a") as f:
            f.write("2.0,1,queued,99\n")  # the late row psik can write
        await w.check_all()  # a whole look, done: the final job is not looked at
        assert len(seen.calls) == 3
    finally:
        await w.stop()


async def test_malformed_rows_are_skipped_not_fatal(tmp_path: Path) -> None:
    status = tmp_path / "status.csv"
    status.write_text("1.0,0,new,{}\nnot,a,row\n2.0,1,queued,7\n")
    seen = Seen()
    w = StatusWatcher(seen, interval=0.01)
    w.follow("1.0", status)
    w.start()
    try:
        rows = await seen.next()
        assert [r.state for r in rows] == [JobState.new, JobState.queued]
        assert derive_state(rows) == (JobState.queued, 1)
    finally:
        await w.stop()


async def test_a_purged_job_is_forgotten(tmp_path: Path) -> None:
    seen = Seen()
    w = StatusWatcher(seen, interval=0.01)
    w.follow("1.0", tmp_path / "1.0" / "status.csv")  # its directory is gone
    await w.check_all()
    assert len(w) == 0 and seen.calls == []


class Broken:
    def __init__(self) -> None:
        self.got: list[tuple[str, str, list[Row]]] = []

    async def __call__(self, e: JobFileInvalid, rows: list[Row]) -> None:
        self.got.append((e.jobid, e.why, rows))


@pytest.mark.parametrize("how", ["fifo", "directory", "symlink", "missing"])
async def test_a_status_file_the_job_replaced_is_given_up_once_and_holds_up_no_other(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO would hold a plain open (and the watcher with it) for ever; a directory was
    warned about at every tick. Either is told to ``on_broken`` once, with the rows read
    before, and the other jobs are still seen."""
    bad, good = tmp_path / "1.0", tmp_path / "2.0"
    for d in (bad, good):
        d.mkdir()
        (d / "status.csv").write_text("1.0,0,new,{}\n2.0,1,queued,7\n")
    seen, broken = Seen(), Broken()
    w = StatusWatcher(seen, interval=0.01, on_broken=broken)
    w.follow("1.0", bad / "status.csv")
    w.follow("2.0", good / "status.csv")
    w.start()
    try:
        with anyio.fail_after(5):
            while len(seen.calls) < 2:  # both read once
                await anyio.sleep(0.01)
        (bad / "status.csv").unlink()
        if how == "fifo":
            os.mkfifo(bad / "status.csv")
        elif how == "directory":
            (bad / "status.csv").mkdir()
        elif how == "symlink":
            (bad / "status.csv").symlink_to(good / "status.csv")
        with anyio.fail_after(5):
            while not broken.got:
                await anyio.sleep(0.01)
        with (good / "status.csv").open("a") as f:
            f.write("3.0,1,active,\n")
        with anyio.fail_after(5):
            while ("2.0", JobState.active) not in [(j, r.state) for j, rows in seen.calls for r in rows]:
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)  # ten more ticks
        assert len(broken.got) == 1 and len(w) == 1
        jobid, why, rows = broken.got[0]
        assert jobid == "1.0" and [r.state for r in rows] == [JobState.new, JobState.queued]
        assert why == {"fifo": "is a FIFO", "directory": "is a directory", "missing": "is missing"}.get(
            how, "is a symbolic link"
        ) + ("" if how == "missing" else ", not a regular file")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        await w.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
async def test_file_notifications_see_a_write_long_before_the_tick(tmp_path: Path) -> None:
    status = tmp_path / "status.csv"
    status.write_text("1.0,0,new,{}\n")
    seen = Seen()
    w = StatusWatcher(seen, interval=60.0)  # the tick alone would take a minute
    w.start()
    try:
        assert w.notifications
        w.follow("1.0", status)
        assert [r.state for r in await seen.next()] == [JobState.new]
        with status.open("a") as f:
            f.write("2.0,1,queued,7\n")
        assert [r.state for r in await seen.next()] == [JobState.queued]  # next() gives up after 5 s
    finally:
        await w.stop()


async def test_the_tick_alone_works_without_notifications(tmp_path: Path) -> None:
    status = tmp_path / "status.csv"
    status.write_text("1.0,0,new,{}\n")
    seen = Seen()
    w = StatusWatcher(seen, interval=0.01, notify=False)
    w.start()
    try:
        assert not w.notifications
        w.follow("1.0", status)
        assert [r.state for r in await seen.next()] == [JobState.new]
        with status.open("a") as f:
            f.write("2.0,1,queued,7\n2.1,1,failed,1\n")
        assert [r.state for r in await seen.next()] == [JobState.queued, JobState.failed]
    finally:
        await w.stop()


class Flaky:
    """An on_change that fails with ``error`` ``times`` times, then records."""

    def __init__(self, error: Exception, times: int) -> None:
        self.error = error
        self.left = times
        self.tries = 0
        self.recorded: list[Change] = []

    async def __call__(self, changes: list[Change]) -> None:
        self.tries += 1
        if self.left > 0:
            self.left -= 1
            raise self.error
        self.recorded.extend(changes)


async def test_changes_a_full_disk_kept_out_of_the_index_are_given_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    status = tmp_path / "status.csv"
    status.write_text("1.0,0,new,{}\n1.1,1,queued,7\n")
    flaky = Flaky(sqlite3.OperationalError("database or disk is full"), times=3)
    w = StatusWatcher(flaky, interval=0.01, notify=False)
    w.follow("1.0", status)
    await w.check_all()  # read once, not recorded
    assert (flaky.tries, w.unrecorded) == (1, 1)
    with status.open("a") as f:
        f.write("1.2,1,active,\n1.3,1,completed,\n")
    await w.check_all()  # the job is final (no longer followed), its change kept
    assert len(w) == 0 and w.unrecorded == 1
    w.start()
    try:
        with anyio.fail_after(5):
            while not flaky.recorded:
                await anyio.sleep(0.01)
    finally:
        await w.stop()
    [change] = flaky.recorded
    assert derive_state(change.rows) == (JobState.completed, 1)
    assert [r.state for r in change.new] == [
        JobState.new,
        JobState.queued,
        JobState.active,
        JobState.completed,
    ]
    assert w.unrecorded == 0
    assert not [r for r in caplog.records if r.exc_info]  # the service says a full disk, once


async def test_a_change_that_cannot_be_recorded_for_another_reason_is_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = tmp_path / "status.csv"
    status.write_text("1.0,0,new,{}\n")
    flaky = Flaky(ValueError("a bug"), times=1)
    w = StatusWatcher(flaky, interval=0.01, notify=False)
    w.follow("1.0", status)
    await w.check_all()
    await w.check_all()
    assert (flaky.tries, w.unrecorded, flaky.recorded) == (1, 0, [])
    assert [r for r in caplog.records if r.exc_info]  # logged with its traceback, as before
