"""Everything the sync and async clients share: all of it does no I/O.

Each API operation is written once, as a *flow*: a generator that yields the
:class:`httpx.Request` it wants sent (and gets back the response, or the transport
error) or a :class:`Sleep` it wants waited (and gets back None), and finally returns
the result. ``Client`` drives flows with blocking calls, ``AsyncClient`` with awaits;
that loop is the only thing they do differently. Retries, error mapping, pagination
and waiting are therefore written, and tested, once.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from psik_api_core import (
    LIMITS,
    STRICT_INPUT,
    BackendInfo,
    Job,
    JobSpec,
    JobStatus,
    JobSummary,
    Page,
    is_jobid,
)

from ._exceptions import (
    APIResponseValidationError,
    InvalidRequestError,
    error_from_response,
    error_from_transport,
)
from ._pagination import Params
from ._retry import RetryPolicy
from ._version import __version__

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
#: Over a UNIX socket the host is only what the Host header says.
UDS_URL = "http://localhost"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2


class Sleep(NamedTuple):
    """A flow's request to be resumed after ``seconds``."""

    seconds: float


#: What a flow yields, and what its driver sends back.
Step = httpx.Request | Sleep
Outcome = httpx.Response | httpx.TransportError | None
Flow = Generator[Step, Outcome, T]

_JOB = pydantic.TypeAdapter(Job)
_STATUS = pydantic.TypeAdapter(JobStatus)
_PAGE = pydantic.TypeAdapter(Page[JobSummary])
_BACKEND = pydantic.TypeAdapter(BackendInfo)
_BACKENDS = pydantic.TypeAdapter(list[BackendInfo])
_HEALTH = pydantic.TypeAdapter(dict[str, Any])


@dataclass(frozen=True)
class Target:
    """Where the server is: its base URL, and the UNIX socket to reach it by, if any."""

    base_url: str
    uds: str | None = None


