"""GET /metrics (issue 20): each metric moves when the thing it counts happens, on the real
server with real local jobs; the exposition parses; no label value names a job or a user;
who may read it (local mode: the owner, as every route; token mode: `metrics_readers`
only, never with a token narrowed to jobs)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from conftest import lazy_app
from local_users import Other, another_user, run_as
from psik_api_core import LOCAL_USER
from psik_api_server.app import create_app
from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.http.metrics import CONTENT_TYPE
from psik_api_server.settings import BackendSettings, Settings
from support import LiveServer
from tls_support import Identities, TlsServer
from tls_support import tls_server as run_tls_server

#: {sample name: {sorted label pairs: value}}
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> Samples:
    """Every sample of an exposition, parsed by prometheus-client's own parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; 0 when the series is absent."""
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def check_answer(r: httpx.Response) -> Samples:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    return parse(r.text)


async def scrape(http: httpx.AsyncClient) -> Samples:
    return check_answer(await http.get("/metrics"))


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


async def wait_state(http: httpx.AsyncClient, jobid: str, *states: str) -> None:
    async def reached() -> bool:
        return (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] in states

    await until(f"job {jobid} to be {states}", reached)


async def submit(http: httpx.AsyncClient, script: str) -> str:
    r = await http.post("/v1/jobs", json={"script": script})
    assert r.status_code == 201, r.text
    return str(r.json()["jobid"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """The in-process app (liveness rounds only when the test asks) and raw httpx on it."""
    settings.liveness_interval = 3600
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http,
    ):
        yield app, http


# ---- each metric moves ----


@pytest.mark.anyio
async def test_a_real_job_moves_requests_jobs_and_the_watcher_lag(
    served: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, http = served
    before = await scrape(http)
    assert value(before, "psik_api_startup_reconcile_seconds") > 0
    assert value(before, "psik_api_jobs", backend="default", state="completed") == 0
    assert value(before, "psik_api_http_requests_total", route="/v1/jobs", method="POST", status="201") == 0
    lag_before = value(before, "psik_api_watcher_lag_seconds_count")

    jobid = await submit(http, "echo hi")
    await wait_state(http, jobid, "completed")

    async def recorded() -> bool:
        # The watcher records the rows it saw (the lag), independently of the request's reads.
        return value(await scrape(http), "psik_api_watcher_lag_seconds_count") > lag_before

    await until("the watcher to record the job's rows", recorded)
    after = await scrape(http)
    assert value(after, "psik_api_jobs", backend="default", state="completed") == 1
    assert (
        sum(value(after, "psik_api_jobs", backend="default", state=s) for s in ("new", "queued", "active"))
        == 0
    )
    assert value(after, "psik_api_http_requests_total", route="/v1/jobs", method="POST", status="201") == 1
    assert value(after, "psik_api_http_request_duration_seconds_count", route="/v1/jobs", method="POST") == 1
    assert value(after, "psik_api_http_request_duration_seconds_sum", route="/v1/jobs", method="POST") > 0
    states = value(
        after, "psik_api_http_requests_total", route="/v1/jobs/{jobid}/state", method="GET", status="200"
    )
    assert states >= 1
    # Each status row the watcher saw has its lag, once: never more than the job wrote.
    rows = len((await http.get(f"/v1/jobs/{jobid}")).json()["history"])
    assert 1 <= value(after, "psik_api_watcher_lag_seconds_count") - lag_before <= rows
    assert value(after, "psik_api_watcher_lag_seconds_bucket", le="+Inf") == value(
        after, "psik_api_watcher_lag_seconds_count"
    )
    # The scrapes themselves are requests too.
    assert value(after, "psik_api_http_requests_total", route="/metrics", method="GET", status="200") >= 2


@pytest.mark.anyio
async def test_label_values_name_no_job_and_no_user(served: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, http = served
    jobid = await submit(http, "echo hi > out.txt")
    await wait_state(http, jobid, "completed")
    assert (await http.get(f"/v1/jobs/{jobid}")).status_code == 200
    assert (await http.get(f"/v1/jobs/{jobid}/files/out.txt")).status_code == 200
    assert (await http.get(f"/nowhere/{jobid}")).status_code == 404
    assert (await http.get(f"/v1/jobs/{jobid}0/state")).status_code == 404
    assert (await http.request("BREW", f"/v1/jobs/{jobid}")).status_code == 405
    samples = await scrape(http)
    labels = {(k, v) for series in samples.values() for pairs in series for k, v in pairs}
    values = {v for _, v in labels}
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert not [v for v in values if jobid in v or v in {me, LOCAL_USER}], values
    documented = set((await http.get("/openapi.json")).json()["paths"])
    routes = {v for k, v in labels if k == "route"}
    assert "unmatched" in routes and "/v1/jobs/{jobid}/files/{path}" in routes
    assert routes <= documented | {"unmatched"}, routes - documented
    assert {v for k, v in labels if k == "method"} <= {
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "other",
    }
    assert (
        value(samples, "psik_api_http_requests_total", route="/v1/jobs/{jobid}", method="other", status="405")
        == 1
    )
    assert value(samples, "psik_api_http_requests_total", route="unmatched", method="GET", status="404") == 1


@pytest.mark.anyio
async def test_job_slots_in_use_and_jobs_by_state(settings: Settings, tmp_path: Path) -> None:
    settings.backends = {"default": BackendSettings(type="local", max_running=1)}
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.02; done"
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        try:
            first = await submit(http, script)
            await wait_state(http, first, "active")
            second = await submit(http, script)  # waits for the slot: queued
            samples = await scrape(http)
            assert value(samples, "psik_api_job_slots_in_use", backend="default") == 1
            assert value(samples, "psik_api_job_slots_limit", backend="default") == 1
            assert value(samples, "psik_api_jobs", backend="default", state="active") == 1
            assert value(samples, "psik_api_jobs", backend="default", state="queued") == 1
        finally:
            go.touch()
        await wait_state(http, first, "completed")
        await wait_state(http, second, "completed")

        async def freed() -> bool:
            return value(await scrape(http), "psik_api_job_slots_in_use", backend="default") == 0

        await until("the slot to be given back", freed)
        assert value(await scrape(http), "psik_api_jobs", backend="default", state="completed") == 2


@pytest.mark.anyio
async def test_liveness_rounds_and_the_jobs_they_failed(served: tuple[Starlette, httpx.AsyncClient]) -> None:
    app, http = served
    service = app.state.context.service

    async def first_round() -> bool:  # the loop's own, at start; the next is an hour away
        return value(await scrape(http), "psik_api_liveness_rounds_total") == 1

    await until("the liveness loop's first round", first_round)
    before = await scrape(http)
    rounds = value(before, "psik_api_liveness_rounds_total")
    assert value(before, "psik_api_liveness_failed_jobs_total") == 0
    jobid = await submit(http, "echo $$ > script.pid; exec sleep 60")
    pid_file = service.backend.path(jobid) / "work" / "script.pid"

    async def started() -> bool:
        return pid_file.is_file() and bool(pid_file.read_text().strip())

    await until("the job to run", started)
    assert await service.check_liveness() == []
    assert value(await scrape(http), "psik_api_liveness_rounds_total") == rounds + 1
    history = (await http.get(f"/v1/jobs/{jobid}")).json()["history"]
    os.kill(int(next(t["info"] for t in history if t["state"] == "queued")), signal.SIGKILL)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    failed: list[str] = []

    async def vanished() -> bool:
        failed.extend(await service.check_liveness())
        return bool(failed)

    await until("the liveness check to find the job gone", vanished)
    assert failed == [jobid]
    after = await scrape(http)
    assert value(after, "psik_api_liveness_failed_jobs_total") == 1
    assert value(after, "psik_api_liveness_rounds_total") >= rounds + 2


@pytest.mark.anyio
async def test_launcher_queue_depth(settings: Settings) -> None:
    launcher = LocalLauncher(settings.prefix.parent / "launcher.log", eager=False)
    app = create_app(settings, launcher=launcher)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        assert value(await scrape(http), "psik_api_launcher_pending") == 0
        proc = await launcher.start()
        answers: list[httpx.Response] = []

        async def post() -> None:
            answers.append(await http.post("/v1/jobs", json={"script": "true"}))

        async with anyio.create_task_group() as tg:
            os.kill(proc.pid, signal.SIGSTOP)  # the launcher takes no request off its pipe
            try:
                tg.start_soon(post)

                async def queued() -> bool:
                    return value(await scrape(http), "psik_api_launcher_pending") == 1

                await until("the submit to wait on the launcher", queued)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
        assert answers[0].status_code == 201, answers[0].text
        assert value(await scrape(http), "psik_api_launcher_pending") == 0
        await wait_state(http, answers[0].json()["jobid"], "completed")


def test_event_subscribers_and_events_sent(live_app: LiveServer) -> None:
    url = live_app.url

    def samples() -> Samples:
        return check_answer(httpx.get(f"{url}/metrics", timeout=10))

    def until_sync(what: str, check: Callable[[Samples], bool]) -> Samples:
        deadline = time.monotonic() + 20
        while not check(found := samples()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
        return found

    assert value(samples(), "psik_api_event_subscribers") == 0
    sent = value(samples(), "psik_api_events_sent_total")
    with httpx.Client(timeout=httpx.Timeout(20, read=20)) as c, c.stream("GET", f"{url}/v1/events") as stream:
        assert stream.status_code == 200
        assert value(samples(), "psik_api_event_subscribers") == 1  # subscribed before the headers
        r = httpx.post(f"{url}/v1/jobs", json={"script": "true"}, timeout=10)
        assert r.status_code == 201, r.text
        for line in stream.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["job_state"] == "completed":
                break
        # queued, active, completed (and the new row, if the stream saw it): each sent once.
        until_sync("the events to be counted", lambda s: value(s, "psik_api_events_sent_total") >= sent + 3)
    until_sync("the stream's subscription to end", lambda s: value(s, "psik_api_event_subscribers") == 0)
    streamed = value(samples(), "psik_api_events_sent_total")
    polled = httpx.get(
        f"{url}/v1/events", params={"after": 0}, headers={"Accept": "application/json"}, timeout=10
    )
    assert polled.status_code == 200 and len(polled.json()) >= 3
    assert value(samples(), "psik_api_events_sent_total") == streamed + len(polled.json())


# ---- disk full, on a real small filesystem ----


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a small tmpfs needs root, and CI=true: this test must run there")
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mnt = tmp_path / "small"
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> Path:
    """Fill ``fs`` to its last byte with one file."""
    filler = fs / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"x" * size)
            except OSError:
                continue
    return filler


@pytest.mark.anyio
async def test_disk_full_per_place(small_fs: Path) -> None:
    settings = Settings(
        prefix=small_fs / "jobs",
        database=small_fs / "index.sqlite",
        backends={"default": BackendSettings(type="local")},
        watch_interval=0.02,
    )
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        samples = await scrape(http)
        assert value(samples, "psik_api_disk_full", place="prefix") == 0
        assert value(samples, "psik_api_disk_full", place="index") == 0
        filler = fill(small_fs)
        try:
            r = await http.post("/v1/jobs", json={"script": "true"})
            assert r.status_code == 507, r.text
            samples = await scrape(http)  # reads work on a full disk, this one too
            # The prefix and the index share this filesystem: both are full.
            assert value(samples, "psik_api_disk_full", place="prefix") == 1
            assert value(samples, "psik_api_disk_full", place="index") == 1
        finally:
            filler.unlink()
        jobid = await submit(http, "true")  # a write that works ends the episode
        samples = await scrape(http)
        assert value(samples, "psik_api_disk_full", place="prefix") == 0
        assert value(samples, "psik_api_disk_full", place="index") == 0
        await wait_state(http, jobid, "completed")


# ---- who may read ----


@pytest.mark.anyio
async def test_local_mode_refuses_a_foreign_page_as_on_the_job_routes(
    served: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, http = served
    for path in ("/metrics", "/v1/jobs"):
        r = await http.get(path, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["code"] == "forbidden"


@pytest.fixture(scope="module")
def other_user() -> Iterator[Other]:
    yield from another_user()


ASK = r"""
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)
conn.request("GET", "/metrics")
r = conn.getresponse()
print(json.dumps({"status": r.status, "body": r.read(4096).decode()}))
"""


def test_another_local_user_cannot_read_the_metrics(other_user: Other, live_app: LiveServer) -> None:
    host, port = live_app.url.removeprefix("http://").split(":")
    out = run_as(other_user.uid, other_user.gid, [other_user.python, "-c", ASK, host, port], timeout=15)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["status"] == 403, answer
    assert json.loads(answer["body"])["code"] == "forbidden"
    assert "psik_api_" not in answer["body"]
    check_answer(httpx.get(f"{live_app.url}/metrics", timeout=10))  # the owner may


def _problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code
    assert "psik_api_" not in r.text


@pytest.fixture(scope="module")
def readers_server(
    tls_identities: Identities, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsServer]:
    state = tmp_path_factory.mktemp("metrics") / "state"
    with run_tls_server(tls_identities, state, authz="token", metrics_readers=["uid:alice"]) as server:
        yield server


def test_token_mode_only_the_readers_listed_and_no_narrowed_token(readers_server: TlsServer) -> None:
    biscuit = pytest.importorskip("biscuit_auth")
    server = readers_server
    with server.client("alice") as alice:
        samples = check_answer(alice.get("/metrics"))
        jobid = alice.post("/v1/jobs/new", json={"script": "true"}).json()["jobid"]
        token = alice.get("/v1/token").json()["token"]
        key = biscuit.PublicKey(alice.get("/v1/token/key").json()["public_key"])
    assert value(samples, "psik_api_startup_reconcile_seconds") > 0
    with server.client("bob") as bob:
        _problem(bob.get("/metrics"), 403, "forbidden")
    # alice's token from bob's connection acts as alice: a reader, even read-only ...
    with server.client("bob", token=token) as agent:
        check_answer(agent.get("/metrics"))

    def narrowed(code: str) -> str:
        parsed = biscuit.Biscuit.from_base64(token, key)
        return str(parsed.append(biscuit.BlockBuilder(code)).to_base64())

    with server.client("bob", token=narrowed('check if operation("GET");')) as agent:
        check_answer(agent.get("/metrics"))
    # ... but never narrowed to jobs, not even to one job of hers.
    with server.client("bob", token=narrowed(f'check if job($j), ["{jobid}"].contains($j);')) as agent:
        assert agent.get(f"/v1/jobs/{jobid}").status_code == 200  # the token itself works
        _problem(agent.get("/metrics"), 403, "forbidden")
    with server.client("alice", token="not-a-biscuit") as bad:
        _problem(bad.get("/metrics"), 401, "unauthorized")


def test_token_mode_nobody_reads_by_default(tls_server: TlsServer) -> None:
    with tls_server.client("alice") as alice:
        _problem(alice.get("/metrics"), 403, "forbidden")
