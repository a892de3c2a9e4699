"""The job lifecycle, driven by the real client against the real server running real
jobs on psik's local backend, in all four client modes (see tests/conftest.py)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from psik_api_client import (
    ConflictError,
    JobSpec,
    JobState,
    NotFoundError,
    ResourceSpec,
    SubmitFailedError,
    UnknownBackendError,
    UnprocessableEntityError,
    WaitTimeout,
)
from psik_api_server.backends.local.liveness import process_running
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


async def test_submit_wait_completes(api: Any) -> None:
    job = await api.submit(JobSpec(name="hello", script="echo hello; echo oops >&2"))
    assert job.state in (JobState.queued, JobState.active, JobState.completed)
    assert job.jobndx == 1
    done = await api.wait(job.jobid, timeout=30)
    assert done.state is JobState.completed
    assert next(t.state for t in done.history) is JobState.new
    assert {JobState.queued, JobState.active, JobState.completed} <= {t.state for t in done.history}
    assert done.owner == "local:psik_api"
    assert done.spec.script == "echo hello; echo oops >&2"
    status = await api.state(job.jobid)
    assert status.state is JobState.completed and status.jobndx == 1


async def test_failing_script_ends_failed(api: Any) -> None:
    job = await api.submit({"script": "exit 3"})
    done = await api.wait(job.jobid, timeout=30)
    assert done.state is JobState.failed
    assert done.history[-1].info == "3"


async def test_create_then_start_then_restart(api: Any) -> None:
    job = await api.create({"name": "staged", "script": "true"})
    assert job.state is JobState.new and job.jobndx == 0
    assert (await api.state(job.jobid)).state is JobState.new
    started = await api.start(job.jobid)
    assert started.jobndx == 1
    first = await api.wait(job.jobid, timeout=30)
    assert first.state is JobState.completed
    again = await api.start(job.jobid)  # a final job may run again, as the next jobndx
    assert again.jobndx == 2
    second = await api.wait(job.jobid, timeout=30)
    assert second.state is JobState.completed and second.jobndx == 2


async def test_start_while_queued_or_active_is_409_and_runs_nothing_twice(api: Any) -> None:
    job = await api.submit({"script": "sleep 30"})
    with pytest.raises(ConflictError) as early:
        await api.start(job.jobid)  # at once: queued, or active already
    assert early.value.status_code == 409 and early.value.state in ("queued", "active")
    await _until_state(api, job.jobid, JobState.active)
    with pytest.raises(ConflictError) as err:
        await api.start(job.jobid)
    assert job.jobid in str(err.value)
    assert (err.value.status_code, err.value.jobid, err.value.state) == (409, job.jobid, "active")
    canceled = await api.cancel(job.jobid)
    assert canceled.state is JobState.canceled
    after = await api.get(job.jobid)
    assert [t.state for t in after.history].count(JobState.queued) == 1


#: A long job that, when canceled, records a late ``completed`` for its run, as psik does
#: when the script ends just as the cancel arrives (psik writes a job's final row from
#: inside the job's own process). It says when its trap is set, so the cancel cannot
#: arrive before it.
LATE_COMPLETED = """\
trap 'echo "$(date +%s.%N),$jobndx,completed," >> "$base/status.csv"; exit 0' TERM
touch "$base/trap-set"
sleep 60 & wait
"""


async def test_cancel_long_job_stays_canceled(api: Any, settings: Settings) -> None:
    job = await api.submit({"name": "long", "script": LATE_COMPLETED})
    base = settings.prefix / job.jobid
    with anyio.fail_after(20):
        while not (base / "trap-set").exists():
            await anyio.sleep(0.02)
    canceled = await api.cancel(job.jobid)
    assert canceled.state is JobState.canceled
    assert canceled.native_id is not None
    # The job's process is the only writer left: once it is gone, status.csv is final.
    with anyio.fail_after(20):
        while process_running(int(canceled.native_id), time.time()):
            await anyio.sleep(0.02)
    lines = [line.split(",") for line in (base / "status.csv").read_text().splitlines()]
    rows = [fields[1:3] for fields in lines]
    assert rows[-2:] == [["0", "canceled"], ["1", "completed"]]  # the late row is there
    assert (await api.state(job.jobid)).state is JobState.canceled  # the index, as last updated
    final = await api.get(job.jobid)
    assert final.state is JobState.canceled and final.exit_code is None
    # The history is in time order; psik's rows of one run can be in another order in the
    # file (its queued row is written after the job's own first rows at times: psik-3.md).
    by_time = sorted(lines, key=lambda fields: float(fields[0]))
    assert [(t.jobndx, t.state.value) for t in final.history] == [(int(f[1]), f[2]) for f in by_time]
    assert (await api.state(job.jobid)).state is JobState.canceled
    again = await api.cancel(job.jobid)  # idempotent: still canceled, nothing new recorded
    assert again.state is JobState.canceled
    assert again.history == final.history


async def test_cancel_of_final_job_leaves_it_alone(api: Any) -> None:
    job = await api.submit({"script": "true"})
    done = await api.wait(job.jobid, timeout=30)
    after = await api.cancel(job.jobid)
    assert after.state is JobState.completed
    assert len(after.history) == len(done.history)


async def test_cancel_new_job(api: Any) -> None:
    job = await api.create({"script": "true"})
    assert (await api.cancel(job.jobid)).state is JobState.canceled


async def test_purge_removes_final_job_only(api: Any) -> None:
    running = await api.submit({"script": "sleep 30"})
    with pytest.raises(ConflictError):
        await api.purge(running.jobid)
    await api.cancel(running.jobid)
    await api.purge(running.jobid)
    with pytest.raises(NotFoundError):
        await api.get(running.jobid)
    assert running.jobid not in [j.jobid for j in await api.list()]


async def test_wait_timeout_raises_and_leaves_job_running(api: Any) -> None:
    job = await api.submit({"script": "sleep 30"})
    with pytest.raises(WaitTimeout):
        await api.wait(job.jobid, timeout=0.3)
    assert (await api.state(job.jobid)).state in (JobState.queued, JobState.active)
    await api.cancel(job.jobid)


async def test_list_filters_and_pages(api: Any) -> None:
    jobs = [await api.create({"name": f"j{i % 2}", "script": "true"}) for i in range(5)]
    ids = [j.jobid for j in jobs]
    listed = [j.jobid for j in await api.list(page_size=2)]
    assert listed == list(reversed(ids))  # newest first, across pages
    assert {j.jobid for j in await api.list(name="j0")} == {ids[0], ids[2], ids[4]}
    assert {j.jobid for j in await api.list(ids=[ids[1], ids[3]])} == {ids[1], ids[3]}
    assert await api.list(state="queued") == []
    assert len(await api.list(state=["new"], limit=3)) == 3


async def test_unknown_backend_is_refused_and_makes_no_job(api: Any) -> None:
    with pytest.raises(UnknownBackendError) as err:
        await api.submit({"script": "true", "backend": "nope"})
    assert "nope" in str(err.value)
    assert await api.list() == []


async def test_missing_interpreter_fails_the_submit_and_is_recorded(api: Any) -> None:
    with pytest.raises(SubmitFailedError) as err:
        await api.submit({"script": "#!/no/such/interpreter\necho hi"})
    jobid = err.value.jobid
    assert jobid is not None
    assert "/no/such/interpreter" in str(err.value)
    job = await api.get(jobid)
    assert job.state is JobState.failed  # never left silently in `new`
    assert "/no/such/interpreter" in job.history[-1].info


async def test_get_unknown_job_is_404(api: Any) -> None:
    with pytest.raises(NotFoundError) as err:
        await api.get("1000000000.001")
    assert err.value.status_code == 404 and err.value.code == "not_found"


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
async def test_bad_body_reaches_the_server_and_the_422_names_the_field(api: Any) -> None:
    # The client checks a dict before sending it but trusts a JobSpec; one changed after
    # it was made (models do not validate assignments) reaches the server as it is.
    spec = JobSpec(script="true", resources=ResourceSpec())
    spec.resources.duration = "long"  # type: ignore[assignment]
    for send in (api.submit, api.create):
        with pytest.raises(UnprocessableEntityError) as err:
            await send(spec)
        assert err.value.status_code == 422 and err.value.code == "validation_error"
        assert err.value.problem is not None and err.value.problem.errors is not None
        assert [e.loc for e in err.value.problem.errors] == [["body", "resources", "duration"]]
    assert await api.list() == []


async def test_backends(api: Any) -> None:
    backends = await api.backends()
    assert [(b.name, b.type, b.healthy) for b in backends] == [("default", "local", True)]


async def _until_state(api: Any, jobid: str, state: JobState, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while (await api.state(jobid)).state is not state:
            await anyio.sleep(0.02)
