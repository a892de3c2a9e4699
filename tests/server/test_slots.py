"""Job slots (``max_running``): at most N local jobs run at once, the others wait
``queued`` and start in submission order as slots free up, also across a restart.

Real local jobs: each writes ``start``/``end`` lines to a shared log, so the largest
number of jobs running at once is read off what the jobs themselves did."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_core import SLOT_WAIT_INFO, JobState, Transition
from psik_api_server.jobs.slots import JobSlots
from psik_api_server.jobs.store import JobRow, JobStore
from psik_api_server.settings import BackendSettings, Settings

pytestmark = pytest.mark.anyio

JSON = {"Content-Type": "application/json"}


def _settings(tmp_path: Path, max_running: int | None) -> Settings:
    return Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends={"default": BackendSettings(type="local", max_running=max_running)},
        watch_interval=0.02,
    )


def _script(log: Path, gate: Path) -> str:
    # Runs until `gate` exists; says when it starts and ends (O_APPEND lines are atomic).
    return (
        f'echo "start $$" >> {log}\n'
        f"while [ ! -e {gate} ]; do sleep 0.02; done\n"
        "sleep 0.1\n"
        f'echo "end $$" >> {log}\n'
    )


@contextlib.asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = lazy_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@pytest.fixture
async def client(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    async with _serving(_settings(tmp_path, request.param)) as c:
        yield c


async def _submit(c: httpx.AsyncClient, script: str, name: str) -> dict[str, Any]:
    r = await c.post("/v1/jobs", json={"script": script, "name": name}, headers=JSON)
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
        assert time.monotonic() < deadline, [(j["jobid"], j["state"]) for j in jobs]
        await anyio.sleep(0.05)


def _most_at_once(log: Path) -> int:
    running = most = 0
    for line in log.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    return most


def _waiting(job: dict[str, Any]) -> bool:
    return job["state"] == "queued" and job["native_id"] is None


def _final(job: dict[str, Any]) -> bool:
    return JobState(job["state"]).is_final


def _launched_at(job: dict[str, Any]) -> float:
    """When the backend took the job (its queued row with the PID)."""
    rows = [h for h in job["history"] if h["state"] == "queued" and h["info"].isdigit()]
    assert len(rows) == 1, job["history"]
    return float(Transition.model_validate(rows[0]).time.timestamp())


@pytest.mark.parametrize("client", [2], indirect=True)
async def test_at_most_max_running_jobs_run_and_the_rest_start_in_order(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    log, gate = tmp_path / "ran.log", tmp_path / "go"
    jobs = [await _submit(client, _script(log, gate), f"j{i}") for i in range(6)]
    ids = [j["jobid"] for j in jobs]
    # The first two run; the other four are queued, waiting, and say why.
    await _until(client, ids[:2], lambda j: j["state"] == "active")
    for j in jobs[2:]:
        assert _waiting(j), j
        assert j["jobndx"] == 1
        assert j["history"][-1]["info"].startswith(SLOT_WAIT_INFO)
    await anyio.sleep(0.5)  # were they to start, they would have by now
    assert all(_waiting(j) for j in [await _job(client, i) for i in ids[2:]])
    assert _most_at_once(log) == 2
    gate.touch()
    done = await _until(client, ids, _final)
    assert [j["state"] for j in done] == ["completed"] * 6
    assert _most_at_once(log) == 2, log.read_text()
    starts = [_launched_at(j) for j in done]
    assert starts[2:] == sorted(starts[2:]), "waiting jobs started out of submission order"
    for j in done:
        # The run that waited is the run that ran: one run, its PID, its exit status.
        assert j["jobndx"] == 1 and j["exit_code"] == 0 and j["native_id"].isdigit(), j
    r = await client.get(f"/v1/jobs/{ids[5]}")
    assert [h["state"] for h in r.json()["history"]][:3] == ["new", "queued", "queued"]


@pytest.mark.parametrize("client", [1], indirect=True)
async def test_a_cancelled_waiting_job_never_runs_and_frees_its_place(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    log, gate = tmp_path / "ran.log", tmp_path / "go"
    first = await _submit(client, _script(log, gate), "first")
    second = await _submit(client, _script(log, gate), "second")
    third = await _submit(client, _script(log, gate), "third")
    assert _waiting(second) and _waiting(third)
    r = await client.delete(f"/v1/jobs/{second['jobid']}")
    assert r.status_code == 200 and r.json()["state"] == "canceled", r.text
    gate.touch()
    a, b, c = await _until(client, [first["jobid"], second["jobid"], third["jobid"]], _final)
    assert (a["state"], b["state"], c["state"]) == ("completed", "canceled", "completed")
    assert b["native_id"] is None and not any(h["info"].isdigit() for h in b["history"])
    assert log.read_text().count("start") == 2
    # A cancelled job that waited can be started again, as a new run.
    r = await client.post(f"/v1/jobs/{second['jobid']}/start")
    assert r.status_code == 200, r.text
    (again,) = await _until(client, [second["jobid"]], _final)
    assert again["state"] == "completed" and again["jobndx"] == 2


@pytest.mark.parametrize("client", [1], indirect=True)
async def test_a_purged_waiting_job_does_not_stall_the_ones_behind_it(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A waiting job cancelled and purged before its turn: the jobs behind it, and new
    ones, still start when the slot frees (hostile tester: the filler took the purged
    job's missing row for "no free slot" and stopped for good)."""
    log, gate = tmp_path / "ran.log", tmp_path / "go"
    first = await _submit(client, _script(log, gate), "first")
    second = await _submit(client, _script(log, gate), "second")
    third = await _submit(client, _script(log, gate), "third")
    assert _waiting(second) and _waiting(third)
    assert (await client.delete(f"/v1/jobs/{second['jobid']}")).status_code == 200
    assert (await client.delete(f"/v1/jobs/{second['jobid']}?purge=true")).status_code == 204
    gate.touch()
    fourth = await _submit(client, _script(log, gate), "fourth")
    done = await _until(client, [first["jobid"], third["jobid"], fourth["jobid"]], _final)
    assert [j["state"] for j in done] == ["completed"] * 3
    assert log.read_text().count("start") == 3


