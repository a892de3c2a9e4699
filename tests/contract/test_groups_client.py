"""The client's workflows against the real server (issue 18): submit_many and sweep
make their jobs in one request, in order; a sweep's values are in its jobs'
environments; list(label=..., group=...) finds them; group and cancel_group; and
wait_all of a group costs a constant number of requests, not one per job."""

from __future__ import annotations

from typing import Any

import pytest

from contract.test_events_client import Counting
from psik_api_client import Client, Group, Job, JobState, NotFoundError, UnprocessableEntityError
from support import LiveServer

pytestmark = pytest.mark.anyio

JOBS = 20


async def test_a_sweep_runs_each_combination_with_its_values(api: Any) -> None:
    group = await api.sweep(
        {"script": 'echo "$X-$Y"', "labels": {"run": "sweep"}}, {"X": [1, 2], "Y": ["a", "b"]}
    )
    assert isinstance(group, Group) and len(group.jobs) == 4
    assert all(isinstance(job, Job) for job in group.jobs)
    envs = [(job.spec.environment["X"], job.spec.environment["Y"]) for job in group.jobs]
    assert envs == [("1", "a"), ("1", "b"), ("2", "a"), ("2", "b")]  # the last name fastest
    done = await api.wait_all(group, timeout=60)
    assert [j.jobid for j in done] == [j.jobid for j in group.jobs]
    assert {j.state for j in done} == {JobState.completed}
    outputs = [await api.read_log(j.jobid, f"stdout.{j.jobndx}") for j in done]
    assert outputs == [b"1-a\n", b"1-b\n", b"2-a\n", b"2-b\n"]
    summary = await api.group(group.group)
    assert summary.states == {JobState.completed: 4}
    assert [j.jobid for j in summary.jobs] == [j.jobid for j in group.jobs]


async def test_submit_many_and_list_by_label_and_group(api: Any) -> None:
    specs = [{"script": "true", "name": f"m{n}", "labels": {"run": "r1", "n": str(n)}} for n in range(3)]
    group = await api.submit_many(specs)
    other = await api.submit({"script": "true"}, labels={"run": "r2"})
    ids = [j.jobid for j in group.jobs]
    assert [j.name for j in group.jobs] == ["m0", "m1", "m2"]
    listed = await api.list(label={"run": "r1"})
    assert sorted(j.jobid for j in listed) == sorted(ids)
    assert [j.jobid for j in await api.list(label=["run=r1", "n=1"])] == [ids[1]]
    assert [j.jobid for j in await api.list(label="run=r2")] == [other.jobid]
    assert sorted(j.jobid for j in await api.list(group=group.group)) == sorted(ids)
    await api.wait_all(group=group.group, timeout=60)


async def test_a_bad_entry_refuses_the_whole_group(api: Any) -> None:
    with pytest.raises(UnprocessableEntityError, match=r"jobs\[1\]"):
        await api.submit_many([{"script": "true"}, {"script": "true", "backend": "nowhere"}])
    assert await api.list() == []  # nothing was made


async def test_cancel_group_and_an_unknown_group(api: Any) -> None:
    group = await api.submit_many([{"script": "sleep 30"}] * 3)
    canceled = await api.cancel_group(group.group)
    assert [j.jobid for j in canceled.jobs] == [j.jobid for j in group.jobs]
    done = await api.wait_all(group, timeout=60)
    assert {j.state for j in done} == {JobState.canceled}
    with pytest.raises(NotFoundError):
        await api.group("0" * 32)


@pytest.mark.parametrize("events", [True, False], ids=["stream", "polling"])
def test_wait_all_of_a_group_costs_a_constant_number_of_requests(live_app: LiveServer, events: bool) -> None:
    transport = Counting()  # an httpx.HTTPTransport: the stream is on unless events=False
    with Client(live_app.url, transport=transport, events=events) as api:
        group = api.submit_many([{"script": "sleep 0.3"} for _ in range(JOBS)])
        assert transport.sent == {"POST /v1/groups": 1}
        transport.sent.clear()
        done = api.wait_all(group=group.group, timeout=60)
    assert [j.jobid for j in done] == [j.jobid for j in group.jobs]
    assert {j.state for j in done} == {JobState.completed}
    sent = dict(transport.sent)
    # No request names one job: the members come with the group, their ends by the
    # stream (or the polling rounds), the final jobs whole by GET /v1/jobs?view=full.
    assert set(sent) <= {f"GET /v1/groups/{group.group}", "GET /v1/events", "GET /v1/jobs"}
    assert sent[f"GET /v1/groups/{group.group}"] == 1
    if events:
        # The stream, the list of states, and the final jobs whole (those final by
        # the list, then the rest once all ended).
        assert sent["GET /v1/events"] == 1
        assert sent["GET /v1/jobs"] in (2, 3)


async def test_after_orders_jobs_and_cancels_those_that_cannot_start(api: Any) -> None:
    first = await api.submit({"script": "sleep 0.3"})
    then = await api.submit({"script": "true"}, after=[first])
    either = await api.submit({"script": "true"}, after=[(first, "failed")])
    done = await api.wait_all([first, then, either], timeout=60)
    assert [j.state for j in done] == [JobState.completed, JobState.completed, JobState.canceled]
    started = min(r.time for r in done[1].history if r.state is JobState.active)
    assert started >= done[0].updated  # it started only once its parent had ended
    assert first.jobid in done[2].history[-1].info  # why it was canceled


async def test_a_graph_of_jobs_is_one_request(api: Any) -> None:
    # A diamond: 0 -> (1, 2) -> 3; a failed 0 cancels the rest, each saying why.
    diamond = [
        {"script": "exit 1"},
        {"script": "true", "after": [{"index": 0}]},
        {"script": "true", "after": [{"index": 0}]},
        {"script": "true", "after": [{"index": 1}, {"index": 2, "condition": "any"}]},
    ]
    group = await api.submit_many(diamond)
    done = await api.wait_all(group, timeout=60)
    assert [j.state for j in done] == [JobState.failed] + [JobState.canceled] * 3
    assert all(j.history[-1].info for j in done[1:])
