"""Workflows in the client (issue 18): submit with after= and labels=, submit_many and
sweep (POST /v1/groups), group and cancel_group, list by label and group, wait_all of a
group; and wait_all's requests, a constant number for any number of jobs (fake server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, job_json, problem, summary_json

pytestmark = pytest.mark.anyio

GROUP = "0123456789abcdef0123456789abcdef"
A, B = "1693992878.203", "1693992878.204"


def group_json(jobs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"group": GROUP, "jobs": jobs, **extra}


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def made(request: httpx.Request) -> httpx.Response:
    """POST /v1/groups: a job per spec (or per combination), in order."""
    sent = body(request)
    count = len(sent["jobs"]) if "jobs" in sent else 4
    return httpx.Response(201, json=group_json([job_json(f"{n}.0") for n in range(1, count + 1)]))


# ---- submit: after= and labels= ----


async def test_submit_sends_after_and_labels_in_the_spec(connect: Callable[..., Api]) -> None:
    api = connect(lambda request: httpx.Response(201, json=job_json()))
    parent = pac.Job.model_validate(job_json(B))
    spec = {"script": "true", "labels": {"run": "r0", "step": "fit"}, "after": [{"jobid": "7.0"}]}
    await api.submit(spec, after=[A, (parent, "any"), ("8.0", "failed")], labels={"run": "r1"})
    sent = body(api.requests[0])
    assert api.methods() == ["POST /v1/jobs"]
    assert sent["labels"] == {"run": "r1", "step": "fit"}  # the call's over the spec's
    assert sent["after"] == [
        {"jobid": "7.0"},  # as the spec had it (the server's default: ok)
        {"jobid": A, "condition": "ok"},
        {"jobid": B, "condition": "any"},
        {"jobid": "8.0", "condition": "failed"},
    ]


async def test_submit_without_after_or_labels_sends_the_spec_as_it_was(connect: Callable[..., Api]) -> None:
    api = connect(lambda request: httpx.Response(201, json=job_json()))
    await api.submit({"script": "true"})
    assert body(api.requests[0]) == {"script": "true"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"after": [(A, "done")]}, "one of ok, failed, any, not 'done'"),
        ({"after": A}, "after= takes a list of jobs"),
        ({"after": [(A, "ok", "x")]}, "an entry is a job or"),
        ({"after": ["../x"]}, "not a job id"),
        ({"after": [A] * 101}, "after"),  # core's limit: 100
        ({"labels": {"bad key": "v"}}, "labels"),
        ({"labels": {f"k{n}": "v" for n in range(33)}}, "labels"),
        ({"labels": ["run=r1"]}, "labels= is a mapping"),
    ],
)
async def test_bad_after_or_labels_fail_before_sending(
    connect: Callable[..., Api], kwargs: dict[str, Any], message: str
) -> None:
    api = connect(lambda request: httpx.Response(201, json=job_json()))
    with pytest.raises(pac.InvalidRequestError, match=message):
        await api.submit({"script": "true"}, **kwargs)
    assert api.requests == []


# ---- submit_many, sweep ----


async def test_submit_many_is_one_request_in_order(connect: Callable[..., Api]) -> None:
    api = connect(made)
    specs = [{"script": f"echo {n}"} for n in range(3)]
    specs[2]["after"] = [{"index": 0}, {"index": 1, "condition": "any"}]
    group = await api.submit_many([specs[0], pac.JobSpec(script="echo 1"), specs[2]], idempotency_key="k1")
    assert isinstance(group, pac.Group) and group.group == GROUP
    assert [j.jobid for j in group.jobs] == ["1.0", "2.0", "3.0"]
    assert all(isinstance(j, pac.Job) for j in group.jobs)
    request = api.requests[0]
    assert api.methods() == ["POST /v1/groups"]
    assert request.headers["Idempotency-Key"] == "k1"
    assert body(request) == {
        "jobs": [
            {"script": "echo 0"},
            {"script": "echo 1"},
            {"script": "echo 2", "after": [{"index": 0}, {"index": 1, "condition": "any"}]},
        ]
    }


async def test_submit_many_is_retried_with_the_same_key(connect: Callable[..., Api]) -> None:
    answers = iter([problem(503, "backend_unavailable", "busy"), None])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers) or made(request)

    api = connect(handler)
    await api.submit_many([{"script": "true"}])
    first, second = api.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (
            [{"script": "true"}, {"script": "true"}, {"script": "true", "nope": 1}],
            r"jobs\[2\]: invalid job spec",
        ),
        ([], "1 to 1000 jobs, not 0"),
        ([{"script": "true"}] * 1001, "1 to 1000 jobs, not 1001"),
        ({"script": "true"}, "a list of job specs"),
        ([3], r"jobs\[0\]: a job spec is a JobSpec or a mapping"),
    ],
)
async def test_submit_many_refuses_bad_specs_naming_the_entry(
    connect: Callable[..., Api], specs: Any, message: str
) -> None:
    api = connect(made)
    with pytest.raises(pac.InvalidRequestError, match=message):
        await api.submit_many(specs)
    assert api.requests == []


async def test_a_group_refused_by_the_server_is_its_422(connect: Callable[..., Api]) -> None:
    errors = [{"loc": ["body", "jobs", 1, "after", 0, "jobid"], "msg": "no such job", "type": "value_error"}]

    def refuse(request: httpx.Request) -> httpx.Response:
        return problem(422, "validation_error", "jobs[1].after[0].jobid: no such job", errors=errors)

    api = connect(refuse)
    with pytest.raises(pac.UnprocessableEntityError, match=r"jobs\[1\]") as info:
        await api.submit_many([{"script": "true"}, {"script": "true", "after": [{"jobid": "9.0"}]}])
    assert info.value.problem is not None and info.value.problem.errors
    assert len(api.requests) == 1  # a 422 is not retried


async def test_sweep_sends_the_spec_and_its_params(connect: Callable[..., Api]) -> None:
    api = connect(made)
    group = await api.sweep({"script": "./fit $X $N"}, {"X": ["a", "b"], "N": [1, 2.5]})
    assert len(group.jobs) == 4
    assert api.methods() == ["POST /v1/groups"]
    assert "Idempotency-Key" in api.requests[0].headers
    assert body(api.requests[0]) == {
        "spec": {"script": "./fit $X $N"},
        "params": {"X": ["a", "b"], "N": ["1", "2.5"]},
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"X": "123"}, "is a list of values"),
        ({"X": [True]}, "a str or a number"),
        ({"1X": ["1"]}, "invalid sweep: params.1X"),
        ({"X": []}, "params.X: List should have at least 1 item"),
        ({"X": [str(n) for n in range(40)], "Y": [str(n) for n in range(30)]}, "1200 jobs"),
        ({}, "invalid sweep"),
        (["X=1"], "a mapping"),
    ],
)
async def test_bad_sweeps_fail_before_sending(connect: Callable[..., Api], params: Any, message: str) -> None:
    api = connect(made)
    with pytest.raises(pac.InvalidRequestError, match=message):
        await api.sweep({"script": "true"}, params)
    assert api.requests == []


# ---- group, cancel_group, list ----


async def test_group_and_cancel_group(connect: Callable[..., Api]) -> None:
    members = [summary_json(A, "completed"), summary_json(B, "active")]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=group_json(members, states={"completed": 1, "active": 1}))

    api = connect(handler)
    group = await api.group(GROUP)
    assert [j.jobid for j in group.jobs] == [A, B]
    assert group.states == {pac.JobState.completed: 1, pac.JobState.active: 1}
    await api.cancel_group(GROUP)
    assert api.methods() == [f"GET /v1/groups/{GROUP}", f"DELETE /v1/groups/{GROUP}"]


async def test_an_unknown_group_is_not_found(connect: Callable[..., Api]) -> None:
    api = connect(lambda request: problem(404, "not_found", f"no group {GROUP}"))
    with pytest.raises(pac.NotFoundError, match="no group"):
        await api.group(GROUP)


@pytest.mark.parametrize("group", ["../x", "ABCDEF0123456789ABCDEF0123456789", "0123", 12])
async def test_malformed_group_ids_never_reach_a_url(connect: Callable[..., Api], group: Any) -> None:
    api = connect(lambda request: httpx.Response(200, json=group_json([])))
    with pytest.raises(pac.InvalidRequestError, match="not a group id"):
        await api.group(group)
    with pytest.raises(pac.InvalidRequestError, match="not a group id"):
        await api.cancel_group(group)
    with pytest.raises(pac.InvalidRequestError, match="not a group id"):
        await api.wait_all(group=group)
    with pytest.raises(pac.InvalidRequestError, match="not a group id"):
        await api.list(group=group)
    assert api.requests == []


async def test_list_by_label_and_group(connect: Callable[..., Api]) -> None:
    api = connect(lambda request: httpx.Response(200, json={"items": [summary_json(A)], "next_cursor": None}))
    await api.list(label={"run": "r1", "step": "fit"}, group=GROUP)
    await api.list(label=["run=r1", "note=a=b"])
    await api.list(label="run=r1")
    await api.list_page(label={"run": "r1"}, group=GROUP, limit=5)
    queries = [list(r.url.params.multi_items()) for r in api.requests]
    assert queries[0][:3] == [("label", "run=r1"), ("label", "step=fit"), ("group", GROUP)]
    assert queries[1][:2] == [("label", "run=r1"), ("label", "note=a=b")]
    assert queries[2][:1] == [("label", "run=r1")]
    assert queries[3] == [("label", "run=r1"), ("group", GROUP), ("limit", "5")]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (["run"], "'key=value'"),
        (["=r1"], "not a label key: ''"),
        ({"a b": "c"}, "not a label key"),
        ({"run": 1}, "its value is a str"),
        ({f"k{n}": "v" for n in range(33)}, "at most 32 labels"),
    ],
)
async def test_bad_label_filters_fail_before_sending(
    connect: Callable[..., Api], label: Any, message: str
) -> None:
    api = connect(lambda request: httpx.Response(200, json={"items": []}))
    with pytest.raises(pac.InvalidRequestError, match=message):
        await api.list(label=label)
    assert api.requests == []


# ---- wait_all: of a group, and in a constant number of requests ----


class Finishing:
    """Jobs that are all final from the ``after``-th list round on; counts requests."""

    def __init__(self, ids: list[str], after: int = 1, unreadable: frozenset[str] = frozenset()) -> None:
        self.ids = ids
        self.after = after
        self.rounds = 0
        self.unreadable = unreadable

    def handler(self, request: httpx.Request) -> httpx.Response:
        path, params = request.url.path, request.url.params
        if path == f"/v1/groups/{GROUP}":
            return httpx.Response(200, json=group_json([summary_json(i) for i in self.ids]))
        if path == "/v1/jobs" and params.get("view") == "full":
            items = [
                summary_json(i, "completed") if i in self.unreadable else job_json(i, "completed")
                for i in params.get_list("id")
            ]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        if path == "/v1/jobs":
            self.rounds += 1
            state = "completed" if self.rounds > self.after else "active"
            items = [summary_json(i, state) for i in params.get_list("id")]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        return httpx.Response(200, json=job_json(path.split("/")[3], "completed"))


async def test_wait_all_of_300_jobs_costs_a_constant_number_of_requests(connect: Callable[..., Api]) -> None:
    ids = [f"{n}.0" for n in range(1, 301)]
    fake = Finishing(ids)
    api = connect(fake.handler)
    done = await api.wait_all(ids)
    assert [j.jobid for j in done] == ids and all(isinstance(j, pac.Job) for j in done)
    # Two rounds (active, then completed), then all 300 whole at once.
    assert api.methods() == ["GET /v1/jobs"] * 3
    assert api.requests[2].url.params.get_list("id") == ids
    assert api.requests[2].url.params["view"] == "full"


async def test_wait_all_of_a_group_by_id_or_object(connect: Callable[..., Api]) -> None:
    ids = [f"{n}.0" for n in range(1, 21)]
    api = connect(Finishing(ids, after=0).handler)
    done = await api.wait_all(group=GROUP)
    assert [j.jobid for j in done] == ids
    assert api.methods() == [f"GET /v1/groups/{GROUP}", "GET /v1/jobs", "GET /v1/jobs"]
    group = pac.Group.model_validate(group_json([summary_json(i) for i in ids]))
    api.requests.clear()
    assert [j.jobid for j in await api.wait_all(group)] == ids
    assert api.methods() == ["GET /v1/jobs", "GET /v1/jobs"]  # the Group names its members


async def test_wait_all_takes_jobs_or_a_group(connect: Callable[..., Api]) -> None:
    api = connect(Finishing([A]).handler)
    with pytest.raises(pac.InvalidRequestError, match="jobs or group="):
        await api.wait_all()
    with pytest.raises(pac.InvalidRequestError, match="jobs or group="):
        await api.wait_all([A], group=GROUP)
    assert api.requests == []


async def test_a_member_whose_directory_is_unreadable_is_fetched_alone(connect: Callable[..., Api]) -> None:
    # view=full leaves it a summary; GET /v1/jobs/{id} says why (here it answers).
    api = connect(Finishing([A, B], after=0, unreadable=frozenset({B})).handler)
    done = await api.wait_all([A, B])
    assert [j.jobid for j in done] == [A, B] and all(isinstance(j, pac.Job) for j in done)
    assert api.methods() == ["GET /v1/jobs", "GET /v1/jobs", f"GET /v1/jobs/{B}"]


async def test_a_job_restarted_before_it_was_fetched_is_waited_for_again(connect: Callable[..., Api]) -> None:
    whole = iter([[job_json(A, "completed"), job_json(B, "queued", jobndx=2)], [job_json(B, "completed")]])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("view") == "full":
            return httpx.Response(200, json={"items": next(whole), "next_cursor": None})
        items = [summary_json(i, "completed") for i in request.url.params.get_list("id")]
        return httpx.Response(200, json={"items": items, "next_cursor": None})

    api = connect(handler)
    done = await api.wait_all([A, B])
    assert [(j.jobid, j.state.value) for j in done] == [(A, "completed"), (B, "completed")]
    ids = [r.url.params.get_list("id") for r in api.requests]
    assert ids == [[A, B], [A, B], [B], [B]]  # list, whole, list again, whole
