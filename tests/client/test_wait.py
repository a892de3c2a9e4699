"""wait/wait_all poll with backoff, return final jobs, and never cancel on timeout."""

from __future__ import annotations

import sys
from collections.abc import Callable

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, FakeTime, job_json, status_json, summary_json

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"


class FakeJobs:
    """A server whose jobs step through given states, one step per state poll."""

    def __init__(self, plans: dict[str, list[str]]) -> None:
        self.plans = plans
        self.polls = dict.fromkeys(plans, 0)

    def state(self, jobid: str) -> str:
        plan = self.plans[jobid]
        return plan[min(self.polls[jobid], len(plan) - 1)]

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method != "GET":
            return httpx.Response(405)
        if path == "/v1/jobs" and request.url.params.get("view") == "full":
            ids = request.url.params.get_list("id")
            items = [job_json(i, self.state(i)) for i in ids if i in self.plans]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        if path == "/v1/jobs":
            ids = request.url.params.get_list("id")
            items = [summary_json(i, self._poll(i)) for i in ids if i in self.plans]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        jobid = path.split("/")[3]
        if path.endswith("/state"):
            return httpx.Response(200, json=status_json(jobid, self._poll(jobid)))
        return httpx.Response(200, json=job_json(jobid, self.state(jobid)))

    def _poll(self, jobid: str) -> str:
        state = self.state(jobid)
        self.polls[jobid] += 1
        return state


async def test_wait_returns_the_final_job(connect: Callable[..., Api], fake_time: FakeTime) -> None:
    jobs = FakeJobs({JOBID: ["queued", "active", "active", "completed"]})
    api = connect(jobs.handler)
    job = await api.wait(JOBID)
    assert isinstance(job, pac.Job)
    assert job.state is pac.JobState.completed
    assert api.methods() == [f"GET /v1/jobs/{JOBID}/state"] * 4 + [f"GET /v1/jobs/{JOBID}"]
    # Quick at first, then backing off.
    assert fake_time.sleeps == pytest.approx([0.02, 0.03, 0.045])


