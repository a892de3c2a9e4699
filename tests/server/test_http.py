"""Wire-level checks of the HTTP contract: status codes, problem+json bodies naming the
field at fault, headers, idempotency. Raw httpx on the real in-process app."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from psik_api_core import LIMITS
from psik_api_core.limits import byte_size

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["title"]
    return body  # type: ignore[no-any-return]


def _locs(body: dict[str, object]) -> list[list[object]]:
    return [e["loc"] for e in body["errors"]]  # type: ignore[index, attr-defined]


async def test_seed_readme_submit_body_gives_201_job_with_location(http: httpx.AsyncClient) -> None:
    body = {
        "name": "show system info",
        "script": "cat /proc/cpuinfo; cat /proc/meminfo; rocm-smi; echo $nodes; $mpirun hostname",
        "resources": {
            "process_count": 8,
            "cpu_cores_per_process": 7,
            "duration": 2,
            "gpu_cores_per_process": 1,
        },
    }
    r = await http.post("/v1/jobs", json=body, headers={"accept": "application/json"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['jobid']}"
    assert job["spec"]["resources"]["process_count"] == 8
    assert job["state"] in {"queued", "active", "completed", "failed"}
    listed = (await http.get("/v1/jobs")).json()
    assert [j["jobid"] for j in listed["items"]] == [job["jobid"]]
    assert listed["next_cursor"] is None
    got = (await http.get(f"/v1/jobs/{job['jobid']}")).json()
    assert got["jobid"] == job["jobid"] and got["history"][0]["state"] == "new"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "script"]),
        ({"script": "x", "scrpit": "y"}, ["body", "scrpit"]),
        ({"script": "x", "resources": {"duration": "soon"}}, ["body", "resources", "duration"]),
        ({"script": "x", "resources": {"nodes": 1}}, ["body", "resources", "nodes"]),
        ({"script": "x", "environment": {"A": 1}}, ["body", "environment", "A"]),
        ({"script": "x", "backend": "nope"}, ["body", "backend"]),
        ({"script": "x", "directory": "/etc"}, ["body", "directory"]),
        ({"script": "x", "directory": "relative"}, ["body", "directory"]),
        ({"script": "x", "callback": "\u00ff"}, ["body", "callback"]),
        ({"script": "x", "callback": "file:///etc/passwd"}, ["body", "callback"]),
        ({"script": "x", "callback": "http:///nohost"}, ["body", "callback"]),
    ],
)
async def test_bad_bodies_are_422_naming_the_field(
    http: httpx.AsyncClient, body: dict[str, object], loc: list[str]
) -> None:
    for path in ("/v1/jobs", "/v1/jobs/new"):
        r = await http.post(path, json=body)
        assert r.status_code == 422, r.text
        assert loc in _locs(r.json())
    assert (await http.get("/v1/jobs")).json()["items"] == []  # nothing was created


#: A body without a JSON Content-Type is refused (415) before it is read.
JSON = {"Content-Type": "application/json"}


async def test_unparseable_and_non_object_bodies(http: httpx.AsyncClient) -> None:
    # The seed README's own example had a trailing comma.
    r = await http.post("/v1/jobs/new", content=b'{"script": "cat data.txt",}', headers=JSON)
    assert "JSON" in str(_problem(r, 400, "bad_request")["detail"])
    _problem(await http.post("/v1/jobs", content=b"[1, 2]", headers=JSON), 422, "validation_error")
    _problem(await http.post("/v1/jobs", content=b"\xff\xfe", headers=JSON), 400, "bad_request")


async def test_oversized_body_is_413(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/jobs", json={"script": "x" * LIMITS.max_body_bytes})
    assert f"over {byte_size(LIMITS.max_body_bytes)}" in str(_problem(r, 413, "too_large")["detail"])
    # Without a Content-Length the stream is cut at the limit too.
    body = json.dumps({"script": "x" * LIMITS.max_body_bytes}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:1000]
        yield body[1000:]

    r = await http.post("/v1/jobs", content=chunks(), headers=JSON)
    _problem(r, 413, "too_large")
    fits = json.dumps({"script": "x" * (LIMITS.max_body_bytes - 100)}).encode()
    assert len(fits) <= LIMITS.max_body_bytes
    assert (await http.post("/v1/jobs/new", content=fits, headers=JSON)).status_code == 201


async def test_list_limits_are_cores(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/jobs", params={"limit": LIMITS.max_page_size})
    assert r.status_code == 200, r.text
    ids = [("id", f"{1000000000 + i}.1") for i in range(LIMITS.max_ids)]
    assert (await http.get("/v1/jobs", params=ids)).status_code == 200
    too_many = [*ids, ("id", "1.1")]
    body = _problem(await http.get("/v1/jobs", params=too_many), 422, "validation_error")
    assert _locs(body) == [["query", "id"]] and str(LIMITS.max_ids) in str(body["detail"])
    # The default page is core's too: one more job than it holds leaves a next page.
    for _ in range(LIMITS.default_page_size + 1):
        assert (await http.post("/v1/jobs/new", json={"script": "true"})).status_code == 201
    page = (await http.get("/v1/jobs")).json()
    assert len(page["items"]) == LIMITS.default_page_size and page["next_cursor"]


@pytest.mark.parametrize(
    "path", ["/v1/jobs/abc", "/v1/jobs/1.2.3", "/v1/jobs/1.2%0A", "/v1/jobs/%2E%2E", "/v1/jobs/1e5/state"]
)
async def test_malformed_jobids_are_422_naming_jobid(http: httpx.AsyncClient, path: str) -> None:
    body = _problem(await http.get(path), 422, "validation_error")
    assert _locs(body) == [["path", "jobid"]]


async def test_unknown_job_is_404_problem(http: httpx.AsyncClient) -> None:
    for r in (
        await http.get("/v1/jobs/1000000000.001"),
        await http.get("/v1/jobs/1000000000.001/state"),
        await http.delete("/v1/jobs/1000000000.001"),
        await http.post("/v1/jobs/1000000000.001/start"),
    ):
        _problem(r, 404, "not_found")


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("limit=0", "limit"),
        (f"limit={LIMITS.max_page_size + 1}", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("state=done", "state"),
        ("id=../x", "id"),
        ("cursor=%%%", "cursor"),
        ("cursor=eyJ4Ijox", "cursor"),
        ("stat=queued", "stat"),
    ],
)
async def test_bad_list_queries_are_422_naming_the_parameter(
    http: httpx.AsyncClient, query: str, name: str
) -> None:
    body = _problem(await http.get(f"/v1/jobs?{query}"), 422, "validation_error")
    assert _locs(body) == [["query", name]]


async def test_unknown_route_and_method(http: httpx.AsyncClient) -> None:
    _problem(await http.get("/v1/nope"), 404, "not_found")
    r = await http.put("/v1/jobs")
    _problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, HEAD, POST"
    # Not taken for GET /v1/jobs/{jobid} with a bad id: the path exists, the method does not.
    r = await http.get("/v1/jobs/new")
    _problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    r = await http.request("OPTIONS", "/v1/jobs/1000000000.001")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, HEAD"
    assert (await http.head("/healthz")).status_code == 200


async def test_idempotency_key(http: httpx.AsyncClient, app: Starlette) -> None:
    body = {"name": "once", "script": "true"}
    first = await http.post("/v1/jobs/new", json=body, headers={"Idempotency-Key": "k1"})
    again = await http.post("/v1/jobs/new", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201 and again.status_code == 201
    assert first.json()["jobid"] == again.json()["jobid"]
    other = await http.post(
        "/v1/jobs/new", json={**body, "script": "false"}, headers={"Idempotency-Key": "k1"}
    )
    _problem(other, 422, "idempotency_mismatch")
    # create-only and create-and-submit are different requests
    _problem(
        await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}), 422, "idempotency_mismatch"
    )
    items = (await http.get("/v1/jobs")).json()["items"]
    assert len(items) == 1
    prefix: Path = app.state.context.settings.prefix
    assert [p.name for p in prefix.iterdir() if p.is_dir()] == [first.json()["jobid"]]


async def test_secret_is_never_returned(http: httpx.AsyncClient) -> None:
    spec = {
        "script": "true",
        "cb_secret": "hunter2",
        "callback": "http://hook.example/h",
        "cb_headers": {"X": "hdr"},
    }
    r = await http.post("/v1/jobs/new", json=spec)
    assert r.status_code == 201
    assert "hunter2" not in r.text
    got = await http.get(f"/v1/jobs/{r.json()['jobid']}")
    assert "hunter2" not in got.text
    # write-only, all three: not even masked
    assert not {"cb_secret", "callback", "cb_headers"} & set(got.json()["spec"])
    for other in (r, got, await http.get("/v1/jobs"), await http.get(f"/v1/jobs/{r.json()['jobid']}/state")):
        assert other.status_code in {200, 201}
        assert "hunter2" not in other.text and "hook.example" not in other.text and "hdr" not in other.text


async def test_state_route_and_start_conflict(http: httpx.AsyncClient) -> None:
    job = (await http.post("/v1/jobs", json={"script": "sleep 30"})).json()
    state = (await http.get(f"/v1/jobs/{job['jobid']}/state")).json()
    assert set(state) == {"jobid", "state", "jobndx", "updated"}
    assert state["state"] in {"queued", "active"}
    body = _problem(await http.post(f"/v1/jobs/{job['jobid']}/start"), 409, "conflict")
    assert body["jobid"] == job["jobid"] and body["state"] in {"queued", "active"}
    assert "cancel it" in str(body["detail"])
    assert (await http.delete(f"/v1/jobs/{job['jobid']}")).json()["state"] == "canceled"
    _problem(await http.delete(f"/v1/jobs/{job['jobid']}?purge=maybe"), 422, "validation_error")
    assert (await http.delete(f"/v1/jobs/{job['jobid']}?purge=true")).status_code == 204


async def test_service_routes(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1") and "/v1/jobs" in doc["paths"]
    page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/jobs" in page.text
    backends = (await http.get("/v1/backends")).json()
    assert backends == [
        {
            "name": "default",
            "type": "local",
            "queue_name": None,
            "project_name": None,
            "healthy": True,
            "detail": None,
        }
    ]
    assert (await http.get("/v1/backends/default")).json()["type"] == "local"
    _problem(await http.get("/v1/backends/nope"), 404, "not_found")


async def test_list_is_served_from_the_index(http: httpx.AsyncClient, app: Starlette) -> None:
    """Deleting a job's files behind the server's back does not slow or break a list:
    the list reads the index only (the directory is the truth again at restart)."""
    jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    prefix: Path = app.state.context.settings.prefix
    (prefix / jobid / "spec.json").unlink()
    items = (await http.get("/v1/jobs")).json()["items"]
    assert [j["jobid"] for j in items] == [jobid]


def test_problem_bodies_are_json_documents() -> None:
    # A guard that the problem helper emits real JSON (not repr) for extension members.
    from psik_api_core import ProblemCode
    from psik_api_server.errors import ApiError
    from psik_api_server.http.problems import problem_response

    r = problem_response(ApiError(ProblemCode.conflict, "busy", jobid="1.2", state="active"), "/x")
    assert json.loads(bytes(r.body))["state"] == "active"


async def test_idempotency_key_in_flight_is_409_with_retry_after(
    http: httpx.AsyncClient, app: Starlette
) -> None:
    from psik_api_core import JobSpec
    from psik_api_server.jobs.idempotency import body_hash

    body = {"script": "true"}
    store = app.state.context.service.store
    # Another worker has claimed the key and not finished yet.
    store.claim_key("local:psik_api", "busy", body_hash(JobSpec.model_validate(body), True), time.time())
    r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "busy"})
    _problem(r, 409, "idempotency_in_flight")
    assert r.headers["retry-after"] == "1"
    # A claim abandoned long ago (a crashed server) does not block the key forever.
    store.claim_key(
        "local:psik_api", "stale", body_hash(JobSpec.model_validate(body), True), time.time() - 3600
    )
    r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "stale"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("key", ["", "x" * (LIMITS.max_idempotency_key + 1), "tab\there"])
async def test_bad_idempotency_keys(http: httpx.AsyncClient, key: str) -> None:
    body = _problem(
        await http.post("/v1/jobs", json={"script": "true"}, headers={"Idempotency-Key": key}),
        422,
        "validation_error",
    )
    assert _locs(body) == [["header", "Idempotency-Key"]]


async def test_longest_idempotency_key_is_taken(http: httpx.AsyncClient) -> None:
    key = "k" * LIMITS.max_idempotency_key
    r = await http.post("/v1/jobs/new", json={"script": "true"}, headers={"Idempotency-Key": key})
    assert r.status_code == 201, r.text


def test_problem_of_an_api_error() -> None:
    from psik_api_core import ProblemCode
    from psik_api_server.errors import ApiError

    p = ApiError(ProblemCode.conflict, "job 1.2 is active", jobid="1.2").problem("/v1/jobs/1.2/start")
    assert (p.status, p.code, p.title) == (409, "conflict", ProblemCode.conflict.problem_title)
    assert p.model_dump()["jobid"] == "1.2"
