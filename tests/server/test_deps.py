"""Dependencies (``JobSpec.after``, issue 18), with real local jobs: a job waits, ``queued``
with a row saying for what and holding no job slot, until its parents ended as it
says; then it starts, or it ends ``canceled`` with the reason, and so do the jobs after
it. Across a restart and a kill -9 too. What the jobs did is read off their own rows."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_core import JobSpec, JobState, Principal, Transition
from psik_api_core.states import DEPENDENCY_WAIT_INFO
from psik_api_server.context import context
from psik_api_server.jobs import directory as jobdir
from psik_api_server.settings import BackendSettings, Settings
from support import ServerProcess

pytestmark = pytest.mark.anyio

JSON = {"Content-Type": "application/json"}


def _settings(tmp_path: Path, max_running: int | None = None) -> Settings:
    return Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends={"default": BackendSettings(type="local", max_running=max_running)},
        watch_interval=0.02,
    )


@contextlib.asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = lazy_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c, app


@pytest.fixture(autouse=True)
def _open_gates(tmp_path: Path) -> Any:
    """Every gate opened at the end, whatever happened: no job is left running."""
    yield
    for name in ("go", "ok", "bad"):
        (tmp_path / name).touch()
    time.sleep(0.2)


def _gated(gate: Path, code: int = 0) -> str:
    """A script that runs until ``gate`` exists, then exits ``code``."""
    return f"while [ ! -e {gate} ]; do sleep 0.02; done\nexit {code}\n"


async def _submit(c: httpx.AsyncClient, script: str, name: str, after: Any = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"script": script, "name": name}
    if after:
        body["after"] = [{"jobid": a, "condition": "ok"} if isinstance(a, str) else a for a in after]
    r = await c.post("/v1/jobs", json=body, headers=JSON)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _job(c: httpx.AsyncClient, jobid: str) -> dict[str, Any]:
    r = await c.get(f"/v1/jobs/{jobid}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def _until(
    c: httpx.AsyncClient, jobids: list[str], ok: Any, timeout: float = 30
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [await _job(c, j) for j in jobids]
        if all(ok(j) for j in jobs):
            return jobs
        assert time.monotonic() < deadline, [(j["jobid"], j["state"], j["history"][-1]) for j in jobs]
        await anyio.sleep(0.05)


def _final(job: dict[str, Any]) -> bool:
    return JobState(job["state"]).is_final


def _waiting(job: dict[str, Any]) -> bool:
    """Waiting for its dependencies: queued, nothing launched, the last row says so."""
    return (
        job["state"] == "queued"
        and job["native_id"] is None
        and job["history"][-1]["info"].startswith(DEPENDENCY_WAIT_INFO)
    )


def _t(row: dict[str, Any]) -> float:
    return Transition.model_validate(row).time.timestamp()


def _launched_at(job: dict[str, Any]) -> float:
    """When the backend took the job (its queued row with the PID)."""
    rows = [h for h in job["history"] if h["state"] == "queued" and h["info"].isdigit()]
    assert len(rows) == 1, job["history"]
    return _t(rows[0])


def _ended_at(job: dict[str, Any]) -> float:
    return min(_t(h) for h in job["history"] if JobState(h["state"]).is_final)


async def test_a_diamond_runs_in_order(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    async with _serving(_settings(tmp_path)) as (c, _):
        a = await _submit(c, _gated(gate), "A")
        b = await _submit(c, "sleep 0.2", "B", [a["jobid"]])
        cc = await _submit(c, "sleep 0.4", "C", [a["jobid"]])
        d = await _submit(c, "true", "D", [b["jobid"], {"jobid": cc["jobid"], "condition": "any"}])
        for j in (b, cc, d):
            assert _waiting(j), j
            assert j["jobndx"] == 1
        assert a["jobid"] in b["history"][-1]["info"]
        assert b["jobid"] in d["history"][-1]["info"] and cc["jobid"] in d["history"][-1]["info"]
        assert [(x["jobid"], x["condition"]) for x in d["spec"]["after"]] == [
            (b["jobid"], "ok"),
            (cc["jobid"], "any"),
        ]
        await anyio.sleep(0.3)  # were they to start, they would have by now
        assert all(_waiting(j) for j in [await _job(c, j["jobid"]) for j in (b, cc, d)])
        gate.touch()
        ja, jb, jc, jd = await _until(c, [j["jobid"] for j in (a, b, cc, d)], _final)
    assert [j["state"] for j in (ja, jb, jc, jd)] == ["completed"] * 4
    assert _launched_at(jb) > _ended_at(ja) and _launched_at(jc) > _ended_at(ja)
    assert _launched_at(jd) > max(_ended_at(jb), _ended_at(jc))
    for j in (jb, jc, jd):
        # The run that waited is the run that ran: one run, its PID, its exit status.
        assert j["jobndx"] == 1 and j["exit_code"] == 0 and j["native_id"].isdigit(), j


async def test_a_failed_parent_cancels_its_dependants_transitively_with_reasons(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    async with _serving(_settings(tmp_path)) as (c, _):
        a = await _submit(c, _gated(gate, 3), "A")
        b = await _submit(c, "true", "B", [a["jobid"]])
        cc = await _submit(c, "true", "C", [a["jobid"]])
        d = await _submit(c, "true", "D", [b["jobid"], cc["jobid"]])
        e = await _submit(c, "true", "E", [{"jobid": a["jobid"], "condition": "failed"}])
        gate.touch()
        ja, jb, jc, jd, je = await _until(c, [j["jobid"] for j in (a, b, cc, d, e)], _final)
    assert (ja["state"], ja["exit_code"]) == ("failed", 3)
    for j in (jb, jc):
        assert j["state"] == "canceled" and j["native_id"] is None, j
        assert j["history"][-1]["info"] == f"job {a['jobid']} failed; this job needed it to complete"
    assert jd["state"] == "canceled"
    why = jd["history"][-1]["info"]
    assert why in {f"job {p} was canceled; this job needed it to complete" for p in (b["jobid"], cc["jobid"])}
    # `failed`: the job that waits for its parent to fail runs.
    assert je["state"] == "completed" and _launched_at(je) > _ended_at(ja)


async def test_conditions_met_at_submit_start_at_once_and_unmeetable_ones_cancel(tmp_path: Path) -> None:
    async with _serving(_settings(tmp_path)) as (c, _):
        ok = await _submit(c, "true", "ok")
        bad = await _submit(c, "exit 1", "bad")
        await _until(c, [ok["jobid"], bad["jobid"]], _final)
        runs = await _submit(c, "true", "runs", [ok["jobid"], {"jobid": bad["jobid"], "condition": "any"}])
        assert runs["native_id"] is not None  # launched by the POST itself
        never = await _submit(c, "true", "never", [{"jobid": ok["jobid"], "condition": "failed"}])
        assert never["state"] == "canceled", never
        assert never["history"][-1]["info"] == f"job {ok['jobid']} completed; this job needed it to fail"
        (done,) = await _until(c, [runs["jobid"]], _final)
        assert done["state"] == "completed"


async def test_unknown_and_another_users_parents_are_refused_alike(tmp_path: Path) -> None:
    async with _serving(_settings(tmp_path)) as (c, app):
        bobs, _ = await context(app).service.create(
            Principal("bob"), JobSpec(script="true"), submit=False, idempotency_key=None
        )
        mine = await _submit(c, "true", "mine")
        before = [j["jobid"] for j in (await c.get("/v1/jobs")).json()["items"]]
        unknown = "1700000000.000"
        answers = {}
        for name, parent in (("unknown", unknown), ("bobs", bobs.jobid)):
            body = {"script": "true", "after": [{"jobid": mine["jobid"]}, {"jobid": parent}]}
            for path in ("/v1/jobs", "/v1/jobs/new"):
                # One request id for all: the whole answers are compared.
                r = await c.post(path, json=body, headers={**JSON, "X-Request-ID": "alike"})
                assert r.status_code == 422, r.text
                answers[name, path] = json.loads(r.text.replace(parent, "<parent>"))
        # One answer for both: nothing says whether the job exists.
        assert answers["unknown", "/v1/jobs"] == answers["bobs", "/v1/jobs"]
        assert answers["unknown", "/v1/jobs/new"] == answers["bobs", "/v1/jobs/new"]
        problem = answers["bobs", "/v1/jobs"]
        assert problem["errors"] == [
            {"loc": ["body", "after", 1, "jobid"], "msg": "no job <parent>", "type": "value_error"}
        ]
        # `index` is for POST /v1/groups only.
        r = await c.post("/v1/jobs", json={"script": "true", "after": [{"index": 0}]}, headers=JSON)
        assert r.status_code == 422
        assert r.json()["errors"][0]["loc"] == ["body", "after", 0, "index"]
        # Nothing was made.
        assert [j["jobid"] for j in (await c.get("/v1/jobs")).json()["items"]] == before


async def test_cancel_of_a_waiting_job_cancels_it_at_once_and_its_dependants(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    async with _serving(_settings(tmp_path)) as (c, _):
        a = await _submit(c, _gated(gate), "A")
        b = await _submit(c, "true", "B", [a["jobid"]])
        cc = await _submit(c, "true", "C", [b["jobid"]])
        r = await c.delete(f"/v1/jobs/{b['jobid']}")
        assert r.status_code == 200 and r.json()["state"] == "canceled", r.text
        (jc,) = await _until(c, [cc["jobid"]], _final)
        assert jc["state"] == "canceled"
        assert jc["history"][-1]["info"] == f"job {b['jobid']} was canceled; this job needed it to complete"
        gate.touch()
        ja, jb = await _until(c, [a["jobid"], b["jobid"]], _final)
        assert ja["state"] == "completed" and jb["state"] == "canceled" and jb["native_id"] is None
        # Started again, it waits for nothing more: A completed.
        r = await c.post(f"/v1/jobs/{b['jobid']}/start")
        assert r.status_code == 200, r.text
        (again,) = await _until(c, [b["jobid"]], _final)
        assert again["state"] == "completed" and again["jobndx"] == 2


async def test_a_waiting_job_holds_no_job_slot(tmp_path: Path) -> None:
    async with _serving(_settings(tmp_path, max_running=1)) as (c, app):
        r = await c.post("/v1/jobs/new", json={"script": "true", "name": "P"}, headers=JSON)
        parent = r.json()
        waiting = [await _submit(c, "true", f"W{i}", [parent["jobid"]]) for i in range(3)]
        assert all(_waiting(w) for w in waiting)
        assert context(app).service.store.slots_held("default") == 0
        # The one slot is free: an independent job runs at once, and ends.
        free = await _submit(c, "true", "free")
        assert free["native_id"] is not None, free
        await _until(c, [free["jobid"]], _final)
        # The parent starts; the waiting jobs then share the one slot.
        r = await c.post(f"/v1/jobs/{parent['jobid']}/start")
        assert r.status_code == 200, r.text
        done = await _until(c, [parent["jobid"]] + [w["jobid"] for w in waiting], _final)
        assert [j["state"] for j in done] == ["completed"] * 4
        spans = sorted((_launched_at(j), _ended_at(j)) for j in done)
        assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans)), spans


async def test_a_parent_that_ends_while_the_server_is_down_releases_and_cancels_at_start_up(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    ok_gate, bad_gate = tmp_path / "ok", tmp_path / "bad"
    async with _serving(settings) as (c, _):
        a = await _submit(c, _gated(ok_gate), "A")
        f = await _submit(c, _gated(bad_gate, 1), "F")
        b = await _submit(c, "true", "B", [a["jobid"]])
        d = await _submit(c, "true", "D", [f["jobid"]])
        e = await _submit(c, "true", "E", [d["jobid"]])
    # The server is down; both parents end. A new server takes over.
    ok_gate.touch()
    bad_gate.touch()
    deadline = time.monotonic() + 30
    for jobid in (a["jobid"], f["jobid"]):
        while not jobdir.read_job(settings.prefix / jobid).state[0].is_final:
            assert time.monotonic() < deadline
            await anyio.sleep(0.05)
    assert _waiting(await _job_offline(settings, b["jobid"]))
    async with _serving(settings) as (c, _):
        jb, jd, je = await _until(c, [b["jobid"], d["jobid"], e["jobid"]], _final)
    assert jb["state"] == "completed" and _launched_at(jb) > 0
    assert jd["state"] == "canceled" and jd["history"][-1]["info"].startswith(f"job {f['jobid']} failed")
    assert je["state"] == "canceled"
    assert je["history"][-1]["info"].startswith(f"job {d['jobid']} was canceled")


async def test_the_waiting_set_survives_a_rebuilt_index(tmp_path: Path) -> None:
    """The index lost (deleted): the dependencies come back from the job directories."""
    settings = _settings(tmp_path)
    gate = tmp_path / "go"
    async with _serving(settings) as (c, _):
        a = await _submit(c, _gated(gate), "A")
        b = await _submit(c, "true", "B", [a["jobid"]])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{settings.database}{suffix}").unlink(missing_ok=True)
    async with _serving(settings) as (c, _):
        assert _waiting(await _job(c, b["jobid"]))
        gate.touch()
        ja, jb = await _until(c, [a["jobid"], b["jobid"]], _final)
    assert (ja["state"], jb["state"]) == ("completed", "completed")
    assert _launched_at(jb) > _ended_at(ja)


async def _job_offline(settings: Settings, jobid: str) -> dict[str, Any]:
    """A job as its directory says, with no server."""
    files = jobdir.read_job(settings.prefix / jobid)
    native = [r.info for r in files.history if r.state is JobState.queued and r.info.isdigit()]
    return {
        "state": files.state[0].value,
        "native_id": native[-1] if native else None,
        "history": [r.transition().model_dump(mode="json") for r in files.history],
    }


async def test_kill_9_with_dependants_waiting_then_restart_all_complete_once(tmp_path: Path) -> None:
    """A real server process, killed while a chain waits (and again while it is being
    released); each restart finds the waiting jobs in the index and their directories."""
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    prefix = tmp_path / "data" / "psik_api" / "jobs"
    gate = tmp_path / "go"
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            a = await _submit(c, _gated(gate), "A")
            b = await _submit(c, "sleep 0.3", "B", [a["jobid"]])
            cc = await _submit(c, "sleep 0.3", "C", [b["jobid"]])
            d = await _submit(c, "true", "D", [b["jobid"], cc["jobid"]])
        ids = [j["jobid"] for j in (a, b, cc, d)]
        server.kill9()
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            assert all(_waiting(j) for j in [await _job(c, i) for i in ids[1:]])
            gate.touch()
            await _until(c, [b["jobid"]], lambda j: j["state"] != "queued" or j["native_id"] is not None)
        server.kill9()  # B released (maybe running), C and D still waiting
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            done = await _until(c, ids, _final)
    finally:
        gate.touch()
        server.stop()
    assert [j["state"] for j in done] == ["completed"] * 4, [j["history"] for j in done]
    ja, jb, jc, jd = done
    assert _launched_at(jb) > _ended_at(ja) and _launched_at(jc) > _ended_at(jb)
    assert _launched_at(jd) > max(_ended_at(jb), _ended_at(jc))
    for jobid in ids:  # each ran exactly once (_launched_at: one launched row)
        files = jobdir.read_job(prefix / jobid)
        assert sum(1 for r in files.history if r.state is JobState.queued and r.info.isdigit()) == 1


def test_bob_cannot_depend_on_alices_job_in_token_mode(tls_server: Any) -> None:
    """Token mode (mTLS, `certified serve`): bob naming alice's job is answered as if it
    did not exist, and nothing is made."""
    pytest.importorskip("biscuit_auth")
    with tls_server.client("alice") as alice:
        r = alice.post("/v1/jobs/new", json={"script": "true"})
        assert r.status_code == 201, r.text
        alices = r.json()["jobid"]
    answers = []
    with tls_server.client("bob") as bob:
        for parent in (alices, "1700000000.000"):
            r = bob.post(
                "/v1/jobs",
                json={"script": "true", "after": [{"jobid": parent}]},
                headers={"X-Request-ID": "alike"},  # one id for both: the whole answers are compared
            )
            assert r.status_code == 422, r.text
            answers.append(json.loads(r.text.replace(parent, "<parent>")))
        assert bob.get("/v1/jobs").json()["items"] == []
    assert answers[0] == answers[1]
    assert answers[0]["errors"][0]["loc"] == ["body", "after", 0, "jobid"]
    with tls_server.client("alice") as alice:  # alice may
        r = alice.post("/v1/jobs", json={"script": "true", "after": [{"jobid": alices, "condition": "any"}]})
        assert r.status_code == 201 and r.json()["state"] == "queued", r.text


async def test_a_diamond_in_one_group_request_runs_in_order(tmp_path: Path) -> None:
    """POST /v1/groups names the request's own jobs by index: the whole DAG in one request."""
    gate = tmp_path / "go"
    async with _serving(_settings(tmp_path)) as (c, _):
        body = {
            "jobs": [
                {"name": "D", "script": "true", "after": [{"index": 1}, {"index": 2}]},
                {"name": "B", "script": "sleep 0.2", "after": [{"index": 3}]},
                {"name": "C", "script": "sleep 0.3", "after": [{"index": 3}]},
                {"name": "A", "script": _gated(gate)},
            ]
        }
        r = await c.post("/v1/groups", json=body, headers=JSON)
        assert r.status_code == 201, r.text
        jd, jb, jc, ja = r.json()["jobs"]
        assert all(_waiting(j) for j in [await _job(c, j["jobid"]) for j in (jb, jc, jd)])
        gate.touch()
        ja, jb, jc, jd = await _until(c, [j["jobid"] for j in (ja, jb, jc, jd)], _final)
    assert [j["state"] for j in (ja, jb, jc, jd)] == ["completed"] * 4
    assert _launched_at(jb) > _ended_at(ja) and _launched_at(jc) > _ended_at(ja)
    assert _launched_at(jd) > max(_ended_at(jb), _ended_at(jc))