async def test_waiting_jobs_start_in_order_after_a_restart(tmp_path: Path) -> None:
    settings = _settings(tmp_path, 1)
    log, gate = tmp_path / "ran.log", tmp_path / "go"
    async with _serving(settings) as c:
        ids = [(await _submit(c, _script(log, gate), f"j{i}"))["jobid"] for i in range(4)]
        await _until(c, ids[:1], lambda j: j["state"] == "active")
    # The server is down; the first job runs on, three wait. A new server takes over.
    async with _serving(settings) as c:
        for jobid in ids[1:]:
            assert _waiting(await _job(c, jobid))
        gate.touch()
        done = await _until(c, ids, _final)
    assert [j["state"] for j in done] == ["completed"] * 4
    starts = [_launched_at(j) for j in done]
    assert starts == sorted(starts)
    assert _most_at_once(log) == 1


async def test_submits_to_one_backend_launch_side_by_side(tmp_path: Path) -> None:
    """A slot is claimed in the index, not by holding a lock across the launch: two
    submits to a backend with free slots are both inside the launcher at once (before,
    the second waited for the first's whole launcher round trip); and with one slot
    left, only one of two concurrent submits gets it, the other waits for it."""
    settings = _settings(tmp_path, 3)
    app = lazy_app(settings)
    inside = most = 0
    both = anyio.Event()
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        backend = app.state.context.service.backend
        real = backend.submit

        async def slow_submit(jobid: str, waited: int | None = None) -> None:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            if inside == 2:
                both.set()
            with anyio.move_on_after(10):
                await both.wait()  # the first launch waits until a second is inside too
            try:
                await real(jobid, waited=waited)
            finally:
                inside -= 1

        backend.submit = slow_submit
        first, second = await asyncio.gather(*(_submit(c, "true", f"p{i}") for i in range(2)))
        assert most == 2, "the second submit waited for the first launch"
        backend.submit = real
        await _until(c, [first["jobid"], second["jobid"]], _final)
        # One slot left (two jobs hold the others): of two concurrent submits one
        # launches and one waits for the slot.
        log, gate = tmp_path / "log", tmp_path / "gate"
        await _submit(c, _script(log, gate), "hold1")
        await _submit(c, _script(log, gate), "hold2")
        a, b = await asyncio.gather(*(_submit(c, _script(log, gate), f"q{i}") for i in range(2)))
        waits = [j for j in (a, b) if j["history"][-1]["info"].startswith(SLOT_WAIT_INFO)]
        assert len(waits) == 1, (a["history"], b["history"])
        gate.touch()
        await _until(c, [a["jobid"], b["jobid"]], lambda j: j["state"] == "completed")


