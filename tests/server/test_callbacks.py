"""Job callbacks (issue 8): with ``callback_url`` each job reports to the server, signed
with a secret the server made for it; ``POST /v1/callback`` takes only such reports; a
user's own callback is relayed, signed with the user's secret; the callback fields are
never echoed; in token mode a spec's callback host and ``inherit_environment`` are
limited."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from conftest import lazy_app
from psik_api_core import JobSpec
from psik_api_server.errors import ApiError
from psik_api_server.jobs.callbacks import RECORD_NAME, read_record
from psik_api_server.jobs.speclimits import SpecLimits, host_allowed
from psik_api_server.settings import Settings
from support import LiveServer

pytestmark = pytest.mark.anyio

SIG = "x-hub-signature-256"
FINAL = {"completed", "failed", "canceled"}


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Receiver:
    """A user's callback endpoint: records each POST (headers, body), answers 204."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def states(self) -> list[str]:
        return [json.loads(body)["state"] for _, body in self.got]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def cb_settings(settings: Settings) -> Settings:
    # In-process: the URL is never called (reports are made by hand below).
    return settings.model_copy(update={"callback_url": "http://127.0.0.1:9/v1/callback"})


@pytest.fixture
async def cb_http(cb_settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = lazy_app(cb_settings)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield app, http


USER_SPEC = {
    "callback": "http://127.0.0.1:9/users-hook",
    "cb_secret": "users-secret",
    "cb_headers": {"X-Users-Header": "users-header-value"},
}


def _no_callback_fields(*texts: str) -> None:
    for text in texts:
        for leak in ("users-secret", "users-header-value", "users-hook", "/v1/callback", "cb_secret"):
            assert leak not in text, (leak, text)
        assert '"callback"' not in text and '"cb_headers"' not in text, text


# ---- a real local job reporting to the live server, relayed to the user ----


async def test_a_local_job_reports_to_the_live_server_and_is_relayed_signed(
    settings: Settings, receiver: Receiver
) -> None:
    app = lazy_app(settings)
    with LiveServer(app) as live:
        service = app.state.context.service
        url = service.specs.callback_url = f"{live.url}/v1/callback"  # known once the port is
        spec = {"script": "true", "callback": receiver.url, "cb_secret": "users-secret"}
        spec["cb_headers"] = {"X-Users-Header": "users-header-value"}
        async with httpx.AsyncClient(base_url=live.url) as http:
            r = await http.post("/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            jobid = r.json()["jobid"]
            with anyio.fail_after(30):
                while "completed" not in receiver.states():
                    await anyio.sleep(0.02)
            texts = [r.text, (await http.get(f"/v1/jobs/{jobid}")).text, (await http.get("/v1/jobs")).text]
            texts.append((await http.delete(f"/v1/jobs/{jobid}")).text)
    _no_callback_fields(*texts)
    base = settings.prefix / jobid
    record = read_record(base)
    assert record is not None and record.callback == receiver.url
    # psik reported to the server, with the server's secret, not the user's:
    on_disk = json.loads((base / "spec.json").read_text())
    assert on_disk["callback"] == url
    assert on_disk["cb_secret"] == record.secret != "users-secret"
    assert on_disk["cb_headers"] == {}
    # ... and each report reached the user signed as psik signs, with the user's secret.
    assert {"active", "completed"} <= set(receiver.states())
    for headers, body in receiver.got:
        assert headers[SIG] == sign(body, "users-secret")
        assert headers["x-users-header"] == "users-header-value"
        assert json.loads(body)["jobid"] == jobid


async def test_the_secret_file_is_owner_only_and_only_with_callback_url(
    cb_http: tuple[Starlette, httpx.AsyncClient], tmp_path: Path
) -> None:
    app, http = cb_http
    jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    path = app.state.context.settings.prefix / jobid / RECORD_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = read_record(path.parent)
    assert record is not None and len(record.secret) == 64 and record.callback is None
    # No callback_url: no file, and psik's spec keeps the user's callback (psik calls it).
    settings = Settings(prefix=tmp_path / "other" / "jobs")
    plain = lazy_app(settings)
    async with LifespanManager(plain):
        transport = httpx.ASGITransport(app=plain)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
            r = await other.post("/v1/jobs/new", json={"script": "true", **USER_SPEC})
            assert r.status_code == 201, r.text
            _no_callback_fields(r.text)
    base = settings.prefix / r.json()["jobid"]
    assert not (base / RECORD_NAME).exists()
    assert json.loads((base / "spec.json").read_text())["callback"] == USER_SPEC["callback"]


async def test_callback_fields_are_never_echoed(cb_http: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, http = cb_http
    made = await http.post("/v1/jobs/new", json={"script": "true", **USER_SPEC})
    assert made.status_code == 201, made.text
    jobid = made.json()["jobid"]
    assert not {"callback", "cb_secret", "cb_headers"} & set(made.json()["spec"])
    texts = [made.text]
    for r in (
        await http.get(f"/v1/jobs/{jobid}"),
        await http.get("/v1/jobs"),
        await http.get(f"/v1/jobs/{jobid}/state"),
        await http.post(f"/v1/jobs/{jobid}/start"),
        await http.delete(f"/v1/jobs/{jobid}"),
        await http.post("/v1/jobs", json={"script": "true", **USER_SPEC}),
    ):
        assert r.status_code in {200, 201}, r.text
        texts.append(r.text)
    _no_callback_fields(*texts)
    # The job submitted last runs `true`: see it end, so that the test leaves nothing running.
    with anyio.fail_after(30):
        while (await http.get(f"/v1/jobs/{r.json()['jobid']}/state")).json()["state"] not in FINAL:
            await anyio.sleep(0.02)


# ---- forged reports ----


def _report(jobid: str, state: str = "queued", jobndx: int = 1, info: str = "4242") -> bytes:
    return json.dumps({"jobid": jobid, "jobndx": jobndx, "state": state, "info": info}).encode()


def _submitted(prefix: Path, jobid: str, native_id: str = "slurm-77") -> None:
    """Write run 1's `queued` row, as psik's submit to a remote backend does before any
    report of the run can come back (reports of runs never submitted are dropped)."""
    with (prefix / jobid / "status.csv").open("a") as f:
        f.write(f"{time.time()},1,queued,{native_id}\n")


async def _post(http: httpx.AsyncClient, body: bytes, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers[SIG] = signature
    return await http.post("/v1/callback", content=body, headers=headers)


async def test_forged_reports_are_401_and_record_nothing(
    cb_http: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, http = cb_http
    prefix: Path = app.state.context.settings.prefix
    a = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    time.sleep(0.002)  # psik names a job by the millisecond
    b = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    secret_a = read_record(prefix / a).secret  # type: ignore[union-attr]
    secret_b = read_record(prefix / b).secret  # type: ignore[union-attr]
    good = _report(a)
    before = {j: (prefix / j / "status.csv").read_bytes() for j in (a, b)}
    forged = {
        "unsigned": (good, None),
        "wrong secret": (good, sign(good, "guess")),
        "another job's secret": (good, sign(good, secret_b)),
        "replayed for another job": (_report(b), sign(good, secret_a)),
        "tampered body": (_report(a, state="completed"), sign(good, secret_a)),
        "unknown job": (_report("1.5"), sign(_report("1.5"), secret_a)),
        "not a job id": (_report("../x"), sign(_report("../x"), secret_a)),
        "not JSON": (b"{nope", sign(b"{nope", secret_a)),
        "signed, not a report": (
            b'{"jobid": "%s"}' % a.encode(),
            sign(b'{"jobid": "%s"}' % a.encode(), secret_a),
        ),
        "signature in upper case": (good, sign(good, secret_a).upper()),
    }
    for why, (body, signature) in forged.items():
        r = await _post(http, body, signature)
        assert r.status_code == 401, (why, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json", why
        assert r.json()["code"] == "unauthorized", why
    assert {j: (prefix / j / "status.csv").read_bytes() for j in (a, b)} == before
    for j in (a, b):
        assert (await http.get(f"/v1/jobs/{j}/state")).json()["state"] == "new"
    big = _report(a, info="x" * 20_000)
    r = await _post(http, big, sign(big, secret_a))
    assert r.status_code == 413, r.text
    assert {j: (prefix / j / "status.csv").read_bytes() for j in (a, b)} == before


async def test_a_signed_report_is_recorded_once_as_psik_records_a_remote_one(
    cb_http: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, http = cb_http
    prefix: Path = app.state.context.settings.prefix
    jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    secret = read_record(prefix / jobid).secret  # type: ignore[union-attr]
    _submitted(prefix, jobid)  # the job's own reports follow
    body = _report(jobid, "active", 1, "on node7")
    for _ in range(2):  # a repeated report adds no second row
        r = await _post(http, body, sign(body, secret))
        assert r.status_code == 204, r.text
    rows = (prefix / jobid / "status.csv").read_text().splitlines()
    assert [row.split(",")[1:] for row in rows[1:]] == [
        ["1", "queued", "slurm-77"],
        ["1", "active", "on node7"],
    ]
    state = (await http.get(f"/v1/jobs/{jobid}/state")).json()
    assert (state["state"], state["jobndx"]) == ("active", 1)
    job = (await http.get(f"/v1/jobs/{jobid}")).json()
    assert job["native_id"] == "slurm-77"


async def test_replays_and_stale_reports_change_nothing_and_are_not_relayed(
    cb_http: tuple[Starlette, httpx.AsyncClient], receiver: Receiver
) -> None:
    """A signed report can be captured and posted again later. Before: a report of an
    earlier run was written after ``completed``, every replay was relayed to the user's
    callback again, and a report for a job purged meanwhile was a 500."""
    app, http = cb_http
    prefix: Path = app.state.context.settings.prefix
    spec = {"script": "true", "callback": receiver.url, "cb_secret": "users-secret"}
    jobid = (await http.post("/v1/jobs/new", json=spec)).json()["jobid"]
    secret = read_record(prefix / jobid).secret  # type: ignore[union-attr]
    _submitted(prefix, jobid)
    reports = {s: _report(jobid, s) for s in ("queued", "active", "completed")}
    for body in reports.values():
        assert (await _post(http, body, sign(body, secret))).status_code == 204
    await app.state.context.service.relay.wait()
    assert receiver.states() == ["queued", "active", "completed"]
    before = (prefix / jobid / "status.csv").read_bytes()

    stale = _report(jobid, "active", jobndx=0)  # a run before this one
    never = _report(jobid, "completed", jobndx=7)  # a run never submitted
    for body in (reports["active"], reports["queued"], reports["completed"], stale, never):
        assert (await _post(http, body, sign(body, secret))).status_code == 204
    await app.state.context.service.relay.wait()
    assert (prefix / jobid / "status.csv").read_bytes() == before
    assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "completed"
    assert receiver.states() == ["queued", "active", "completed"]

    # A job never started: no report of any run is psik's (run 0 is only ever canceled).
    fresh = (await http.post("/v1/jobs/new", json=spec)).json()["jobid"]
    fresh_secret = read_record(prefix / fresh).secret  # type: ignore[union-attr]
    before_fresh = (prefix / fresh / "status.csv").read_bytes()
    for run in (0, 1):
        body = _report(fresh, "completed", jobndx=run)
        assert (await _post(http, body, sign(body, fresh_secret))).status_code == 204
    assert (prefix / fresh / "status.csv").read_bytes() == before_fresh
    assert (await http.get(f"/v1/jobs/{fresh}/state")).json()["state"] == "new"

    # Purged between the signature check and the write: nothing to record, no 500.
    service = app.state.context.service
    real = service._record_report_sync

    def purged_meanwhile(*args: Any) -> bool:
        (prefix / jobid / "status.csv").unlink()
        return bool(real(*args))

    service._record_report_sync = purged_meanwhile
    body = _report(jobid, "active", jobndx=2)
    r = await _post(http, body, sign(body, secret))
    assert r.status_code == 204, r.text
    await app.state.context.service.relay.wait()
    assert receiver.states() == ["queued", "active", "completed"]


async def test_a_users_dead_callback_holds_up_no_report(
    cb_http: tuple[Starlette, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    app, http = cb_http
    blackhole = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    dead = f"http://127.0.0.1:{blackhole.getsockname()[1]}/hook"
    try:
        jobid = (await http.post("/v1/jobs/new", json={"script": "true", "callback": dead})).json()["jobid"]
        secret = read_record(app.state.context.settings.prefix / jobid).secret  # type: ignore[union-attr]
        _submitted(app.state.context.settings.prefix, jobid)
        app.state.context.service.relay.timeout = 0.3
        with anyio.fail_after(5):
            for state in ("queued", "active"):
                body = _report(jobid, state)
                assert (await _post(http, body, sign(body, secret))).status_code == 204
        await app.state.context.service.relay.wait()
    finally:
        blackhole.close()
    said = [r for r in caplog.records if "not delivered" in r.getMessage() and r.levelname == "WARNING"]
    assert len(said) == 1  # once per job, not per report


# ---- token mode: what a spec may ask for ----


LIMITS = SpecLimits(token_mode=True, callback_hosts=("hooks.example.org", "*.example.net", "10.1.2.3"))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("hooks.example.org", True),
        ("HOOKS.example.org.", True),
        ("a.example.net", True),
        ("a.b.example.net", True),
        ("example.net", False),
        ("evil-example.net", False),
        ("example.org", False),
        ("10.1.2.3", True),
        ("10.1.2.4", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("localhost", False),
    ],
)
def test_callback_hosts(host: str, allowed: bool) -> None:
    assert host_allowed(host, LIMITS.callback_hosts) is allowed


def test_local_mode_limits_nothing() -> None:
    spec = JobSpec.validate_input({"script": "x", "callback": "http://10.0.0.1/h"})
    assert SpecLimits().check(spec) == spec
    assert spec.inherit_environment is True


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"callback": "http://internal.site/h"}, "callback"),
        ({"callback": "http://127.0.0.1:8000/v1/jobs"}, "callback"),
        ({"callback": "http://[::1]/h"}, "callback"),
        ({"callback": "http://192.168.1.1/h"}, "callback"),
        ({"callback": "https://user@evil.org@hooks.example.org/h"}, None),  # host is hooks.example.org
        ({"inherit_environment": True}, "inherit_environment"),
        ({"callback": "https://hooks.example.org/h"}, None),
        ({"callback": "http://x.example.net:8080/h", "inherit_environment": False}, None),
    ],
)
def test_token_mode_spec_limits(spec: dict[str, Any], field: str | None) -> None:
    parsed = JobSpec.validate_input({"script": "x", **spec})
    if field is None:
        assert LIMITS.check(parsed).inherit_environment is False
        return
    with pytest.raises(ApiError) as err:
        LIMITS.check(parsed)
    assert err.value.errors[0].loc == ["body", field]


def test_token_mode_inherit_environment() -> None:
    given = JobSpec.validate_input({"script": "x", "inherit_environment": True})
    allowed = SpecLimits(token_mode=True, allow_inherit_environment=True)
    assert allowed.check(given).inherit_environment is True
    omitted = JobSpec.validate_input({"script": "x"})
    assert allowed.check(omitted).inherit_environment is False  # the safe default stays


async def test_the_service_applies_the_limits(app: Starlette, http: httpx.AsyncClient) -> None:
    app.state.context.service.specs.spec_limits = LIMITS  # as app.py builds them for authz "token"
    r = await http.post("/v1/jobs/new", json={"script": "true", "callback": "http://10.0.0.1/h"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == ["body", "callback"]
    r = await http.post("/v1/jobs/new", json={"script": "true", "inherit_environment": True})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "inherit_environment"]
    r = await http.post("/v1/jobs/new", json={"script": "true"})
    assert r.status_code == 201
    spec = json.loads((app.state.context.settings.prefix / r.json()["jobid"] / "spec.json").read_text())
    assert spec["inherit_environment"] is False


def test_settings_take_the_callback_fields(tmp_path: Path) -> None:
    from psik_api_server.settings import parse_config

    s = parse_config(
        {
            "callback_url": "https://psik.site/v1/callback",
            "callback_hosts": ["h.org"],
            "allow_inherit_environment": True,
        }
    )
    assert (s.callback_url, s.callback_hosts, s.allow_inherit_environment, s.notes) == (
        "https://psik.site/v1/callback",
        ["h.org"],
        True,
        [],
    )
    with pytest.raises(ValueError, match="callback_url"):
        parse_config({"callback_url": "file:///etc/passwd"})