def resolve_target(
    base_url: str | None = None,
    uds: str | os.PathLike[str] | None = None,
    *,
    has_transport: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> Target:
    """Pick the server from the arguments, else ``PSIK_API_UDS``, else ``PSIK_API_URL``,
    else the default local server. Explicit arguments beat the environment: an
    explicit ``base_url`` or ``transport`` means the socket in the environment is not
    meant."""
    if uds is not None and has_transport:
        raise ValueError("pass either uds= or transport=, not both")
    if uds is None and base_url is None and not has_transport:
        uds = environ.get("PSIK_API_UDS") or None
    if uds is not None:
        return Target(base_url or UDS_URL, os.path.expanduser(os.fspath(uds)))
    return Target(base_url or environ.get("PSIK_API_URL") or DEFAULT_URL)


def path_jobid(jobid: str) -> str:
    """``jobid``, checked to be a job id before it goes into a URL path."""
    if not isinstance(jobid, str) or not is_jobid(jobid):
        raise InvalidRequestError(
            f"not a job id: {jobid!r} (a job id is digits with an optional fraction, e.g. 1693992878.203)"
        )
    return jobid


def validate_spec(data: Mapping[str, Any]) -> JobSpec:
    """``data`` as a job spec, validated as strictly as the server will (unknown fields
    are errors). Raises :class:`InvalidRequestError` naming every field at fault, with
    pydantic's details in ``.errors``."""
    try:
        return JobSpec.model_validate(dict(data), context=STRICT_INPUT)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequestError(f"invalid job spec: {problems}", errors=exc.errors()) from exc


def spec_body(spec: JobSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body for a job spec. A mapping is validated first (see
    :func:`validate_spec`), so mistakes fail here, before anything is sent. Only the
    fields that were set are sent: the server fills the defaults."""
    if not isinstance(spec, JobSpec):
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(f"a job spec is a JobSpec or a mapping, not {type(spec).__name__}")
        spec = validate_spec(spec)
    body = spec.model_dump(mode="json", exclude_unset=True)
    if spec.cb_secret is not None:
        # model_dump masks secrets; the server needs the real one to sign callbacks.
        body["cb_secret"] = spec.cb_secret.get_secret_value()
    return body


def idempotency_key(key: str | None) -> str:
    """``key``, or a fresh random one: every submission carries a key, so that
    retrying it after a lost response cannot create a second job."""
    if key is None:
        return str(uuid.uuid4())
    longest = LIMITS.max_idempotency_key
    if not (isinstance(key, str) and 0 < len(key) <= longest and key.isascii() and key.isprintable()):
        raise InvalidRequestError(f"an Idempotency-Key is 1 to {longest} printable ASCII characters")
    return key


def parse(response: httpx.Response, into: pydantic.TypeAdapter[T]) -> T:
    """The response body as ``into``'s type; unknown fields are ignored."""
    try:
        return into.validate_json(response.content)
    except pydantic.ValidationError as exc:
        request = response.request
        raise APIResponseValidationError(
            f"unexpected answer to {request.method} {request.url.path} "
            f"(HTTP {response.status_code}): {exc.error_count()} validation error(s), "
            f"first: {exc.errors()[0]['msg']}",
            response=response,
        ) from exc


class BaseClient:
    """Configuration, request building and the flows of every operation."""

    def __init__(
        self,
        base_url: str | None,
        *,
        uds: str | os.PathLike[str] | None,
        has_transport: bool,
        headers: Mapping[str, str] | None,
        max_retries: int,
        rng: Callable[[], float] | None,
        clock: Callable[[], float] | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self._target = resolve_target(base_url, uds, has_transport=has_transport)
        self._prefix = self._target.base_url.rstrip("/")
        self._headers = {
            "Accept": "application/json",
            "User-Agent": f"psik-api-client/{__version__}",
            **(headers or {}),
        }
        self._retry = RetryPolicy(max_retries=max_retries, rng=rng or random.random)
        # The clock ``wait`` measures its timeout with.
        self._clock = clock or time.monotonic

    @property
    def base_url(self) -> str:
        """The server's base URL (``http://localhost`` over a UNIX socket)."""
        return self._target.base_url

    @property
    def uds(self) -> str | None:
        """The UNIX socket the client connects through, if any."""
        return self._target.uds

    def _where(self) -> str:
        return f"unix socket {self._target.uds}" if self._target.uds else self._prefix

    def _build_request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        """The request for ``method path`` (path from the API root, e.g. ``/v1/jobs``)."""
        return httpx.Request(
            method,
            self._prefix + path,
            params=tuple(params or ()),
            json=json,
            headers={**self._headers, **(headers or {})},
        )

    # ---- the flows every operation is made of ----

    def _send_flow(self, request: httpx.Request) -> Flow[httpx.Response]:
        """Send ``request``, retrying as the policy allows; return a 2xx response or
        raise the mapped error."""
        attempt = 0
        while True:
            outcome = yield request
            if outcome is None:
                raise RuntimeError("a flow driver must answer a request with its outcome")
            delay = self._retry.delay(request, outcome, attempt)
            if delay is None:
                break
            attempt += 1
            yield Sleep(delay)
        if isinstance(outcome, httpx.TransportError):
            raise error_from_transport(outcome, request, self._where()) from outcome
        if not outcome.is_success:
            raise error_from_response(outcome)
        return outcome

    def _fetch_flow(
        self,
        into: pydantic.TypeAdapter[T],
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Flow[T]:
        """Send a request and parse its answer as ``into``'s type."""
        request = self._build_request(method, path, params=params, json=json, headers=headers)
        response = yield from self._send_flow(request)
        return parse(response, into)

    # ---- one flow per operation (the clients' public methods drive these) ----

    def _submit_flow(self, spec: JobSpec | Mapping[str, Any], key: str | None, *, start: bool) -> Flow[Job]:
        """POST the spec to ``/v1/jobs`` (create and submit) or ``/v1/jobs/new``."""
        body = spec_body(spec)
        headers = {"Idempotency-Key": idempotency_key(key)}
        path = "/v1/jobs" if start else "/v1/jobs/new"
        return self._fetch_flow(_JOB, "POST", path, json=body, headers=headers)

    def _start_flow(self, jobid: str) -> Flow[Job]:
        """POST ``/v1/jobs/{id}/start``."""
        return self._fetch_flow(_JOB, "POST", f"/v1/jobs/{path_jobid(jobid)}/start")

    def _get_flow(self, jobid: str) -> Flow[Job]:
        """GET ``/v1/jobs/{id}``."""
        return self._fetch_flow(_JOB, "GET", f"/v1/jobs/{path_jobid(jobid)}")

    def _state_flow(self, jobid: str) -> Flow[JobStatus]:
        """GET ``/v1/jobs/{id}/state``."""
        return self._fetch_flow(_STATUS, "GET", f"/v1/jobs/{path_jobid(jobid)}/state")

    def _page_flow(self, params: Params) -> Flow[Page[JobSummary]]:
        """GET ``/v1/jobs`` with ``params``: one page."""
        return self._fetch_flow(_PAGE, "GET", "/v1/jobs", params=params)

    def _cancel_flow(self, jobid: str) -> Flow[Job]:
        """DELETE ``/v1/jobs/{id}``."""
        return self._fetch_flow(_JOB, "DELETE", f"/v1/jobs/{path_jobid(jobid)}")

    def _purge_flow(self, jobid: str) -> Flow[None]:
        """DELETE ``/v1/jobs/{id}?purge=true`` (answered by 204, no body)."""
        path = f"/v1/jobs/{path_jobid(jobid)}"
        request = self._build_request("DELETE", path, params=[("purge", "true")])
        yield from self._send_flow(request)

    def _backends_flow(self) -> Flow[list[BackendInfo]]:
        """GET ``/v1/backends``."""
        return self._fetch_flow(_BACKENDS, "GET", "/v1/backends")

    def _backend_flow(self, name: str) -> Flow[BackendInfo]:
        """GET ``/v1/backends/{name}``."""
        if not isinstance(name, str) or name in ("", ".", ".."):
            raise InvalidRequestError(f"not a backend name: {name!r}")
        return self._fetch_flow(_BACKEND, "GET", f"/v1/backends/{quote(name, safe='')}")

    def _health_flow(self) -> Flow[dict[str, Any]]:
        """GET ``/healthz``."""
        return self._fetch_flow(_HEALTH, "GET", "/healthz")
