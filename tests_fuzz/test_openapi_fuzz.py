"""schemathesis against a real server, from the OpenAPI document the server serves: every
operation, with examples, the coverage phase (boundary values, invalid inputs, methods a
path does not allow) and bounded random fuzzing. A 5xx, or a status, content type, header
or body the document does not declare, fails; so does a request the document calls invalid
that the server accepts, and one it calls valid that the server refuses for a reason the
document does not state (how generated clients and the server came to disagree). A method
a path lacks is also sent with each kind of body: 405, never 415.

Two servers, as sites run them: local mode (``psik-api-server serve`` on loopback TCP,
the tests' own uid) and token mode (``certified serve`` with mutual TLS, as alice).
Jobs really run: a generated job's script is replaced by ``true`` (a random string run by
a shell could be anything) and its callback dropped; every job is ended at the end.

Run by ``nox -s api_fuzz`` (part of ``nox``); not by the ``tests`` session. A fixed seed
keeps CI reproducible: ``PSIK_API_FUZZ_SEED`` picks another, ``PSIK_API_FUZZ_EXAMPLES``
more examples per operation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from psik_api_server import __version__
from psik_api_server.http.openapi import build_openapi
from support import free_port, wait_healthy
from tls_support import make_identities, tls_server, write_config

#: Refusals of a request the schema calls valid that the document states in words (what
#: a JSON schema cannot say): a reused Idempotency-Key, a cursor this server did not make,
#: `offset` other than 0 together with `tail`, a callback URL with no valid host (or, in
#: token mode, not one of the server's callback hosts), a directory outside the roots the
#: server allows, a backend this server does not have, in token mode
#: `inherit_environment` unless the server allows it, a token lifetime over the server's
#: `token_lifetime`, an integer written with a
#: fraction (`10.0`: JSON Schema's integer, refused as ResourceSpec's description says).
STATED_REFUSALS = {
    ("validation_error", ("body", "directory")),
    ("validation_error", ("body", "inherit_environment")),
    ("validation_error", ("query", "expires")),
    ("unknown_backend", ("body", "backend")),
    ("idempotency_mismatch", ("header", "Idempotency-Key")),
    ("validation_error", ("query", "cursor")),
    ("validation_error", ("query", "offset")),
    ("validation_error", ("body", "callback")),
    # JobSpec.after: a job that is not one of the caller's (docs: Dependencies), and in a
    # group an index that names no job of the request, the job itself, or a cycle.
    ("validation_error", ("body", "after", "*", "jobid")),
    ("validation_error", ("body", "after", "*", "index")),
    ("validation_error", ("body", "after")),
}


def _stated_loc(loc: Any) -> tuple[Any, ...]:
    """A refusal's ``loc`` as for a single spec: a group's ``jobs[i]...`` or ``spec...``
    is the spec's own field; list positions are ``*``."""
    loc = tuple(loc)
    if loc[:2] == ("body", "jobs") and len(loc) > 3:
        loc = ("body", *loc[3:])
    elif loc[:2] == ("body", "spec") and len(loc) > 2:
        loc = ("body", *loc[2:])
    return tuple("*" if isinstance(p, int) else p for p in loc)


