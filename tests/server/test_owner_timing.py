"""Token mode: another user's job and a job that does not exist answer the same 404 by
the same work, so that no caller can tell by the time of the answer which job ids are
someone else's (measured: bench/bench_owner_404.py). The same index statements run and
the policy is asked once, whichever it is; the answers are byte for byte alike but for
the id."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from psik_api_core import Action, OwnerPolicy, Principal
from psik_api_server.app import create_app
from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.settings import BackendSettings, Settings

pytestmark = pytest.mark.anyio


class _Peer:
    """Stands in for certified's TLS transport: the peer certificate is the user's name."""

    def __init__(self, user: str) -> None:
        self.user = user

    def get_extra_info(self, name: str) -> Any:
        return self if name == "ssl_object" else None

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.user.encode()


class _Names:
    def identity(self, der: bytes) -> str:
        return f"uid:{der.decode()}"


class CountingPolicy(OwnerPolicy):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def allows(self, principal: Principal, action: Action, owner: str | None, jobid: str | None) -> bool:
        self.calls.append((action.value, jobid))
        return super().allows(principal, action, owner, jobid)


async def call(app: Starlette, user: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    # One request id for every call: answers are compared whole, byte for byte.
    headers = [(b"host", b"localhost"), (b"x-request-id", b"same")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "https", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": headers, "server": ("127.0.0.1", 8443),
        "client": ("127.0.0.1", 50000), "transport": _Peer(user),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
async def token_app(tmp_path: Path) -> AsyncIterator[tuple[Starlette, CountingPolicy]]:
    settings = Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        state_dir=tmp_path / "state",
        backends={"default": BackendSettings(type="local")},
        authz="token",
    )
    policy = CountingPolicy()
    app = create_app(settings, launcher=LocalLauncher(tmp_path / "launcher.log", eager=False), policy=policy)
    async with LifespanManager(app):
        app.state.context.client_names = _Names()
        yield app, policy


@pytest.mark.parametrize("route", ["", "/state", "/logs", "/files", "/start", "DELETE"])
async def test_another_users_job_and_no_job_take_the_same_path(
    token_app: tuple[Starlette, CountingPolicy], route: str
) -> None:
    app, policy = token_app
    status, body = await call(app, "alice", "POST", "/v1/jobs/new", json.dumps({"script": "true"}).encode())
    assert status == 201, body
    theirs, nobodys = json.loads(body)["jobid"], "1000000000.001"
    db = app.state.context.service.store._db._conn  # the sqlite3 connection under the store lock

    async def ask(jobid: str) -> tuple[bytes, list[str], list[tuple[str, str | None]]]:
        statements: list[str] = []
        db.set_trace_callback(statements.append)
        policy.calls.clear()
        try:
            if route == "DELETE":
                status, body = await call(app, "bob", "DELETE", f"/v1/jobs/{jobid}")
            else:
                method = "POST" if route == "/start" else "GET"
                status, body = await call(app, "bob", method, f"/v1/jobs/{jobid}{route}")
        finally:
            db.set_trace_callback(None)
        assert status == 404, body
        calls = [(action, "ID" if j == jobid else j) for action, j in policy.calls]
        return body.replace(jobid.encode(), b"ID"), [s.replace(jobid, "ID") for s in statements], calls

    body_theirs, sql_theirs, policy_theirs = await ask(theirs)
    body_none, sql_none, policy_none = await ask(nobodys)
    assert body_theirs == body_none
    assert sql_theirs == sql_none and sql_theirs, (sql_theirs, sql_none)
    assert policy_theirs == policy_none and policy_theirs, (policy_theirs, policy_none)


async def test_the_owner_and_a_wider_policy_still_see_the_job(
    token_app: tuple[Starlette, CountingPolicy],
) -> None:
    app, _ = token_app
    status, body = await call(app, "alice", "POST", "/v1/jobs/new", json.dumps({"script": "true"}).encode())
    assert status == 201, body
    jobid = json.loads(body)["jobid"]
    assert (await call(app, "alice", "GET", f"/v1/jobs/{jobid}/state"))[0] == 200

    class Admin(OwnerPolicy):  # a site's policy: the admin reads every job
        def allows(self, principal: Principal, action: Action, owner: str | None, jobid: str | None) -> bool:
            return principal.user == "uid:admin" or super().allows(principal, action, owner, jobid)

    app.state.context.service.policy = Admin()
    assert (await call(app, "admin", "GET", f"/v1/jobs/{jobid}/state"))[0] == 200
    assert (await call(app, "admin", "GET", "/v1/jobs/1000000000.001/state"))[0] == 404
    assert (await call(app, "bob", "GET", f"/v1/jobs/{jobid}/state"))[0] == 404
