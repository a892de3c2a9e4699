"""Secrets never reach a log line: real servers at debug level, in both modes (local:
``psik-api-server serve --log-level debug --log-format json``; token: ``certified serve
-vv`` with mutual TLS, ``log_format: json``), are sent every secret the API knows of
(callback secrets and the headers a callback carries, bearer tokens good and damaged, a
local-secret header, the per-job callback secret the server makes, signed and badly signed
reports), and their whole logs, the launcher's too, are searched for each one.

The json logs are also checked as an operator reads them: every line a JSON object, one
access line per request, naming the id its answer carried."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from support import free_port, wait_healthy
from tls_support import CERTIFIED, Identities, user_ssl_context, write_config

ROUTE_TEMPLATES = {
    "/v1/jobs",
    "/v1/jobs/{jobid}",
    "/v1/jobs/{jobid}/state",
    "/v1/callback",
    "/v1/token",
    "/healthz",
}


def _secret(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(16)}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        _stop(proc)


def _sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _wait_final(http: httpx.Client, jobid: str) -> None:
    deadline = time.monotonic() + 30
    while http.get(f"/v1/jobs/{jobid}/state").json()["state"] not in {"completed", "failed", "canceled"}:
        assert time.monotonic() < deadline, f"job {jobid} did not end"
        time.sleep(0.05)


def _exercise(http: httpx.Client, prefix: Path, hook: str, sent: list[str]) -> list[str]:
    """Every path a secret travels, as ``http`` (a caller the server takes); the secrets
    used, each of which must never be logged. ``sent`` gets each answer's request id."""
    cb_secret, cb_header = _secret("cbsecret"), _secret("cbheader")
    spec: dict[str, Any] = {
        "script": "echo hello",
        "callback": hook,  # nothing listens there: the relay fails, and says so
        "cb_secret": cb_secret,
        "cb_headers": {"Authorization": f"Bearer {cb_header}"},
    }
    r = http.post("/v1/jobs", json=spec, headers={"X-Request-ID": "submit-1"})
    assert r.status_code == 201, r.text
    jobid = r.json()["jobid"]
    sent.append(r.headers["x-request-id"])
    bad_secret = _secret("badspec")
    r = http.post("/v1/jobs", json={**spec, "cb_secret": bad_secret, "resources": {"duration": 0}})
    assert r.status_code == 422, r.text
    sent.append(r.headers["x-request-id"])
    _wait_final(http, jobid)
    record = json.loads((prefix / jobid / ".psik-api-callback").read_text())
    job_secret = record["secret"]
    report = json.dumps({"jobid": jobid, "jobndx": 1, "state": "completed", "info": ""}).encode()
    for signature in (_sign(report, job_secret), _sign(report, "wrong"), _sign(report, cb_secret)):
        r = http.post(
            "/v1/callback",
            content=report,
            headers={"content-type": "application/json", "x-hub-signature-256": signature},
        )
        assert r.status_code in {204, 401}, r.text
        sent.append(r.headers["x-request-id"])
    local_secret = _secret("localsecret")
    r = http.get(f"/v1/jobs/{jobid}", headers={"Psik-Local-Secret": local_secret})
    sent.append(r.headers["x-request-id"])
    return [cb_secret, cb_header, bad_secret, job_secret, local_secret]


def _check_logs(logs: list[Path], secret_values: list[str], sent: list[str]) -> list[dict[str, Any]]:
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    for value in secret_values:
        assert value not in text, f"a secret is in the log: {value[:12]}..."
    if not sent:
        return []
    lines = [json.loads(line) for line in logs[0].read_text().splitlines() if line.startswith("{")]
    access = [x for x in lines if x["logger"] == "psik_api_server.access"]
    assert {x["request_id"] for x in access} >= set(sent)
    assert "submit-1" in {x["request_id"] for x in access}
    assert {x["route"] for x in access} <= ROUTE_TEMPLATES | {"unmatched"}, {x["route"] for x in access}
    for x in access:
        assert {"time", "identity", "method", "status", "duration_ms", "bytes_in", "bytes_out"} <= set(x)
    return access


def test_local_mode_logs_no_secret(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "psik_api.json"
    write_config(
        config,
        tmp_path / "state",
        callback_url=f"http://127.0.0.1:{port}/v1/callback",
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV"}}
    env |= {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_RUNTIME_DIR": ""}
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "psik_api_server", "serve", "--config", str(config), "--port", str(port)]
    argv += ["--log-level", "debug", "--log-format", "json"]
    sent: list[str] = []
    with _running(argv, env, log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, lambda: log.read_text())
        with httpx.Client(base_url=url, timeout=30) as http:
            used = _exercise(http, tmp_path / "state" / "jobs", f"http://127.0.0.1:{free_port()}/hook", sent)
            r = http.get("/v1/jobs", headers={"Authorization": f"Bearer {(token := _secret('token'))}"})
            sent.append(r.headers["x-request-id"])
            used.append(token)
    used += [p.read_text().strip() for p in (tmp_path / "data").rglob("local-*.json")]
    access = _check_logs([log, tmp_path / "state" / "launcher.log"], used, sent)
    # Every line of the json log is an object; the caller is named, by no credential.
    assert all(line.startswith("{") for line in log.read_text().splitlines()), log.read_text()[-3000:]
    assert {x["identity"] for x in access if x["status"] < 400} == {"local:psik_api"}


def test_token_mode_logs_no_secret(tls_identities: Identities, tmp_path: Path) -> None:
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    state = tmp_path / "state"
    config = write_config(
        state / "psik_api.json",
        state,
        authz="token",
        log_format="json",
        callback_url=f"{url}/v1/callback",
        callback_hosts=["127.0.0.1"],
    )
    env = {**os.environ, "PSIK_API_CONFIG": str(config), "XDG_DATA_HOME": str(tmp_path / "data")}
    env["XDG_RUNTIME_DIR"] = ""
    log = tmp_path / "server.log"
    argv = [
        CERTIFIED,
        "serve",
        "-vv",
        "--config",
        str(tls_identities.server),
        "psik_api_server.main:app",
        url,
    ]
    ssl = user_ssl_context(tls_identities.users["alice"], tls_identities.server)
    sent: list[str] = []
    with _running(argv, env, log) as proc:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=url, verify=ssl, timeout=30) as http:
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/healthz").status_code == 200:
                        break
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            minted = http.get("/v1/token")
            assert minted.status_code == 200, minted.text
            token = minted.json()["token"]
            sent.append(minted.headers["x-request-id"])
            for shown in (token, token[:-4] + "AAAA"):
                r = http.post("/v1/token", json={"token": shown})
                sent.append(r.headers["x-request-id"])
        with httpx.Client(
            base_url=url, verify=ssl, timeout=30, headers={"Authorization": f"Bearer {token}"}
        ) as bearer:
            used = _exercise(bearer, state / "jobs", f"https://127.0.0.1:{free_port()}/hook", sent)
            r = bearer.get("/v1/jobs", headers={"Authorization": f"Bearer {token}x"})
            sent.append(r.headers["x-request-id"])
    key = (state / "token-key.pem").read_text()
    key_body = "".join(line for line in key.splitlines() if not line.startswith("-----"))
    _check_logs([log, state / "launcher.log"], [*used, token, token[:-4] + "AAAA", key_body[:40]], [])
    # certified serve formats the lines (its own text handler): the access lines are there,
    # each naming its request.
    access = [line for line in log.read_text().splitlines() if "psik_api_server.access" in line]
    for request_id in sent:
        assert any(f"(request {request_id})" in line for line in access), request_id
