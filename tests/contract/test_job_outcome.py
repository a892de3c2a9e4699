"""``Job.native_id`` and ``Job.exit_code`` say plainly what psik's ``info`` meant: the
backend's id of the current run (here the local process id) and the script's exit
status, through the real client and server, on real local jobs."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.anyio


async def test_exit_status_and_process_id_of_real_jobs(api: Any) -> None:
    new = await api.create({"script": "exit 3"})
    assert (new.native_id, new.exit_code) == (None, None)
    await api.start(new.jobid)
    failed = await api.wait(new.jobid, timeout=60)
    queued = next(t for t in failed.history if t.state == "queued" and t.jobndx == 1)
    assert (failed.state, failed.exit_code) == ("failed", 3)
    assert failed.native_id == queued.info and failed.native_id.isdigit()  # psik's info, kept as written
    ok = await api.wait((await api.submit({"script": "true"})).jobid, timeout=60)
    assert (ok.state, ok.exit_code) == ("completed", 0) and ok.native_id.isdigit()
    assert ok.native_id != failed.native_id


async def test_a_canceled_job_has_no_exit_code(api: Any) -> None:
    job = await api.submit({"script": "sleep 60"})
    canceled = await api.cancel(job.jobid)
    assert canceled.state == "canceled" and canceled.exit_code is None
    assert canceled.native_id is not None and canceled.native_id.isdigit()