@schemathesis.check
def valid_requests_are_taken(ctx: schemathesis.CheckContext, response: Any, case: schemathesis.Case) -> None:
    """A request generated valid is never 400/422 but for a reason the document states
    (schemathesis' own positive_data_acceptance would also refuse those)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code not in {400, 422}:
        return
    problem = response.json()
    errors = problem.get("errors", [])
    locs = {_stated_loc(e.get("loc", ())) for e in errors}
    stated = {(problem.get("code"), loc) for loc in locs} & STATED_REFUSALS
    if errors and all(e.get("type") == "int_type" for e in errors):
        stated = {("int_type", ())}
    if problem.get("code") == "validation_error" and ("query", "offset") in locs:
        stated = stated if case.query and str(case.query.get("offset")) not in {"0", "None"} else set()
    assert stated, f"a valid request was refused: {response.status_code} {problem}"


CHECKS = [
    valid_requests_are_taken,
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]
SEED = int(os.environ.get("PSIK_API_FUZZ_SEED", "20261207"))
EXAMPLES = int(os.environ.get("PSIK_API_FUZZ_EXAMPLES", "50"))
#: Streams that last as long as the client listens (Server-Sent Events): their
#: long-poll form (Accept: application/json) is what a generated request would get
#: only by chance, so they are left to the event tests.
STREAMS = ["/v1/events", "/v1/jobs/{jobid}/events"]
FINAL = {"completed", "failed", "canceled"}


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": 20,
            "generation": {"mode": "all", "max-examples": EXAMPLES},
            "phases": {"stateful": {"enabled": False}},
        }
    )


@schemathesis.hook
def before_call(ctx: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """A job that may run gets ``true`` for a script and no callback (only where the body
    was generated valid: an invalid one must stay as generated, and is refused)."""
    if case.method.upper() != "POST" or case.path not in {"/v1/jobs", "/v1/groups"}:
        return
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY):
        return
    body = case.body
    specs = [body] if case.path == "/v1/jobs" else []
    if isinstance(body, dict):
        specs += [s for s in body.get("jobs") or [] if isinstance(s, dict)]
        if isinstance(body.get("spec"), dict):
            specs.append(body["spec"])
    for spec in specs:
        if isinstance(spec, dict):
            if "script" in spec:
                spec["script"] = "true"
            spec.pop("callback", None)
    if isinstance(body, dict) and isinstance(body.get("params"), dict):
        _bound_sweep(body["params"])


#: The most jobs one generated sweep makes. The document allows 1,000 (and a sweep of
#: five names with five values each is 3,125, refused); a valid one of hundreds of jobs
#: that all run ``true`` on two cores took 12 s here and over 20 s in CI, while the
#: fuzzing is about what the server answers, not how fast it makes 1,000 jobs
#: (bench/bench_groups.py measures that, tests/server/test_groups.py the limit).
SWEEP_JOBS = 64


def _bound_sweep(params: dict[str, Any]) -> None:
    """Shorten the longest value lists of a sweep until it makes at most SWEEP_JOBS jobs
    (each list keeps at least one value, so a valid sweep stays valid)."""
    lists = [v for v in params.values() if isinstance(v, list) and v]
    if len(lists) != len(params):
        return  # not a valid sweep: it must be refused as generated

    def size() -> int:
        n = 1
        for values in lists:
            n *= len(values)
        return n

    while size() > SWEEP_JOBS:
        longest = max(lists, key=len)
        if len(longest) == 1:
            return  # more names than the bound allows at one value each: refused anyway
        longest.pop()


# ---- the servers ----


class LocalServer:
    """``python -m psik_api_server serve`` (local mode) on a free loopback port."""

    def __init__(self, state: Path) -> None:
        self.config = write_config(state / "psik_api.json", state)
        self.log = state / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalServer:
        env = {**os.environ, "PSIK_API_CONFIG": str(self.config)}
        argv = [sys.executable, "-m", "psik_api_server", "serve", "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        wait_healthy(self.url, self.proc, self.log.read_text)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _end_jobs(http: httpx.Client) -> None:
    """Cancel what the fuzzing left running, and wait until it has ended."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        page = http.get("/v1/jobs", params={"limit": 100}).json()
        live = [j["jobid"] for j in page["items"] if j["state"] not in FINAL]
        if not live:
            return
        for jobid in live:
            http.delete(f"/v1/jobs/{jobid}")
        time.sleep(0.2)
    raise AssertionError(f"jobs still running after the fuzzing: {live}")


#: The document both servers serve (it depends only on the backends' names); each
#: server's fixture checks that its /openapi.json is this one.
DOC = build_openapi(version=__version__, backends=["default"])
SCHEMA = schemathesis.openapi.from_dict(DOC, config=_config()).exclude(path=STREAMS)


@dataclass
class Target:
    """Where a server answers, and the requests arguments that reach it."""

    url: str
    kwargs: dict[str, Any]


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with (
        LocalServer(tmp_path_factory.mktemp("local")) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        assert http.get("/openapi.json").json() == DOC
        yield Target(server.url, {})
        _end_jobs(http)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    identities = make_identities(tmp_path_factory.mktemp("certified"), users=("alice",))
    alice = identities.users["alice"]
    tls = {
        "verify": str(identities.server / "CA.crt"),
        "cert": (str(alice / "id.crt"), str(alice / "id.key")),
    }
    with (
        # No rate limits (token mode's default has them): the fuzzing's hundreds of
        # requests a second would be 429s, and reach no route.
        tls_server(
            identities, tmp_path_factory.mktemp("token") / "state", authz="token", rate_limits=None
        ) as server,
        server.client("alice") as http,
    ):
        assert http.get("/openapi.json").json() == DOC
        yield Target(server.url, tls)
        _end_jobs(http)


@SCHEMA.parametrize()
def test_local_mode_answers_as_its_document_says(case: schemathesis.Case, local_server: Target) -> None:
    case.call_and_validate(base_url=local_server.url, checks=CHECKS, **local_server.kwargs)


@SCHEMA.parametrize()
def test_token_mode_answers_as_its_document_says(case: schemathesis.Case, token_server: Target) -> None:
    case.call_and_validate(base_url=token_server.url, checks=CHECKS, **token_server.kwargs)


#: A value for each path parameter the document has (what they are does not matter here).
_PATH_VALUES = {"jobid": "1693992878.203", "name": "stdout", "path": "a.txt", "group": "0" * 32}
#: Bodies a disallowed method may come with; none of them makes it anything but 405.
_BODIES = [
    ({"Content-Type": "text/plain"}, b"x"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, b"a=b"),
    ({"Content-Type": "application/json"}, b"{}"),
    ({}, None),
]


@pytest.mark.parametrize("path", sorted(DOC["paths"]))
def test_a_method_a_path_does_not_have_is_405_whatever_the_body(local_server: Target, path: str) -> None:
    """The coverage phase above sends unsupported methods without a body; generated
    clients and browsers send one (the issue's 415 for a PATCH with a text body)."""
    allowed = {m.upper() for m in DOC["paths"][path]}
    url = local_server.url + path.format(**_PATH_VALUES)
    for method in sorted({"GET", "PUT", "POST", "DELETE", "PATCH"} - allowed):
        for headers, body in _BODIES:
            r = httpx.request(method, url, headers=headers, content=body, timeout=20)
            assert r.status_code == 405, (method, path, headers, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json", (method, path)
            assert allowed <= {m.strip() for m in r.headers["allow"].split(",")}, (method, path)
