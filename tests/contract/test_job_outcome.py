"""``Job.native_id`` and ``Job.exit_code`` say plainly what psik's ``info`` meant: the
backend's id of the current run (here the local process id) and the script's exit
status, through the real client and server, on real local jobs."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from conftest import lazy_app
from psik_api_client import Client, JobState, cli
from psik_api_server.settings import Settings
from support import LiveServer

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


# ---- the exit code in lists: the index keeps it, so a page carries it ----


async def _ended_in_index(api: Any, jobid: str) -> None:
    """Until the index says the job ended: GET /state reads only the index, so what a
    list shows next is what the watcher recorded, not what a GET re-read."""
    with anyio.fail_after(60):
        while not (await api.state(jobid)).state.is_final:
            await anyio.sleep(0.02)


async def _listed_as_got(api: Any, jobid: str) -> Any:
    """The job's list item, checked against GET /v1/jobs/{id} (listed first)."""
    (item,) = await api.list(ids=[jobid])
    job = await api.get(jobid)
    assert (item.state, item.jobndx, item.exit_code) == (job.state, job.jobndx, job.exit_code)
    return item


async def test_a_list_item_has_the_exit_code_of_its_job(api: Any) -> None:
    failed = await api.submit({"script": "exit 3"})
    ok = await api.submit({"script": "true"})
    running = await api.submit({"script": "sleep 60"})
    new = await api.create({"script": "true"})
    for job in (failed, ok):
        await _ended_in_index(api, job.jobid)
    assert await api.cancel(running.jobid)
    listed = {j.jobid: (j.state, j.exit_code) for j in await api.list()}
    assert listed == {
        failed.jobid: (JobState.failed, 3),
        ok.jobid: (JobState.completed, 0),
        running.jobid: (JobState.canceled, None),
        new.jobid: (JobState.new, None),
    }
    for job in (failed, ok, running, new):
        await _listed_as_got(api, job.jobid)


#: Run 1 fails with 3; run 2 waits for a file ``go`` (uploaded by the test), then completes.
RERUN = """\
if [ "$jobndx" = 1 ]; then exit 3; fi
i=0
while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
"""


async def test_a_rerun_clears_the_exit_code_until_it_ends(api: Any) -> None:
    job = await api.submit({"script": RERUN})
    await _ended_in_index(api, job.jobid)
    assert (await _listed_as_got(api, job.jobid)).exit_code == 3
    again = await api.start(job.jobid)
    assert again.jobndx == 2 and not again.state.is_final
    (item,) = await api.list(ids=[job.jobid])
    assert (item.jobndx, item.exit_code) == (2, None)  # run 1's 3 is not run 2's
    assert (await _listed_as_got(api, job.jobid)).exit_code is None
    await api.upload(job.jobid, b"", "go")
    await _ended_in_index(api, job.jobid)
    item = await _listed_as_got(api, job.jobid)
    assert (item.state, item.jobndx, item.exit_code) == (JobState.completed, 2, 0)


class _Counted:
    """The app, noting every HTTP request it is sent (method and path)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


def test_ls_shows_exit_codes_with_one_request_per_page(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("PSIK_API_URL", "PSIK_API_UDS", "PSIK_API_TOKEN", "PSIK_API_CERTIFIED"):
        monkeypatch.delenv(name, raising=False)
    counted = _Counted(lazy_app(settings))
    with LiveServer(counted) as live, Client(live.url) as api:
        new = api.create({"name": "never", "script": "true"})
        failed = api.submit({"name": "three", "script": "exit 3"})
        ok = api.submit({"name": "zero", "script": "true"})
        for job in (failed, ok):
            api.wait(job.jobid, timeout=60)
        for argv, shown in ((["ls"], 3), (["ls", "--limit", "2"], 2)):
            counted.requests.clear()
            assert cli.main(["--url", live.url, *argv]) == 0
            assert counted.requests == [("GET", "/v1/jobs")]  # one page, no GET per job
            lines = capsys.readouterr().out.splitlines()
            assert lines[0].split()[-2:] == ["EXIT", "NAME"]
            exits = {line.split()[0]: line.split()[-2] for line in lines[1:]}
            want = {ok.jobid: "0", failed.jobid: "3", new.jobid: "-"}
            assert exits == {j: want[j] for j in list(want)[:shown]}