async def test_wait_backoff_is_capped_by_poll_interval(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    jobs = FakeJobs({JOBID: ["active"] * 30 + ["failed"]})
    api = connect(jobs.handler)
    job = await api.wait(JOBID, poll_interval=0.5)
    assert job.state is pac.JobState.failed
    assert max(fake_time.sleeps) == 0.5
    assert fake_time.sleeps == sorted(fake_time.sleeps)


async def test_wait_timeout_raises_and_never_cancels(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    jobs = FakeJobs({JOBID: ["active"]})
    api = connect(jobs.handler)
    start = fake_time.now
    with pytest.raises(pac.WaitTimeout) as info:
        await api.wait(JOBID, timeout=5)
    assert isinstance(info.value, TimeoutError)
    assert info.value.status is not None and info.value.status.state is pac.JobState.active
    assert info.value.pending == [JOBID]
    assert JOBID in str(info.value) and "active" in str(info.value)
    assert fake_time.now - start == pytest.approx(5)
    assert {r.method for r in api.requests} == {"GET"}  # above all, no DELETE


async def test_wait_timeout_zero_polls_once(connect: Callable[..., Api], fake_time: FakeTime) -> None:
    api = connect(FakeJobs({JOBID: ["queued"]}).handler)
    with pytest.raises(pac.WaitTimeout):
        await api.wait(JOBID, timeout=0)
    assert len(api.requests) == 1
    assert fake_time.sleeps == []


async def test_wait_all_polls_all_pending_jobs_in_one_request_per_round(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    jobs = FakeJobs(
        {
            "1.0": ["queued", "completed"],
            "2.0": ["queued", "active", "failed"],
            "3.0": ["queued", "completed"],
        }
    )
    api = connect(jobs.handler)
    progress: list[tuple[int, int]] = []
    done = await api.wait_all(["3.0", "1.0", "2.0"], progress=lambda d, t: progress.append((d, t)))
    assert [j.jobid for j in done] == ["3.0", "1.0", "2.0"]
    assert [j.state.value for j in done] == ["completed", "completed", "failed"]
    assert {r.url.path for r in api.requests} == {"/v1/jobs"}  # no request per job
    rounds = [r for r in api.requests if "view" not in r.url.params]
    assert [r.url.params.get_list("id") for r in rounds] == [
        ["3.0", "1.0", "2.0"],
        ["3.0", "1.0", "2.0"],
        ["2.0"],
    ]
    assert all(r.url.params["limit"] == str(len(r.url.params.get_list("id"))) for r in api.requests)
    # Only the final jobs are fetched whole, once each, together as they end.
    fetched = [r for r in api.requests if r.url.params.get("view") == "full"]
    assert [r.url.params.get_list("id") for r in fetched] == [["3.0", "1.0"], ["2.0"]]
    assert progress == [(0, 3), (2, 3), (3, 3)]
    assert len(fake_time.sleeps) == 2


async def test_wait_all_splits_more_than_1000_ids(connect: Callable[..., Api]) -> None:
    ids = [f"{n}.0" for n in range(1, 1501)]
    api = connect(FakeJobs({i: ["completed"] for i in ids}).handler)
    done = await api.wait_all(ids)
    assert [j.jobid for j in done] == ids
    rounds = [r.url.params.get_list("id") for r in api.requests if "view" not in r.url.params]
    assert [len(chunk) for chunk in rounds] == [1000, 500]
    fetched = [r.url.params.get_list("id") for r in api.requests if r.url.params.get("view") == "full"]
    assert fetched == [ids[:1000], ids[1000:]]


async def test_wait_all_accepts_jobs_and_duplicates(connect: Callable[..., Api]) -> None:
    api = connect(FakeJobs({"1.0": ["completed"], "2.0": ["canceled"]}).handler)
    summary = pac.JobSummary.model_validate(summary_json("2.0"))
    done = await api.wait_all(["1.0", summary, "1.0"])
    assert [j.jobid for j in done] == ["1.0", "2.0", "1.0"]
    rounds = [r for r in api.requests if "view" not in r.url.params]
    assert [r.url.params.get_list("id") for r in rounds] == [["1.0", "2.0"]]


async def test_wait_all_timeout_names_the_pending_jobs_and_cancels_nothing(
    connect: Callable[..., Api],
) -> None:
    api = connect(FakeJobs({"1.0": ["completed"], "2.0": ["active"]}).handler)
    with pytest.raises(pac.WaitTimeout) as info:
        await api.wait_all(["1.0", "2.0"], timeout=3)
    assert info.value.pending == ["2.0"]
    assert {r.method for r in api.requests} == {"GET"}


async def test_wait_all_progress_true_prints_to_stderr_without_tqdm(
    connect: Callable[..., Api], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    api = connect(FakeJobs({"1.0": ["queued", "completed"], "2.0": ["completed"]}).handler)
    await api.wait_all(["1.0", "2.0"], progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "\r0/2 final\r1/2 final\r2/2 final\n"


async def test_wait_all_progress_true_draws_a_tqdm_bar(
    connect: Callable[..., Api], capsys: pytest.CaptureFixture[str]
) -> None:
    api = connect(FakeJobs({"1.0": ["queued", "completed"], "2.0": ["completed"]}).handler)
    await api.wait_all(["1.0", "2.0"], progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    # tqdm (not a terminal here) redraws with \r and ends the bar with a newline.
    first, *_, last = err.removesuffix("\n").split("\r")
    assert first == "" and err.endswith("\n") and "\n" not in err[:-1]
    assert err.split("\r")[1].startswith("  0%|") and " 0/2 final [" in err
    assert last.startswith("100%|██████████| 2/2 final [")


async def test_wait_all_progress_bar_is_closed_on_timeout(
    connect: Callable[..., Api], capsys: pytest.CaptureFixture[str]
) -> None:
    api = connect(FakeJobs({"1.0": ["completed"], "2.0": ["active"]}).handler)
    with pytest.raises(pac.WaitTimeout):
        await api.wait_all(["1.0", "2.0"], timeout=3, progress=True)
    err = capsys.readouterr().err
    # Left at the count reached, and ended: the traceback starts on a line of its own.
    assert err.endswith("\n") and " 1/2 final [" in err.split("\r")[-1]


async def test_wait_all_of_a_job_missing_from_the_list_surfaces_the_404(connect: Callable[..., Api]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs":
            return httpx.Response(200, json={"items": [], "next_cursor": None})
        return httpx.Response(
            404, json={"title": "Not found", "status": 404, "code": "not_found", "detail": "no job 4.0"}
        )

    api = connect(handler)
    with pytest.raises(pac.NotFoundError, match=r"no job 4\.0"):
        await api.wait_all(["4.0"])


async def test_wait_keeps_waiting_if_the_job_was_restarted_meanwhile(connect: Callable[..., Api]) -> None:
    # The state says final, but by the time the whole job is fetched it runs again.
    states = iter(["completed", "completed"])
    jobs = iter([job_json(JOBID, "queued", jobndx=2), job_json(JOBID, "completed", jobndx=2)])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/state"):
            return httpx.Response(200, json=status_json(JOBID, next(states)))
        return httpx.Response(200, json=next(jobs))

    api = connect(handler)
    job = await api.wait(JOBID)
    assert (job.state, job.jobndx) == (pac.JobState.completed, 2)
    assert len(api.requests) == 4


async def test_waiting_for_jobs_never_started_does_not_call_them_running(connect: Callable[..., Api]) -> None:
    """A job still ``new`` never ran: "left running" would send its user looking for it."""
    api = connect(FakeJobs({JOBID: ["new"], "2.0": ["new"], "3.0": ["active"]}).handler)
    with pytest.raises(pac.WaitTimeout) as one:
        await api.wait(JOBID, timeout=0)
    assert str(one.value) == f"job {JOBID} is not final after 0 s (last state: new); it was never started"
    with pytest.raises(pac.WaitTimeout) as many:
        await api.wait_all([JOBID, "2.0", "3.0"], timeout=0)
    assert str(many.value) == (
        f"3 of 3 jobs not final after 0 s (first: {JOBID}); 2 of them were never started "
        "(state new), the others were left running"
    )