@pytest.mark.parametrize("client", [None], indirect=True)
async def test_the_local_default_is_the_cpu_count(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/backends")
    assert r.status_code == 200
    assert BackendSettings(type="local").slot_limit() == (os.cpu_count() or 1)
    assert BackendSettings(type="slurm").slot_limit() is None
    assert BackendSettings(type="slurm", max_running=3).slot_limit() == 3
    assert "max_running" not in BackendSettings(max_running=3).psik_fields()


def test_max_running_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_running"):
        BackendSettings(max_running=0)


# ---- the bookkeeping, without jobs ----


def _row(jobid: str, state: JobState, backend: str = "default") -> JobRow:
    return JobRow(
        jobid=jobid, backend=backend, owner="o", name=None, state=state, jobndx=1, created=0.0, updated=0.0
    )


def test_slots_held_count_queued_and_active_but_not_waiting_jobs(tmp_path: Path) -> None:
    """The slots are held in the index: a claim is refused once the backend's limit of
    jobs hold one; a job that ends gives its slot back; start-up's recount gives one to
    every queued or active job of a limited backend but none to a job waiting for one."""
    store = JobStore(tmp_path / "index.sqlite").open()
    for jobid, state, backend in [
        ("1", JobState.active, "default"),
        ("2", JobState.queued, "default"),
        ("3", JobState.queued, "default"),
        ("4", JobState.new, "default"),
        ("5", JobState.active, "other"),
        ("6", JobState.new, "default"),
    ]:
        store.put(_row(jobid, state, backend))
    store.recount_slots(["default"], waiting=[])
    assert store.slots_held("default") == 2 + 1 and store.slots_held("other") == 0
    assert not store.claim_slot("4", "default", 3)  # all 3 taken
    store.recount_slots(["default"], waiting=["3"])  # 3 waits: it holds none
    assert store.slots_held("default") == 2
    assert store.claim_slot("4", "default", 3)
    assert store.claim_slot("4", "default", 3)  # held already: still True, counted once
    assert not store.claim_slot("6", "default", 3)
    store.set_state("1", JobState.completed, 1, 1.0, exit_code=0)  # ended: its slot is free
    assert store.claim_slot("6", "default", 3)
    store.release_slot("6")
    assert store.slots_held("default") == 2
    store.close()


def test_the_waiting_list_keeps_its_order() -> None:
    slots = JobSlots({"default": 3, "slurm": None})
    assert slots.limit("slurm") is None
    slots.wait("default", "3", since=10.0)
    slots.wait("default", "9", since=5.0)
    assert slots.queue("default") == ["9", "3"]
    assert slots.backends_waiting() == ["default"]
    slots.done("default", "9")
    slots.done("default", "3")
    assert slots.backends_waiting() == []


# ---- a job that writes its own final row while it keeps running must not free its slot:
# the slot of a local job is held until psik's runner of that run has exited, not only
# until its status.csv (which the job itself can write) says it ended.


def _liar(beats: Path) -> str:
    # Says it completed (a row in its own status.csv, as psik's runner would write), then
    # keeps running, saying when it is alive, until something ends it.
    return (
        'echo "$(date +%s.%N),1,completed," >> ../status.csv\n'
        f"while true; do date +%s.%N >> {beats}; sleep 0.02; done\n"
    )


def _honest(log: Path) -> str:
    return f'echo "start $$" >> {log}\nsleep 0.2\necho "end $$" >> {log}\n'


def _started(log: Path) -> str:
    return f"date +%s.%N > {log}\n"


async def test_a_job_that_fakes_its_end_keeps_its_slot_until_its_process_ends(tmp_path: Path) -> None:
    beats, started = tmp_path / "liar.beats", tmp_path / "next.started"
    async with _serving(_settings(tmp_path, 1)) as client:
        liar = await _submit(client, _liar(beats), "liar")
        # The index believes the lie (the job's own row says so); its processes are then
        # ended (containment), and only once psik's runner has exited is the slot free.
        await _until(client, [liar["jobid"]], _final)
        after = await _submit(client, _started(started), "next")
        done = await _until(client, [after["jobid"]], lambda j: j["state"] == "completed", timeout=20)
        assert done[0]["exit_code"] == 0
        last_beat = float(beats.read_text().split()[-1])
        assert float(started.read_text()) > last_beat, "the next job ran while the liar still ran"


async def test_honest_jobs_hand_their_slot_on_at_once(tmp_path: Path) -> None:
    # The slot goes to the next job as the runner exits, not at the next liveness round.
    log = tmp_path / "ran.log"
    settings = _settings(tmp_path, 1)
    settings.liveness_interval = 3600.0
    async with _serving(settings) as client:
        t0 = time.monotonic()
        jobs = [await _submit(client, _honest(log), f"j{i}") for i in range(4)]
        await _until(client, [j["jobid"] for j in jobs], _final, timeout=30)
        assert time.monotonic() - t0 < 15
        assert _most_at_once(log) == 1, log.read_text()
