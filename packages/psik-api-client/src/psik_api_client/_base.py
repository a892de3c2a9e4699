"""Everything the sync and async clients share: all of it does no I/O.

Each API operation is written once, as a *flow*: a generator that yields *steps*, the
I/O it wants done, is sent back each step's answer, and finally returns its result.
``Client`` does the steps with blocking calls, ``AsyncClient`` with awaits; that loop
(``_run``, with ``_perform`` doing one step) is the only thing they do differently.
Retries, error mapping, pagination, waiting and streaming are therefore written, and
tested, once.

The steps, and what the driver answers::

    httpx.Request      sent; the response, its body read (or the httpx.TransportError)
    Sleep(seconds)     waited; None
    Stream(request)    sent; the response as soon as its headers are in, body unread
                       (or the httpx.TransportError)
    ReadChunk(resp)    the next chunk of a streamed body as it arrives, None at its end
                       (or the httpx.TransportError)
    Read(resp)         the rest of a streamed body, whole; ``resp.content`` then works
                       (or the httpx.TransportError)
    Close(resp)        the streamed response closed early; None
    Emit(value)        ``value`` handed to whoever iterates the flow; None once they
                       ask for the next one
    OpenFile(path, mode)
                       the local file opened in binary ``mode``; the driver closes it
                       when the flow ends, if the flow did not
    Disk(fn, args)     ``fn(*args)`` called where it cannot block an event loop (a worker
                       thread in the async client); its result. Its exception (an
                       ``OSError``, say) is not an answer: it ends the flow and reaches
                       the caller, as ``open()``'s would.

Transport errors are answers, not exceptions, so that the flow decides (retry, or map
to :class:`APIConnectionError`). Local files are only touched through ``OpenFile`` and
``Disk``, so that a download to a slow disk never stalls the async client's loop.
A flow run for its result (``_drive``: downloads too) must not emit; a flow run as an
iterator (``_iter_flow``/``_aiter_flow``: lists, log follow) returns nothing and emits
what the caller iterates. The driver
closes every response it streamed when the flow ends, however it ends: returning,
raising, or closed early because the caller stopped iterating.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import ssl
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from psik_api_core import (
    LIMITS,
    BackendInfo,
    Job,
    JobSpec,
    JobStatus,
    JobSummary,
    Page,
)

from ._exceptions import (
    APIResponseValidationError,
    InvalidRequestError,
    error_from_response,
    error_from_transport,
)
from ._inputs import AfterArg, checked_headers, idempotency_key, path_jobid, spec_body, with_extras
from ._local_secret import LocalSecretAuth
from ._pagination import Pager, Params
from ._retry import RetryPolicy
from ._tls import Presented, resolve_cert_dir, tls_identity
from ._tokens import lifetime_seconds, resolve_token
from ._types import DEFAULT_OPTIONS, RequestOptions, TimeoutArg
from ._version import __version__

T = TypeVar("T")
E = TypeVar("E")

DEFAULT_URL = "http://127.0.0.1:8000"
#: Over a UNIX socket the host is only what the Host header says.
UDS_URL = "http://localhost"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
#: httpx's own default pool. The async client also lets at most ``max_connections``
#: requests be in flight at once (see ``AsyncClient``).
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class Sleep(NamedTuple):
    """Step: resume the flow after ``seconds``."""

    seconds: float


class Stream(NamedTuple):
    """Step: send ``request`` and answer with the response once its headers are in,
    leaving the body to be read with :class:`ReadChunk` or :class:`Read`."""

    request: httpx.Request


class ReadChunk(NamedTuple):
    """Step: the next chunk of a streamed ``response``'s body, None at its end."""

    response: httpx.Response


class Read(NamedTuple):
    """Step: the rest of a streamed ``response``'s body, whole (it is then closed)."""

    response: httpx.Response


class Close(NamedTuple):
    """Step: close a streamed ``response`` the flow is done with."""

    response: httpx.Response


class Emit(NamedTuple, Generic[E]):
    """Step: hand ``value`` to the caller iterating the flow."""

    value: E


class OpenFile(NamedTuple):
    """Step: open the local file ``path`` in binary ``mode`` (``"rb"``, ``"ab"``,
    ``"wb"``...); the driver closes it when the flow ends, if the flow did not."""

    path: str
    mode: str


class Disk(NamedTuple):
    """Step: call ``fn(*args)`` (file-system work) off the event loop; answer its result."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


#: What a flow yields, and what its driver sends back.
Step = httpx.Request | Sleep | Stream | ReadChunk | Read | Close | OpenFile | Disk
#: A Response, a TransportError, bytes, None, a file, or a Disk call's result.
Outcome = object
#: A flow run for its result, of type T.
Flow = Generator[Step, Outcome, T]
#: A flow run as an iterator of the values of type E it emits.
EmitFlow = Generator[Step | Emit[E], Outcome, None]

_JOB = pydantic.TypeAdapter(Job)
_STATUS = pydantic.TypeAdapter(JobStatus)
_PAGE = pydantic.TypeAdapter(Page[JobSummary])
#: ``GET /v1/jobs?view=full``: whole jobs, but a summary where a directory is unreadable.
_FULL_PAGE = pydantic.TypeAdapter(Page[Job | JobSummary])
_BACKEND = pydantic.TypeAdapter(BackendInfo)
_BACKENDS = pydantic.TypeAdapter(list[BackendInfo])
_HEALTH = pydantic.TypeAdapter(dict[str, Any])


class _Minted(pydantic.BaseModel):
    """The answer to ``GET /v1/token`` (only the token is needed; others are ignored)."""

    token: str


class _TokenKey(pydantic.BaseModel):
    """The answer to ``GET /v1/token/key``."""

    public_key: str


_MINTED = pydantic.TypeAdapter(_Minted)
_TOKEN_KEY = pydantic.TypeAdapter(_TokenKey)


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
        return Target(_checked_url(base_url or UDS_URL), os.path.expanduser(os.fspath(uds)))
    return Target(_checked_url(base_url or environ.get("PSIK_API_URL") or DEFAULT_URL))


def _checked_url(url: str) -> str:
    """``url``, checked to be an http(s) URL with a host, so that a typo fails here
    rather than as a connection error later."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"the server's URL is http:// or https:// with a host, not {url!r}")
    return url


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


def wants_events(events: bool | None, *, network_transport: bool) -> bool:
    """Whether ``wait``/``wait_all`` listen to the event stream: as ``events`` says, or
    (None) only over httpx's own network transports. An in-process transport
    (``httpx.ASGITransport``) holds a response until it ends, so a stream would never
    arrive through it; a user's own transport may do the same."""
    if events is not None and not isinstance(events, bool):
        raise TypeError(f"events= is True, False or None (automatic), not {events!r}")
    return network_transport if events is None else events


class BaseClient:
    """Configuration, request building and the flows of every operation."""

    def __init__(
        self,
        base_url: str | None,
        *,
        uds: str | os.PathLike[str] | None,
        has_transport: bool,
        headers: Mapping[str, str] | None,
        timeout: TimeoutArg,
        max_retries: int,
        rng: Callable[[], float] | None,
        clock: Callable[[], float] | None,
        token: str | None = None,
        cert_dir: str | os.PathLike[str] | None = None,
        limits: httpx.Limits = DEFAULT_LIMITS,
        events: bool | None = None,
        network_transport: bool = True,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not isinstance(limits, httpx.Limits):
            raise TypeError(f"limits= is an httpx.Limits, not {limits!r}")
        # Both bodies hand these to their httpx pool; the async body also bounds the
        # requests in flight by max_connections (None: no bound).
        self._limits = limits
        self._target = resolve_target(base_url, uds, has_transport=has_transport)
        self._prefix = self._target.base_url.rstrip("/")
        self._headers = httpx.Headers(
            {"Accept": "application/json", "User-Agent": f"psik-api-client/{__version__}"}
        )
        self._headers.update(checked_headers(headers, argument="headers="))
        # The bearer goes with the client's headers: a call's extra_headers may replace it.
        bearer = resolve_token(token, self._target.base_url, uds=self._target.uds)
        if bearer is not None:
            self._headers["Authorization"] = f"Bearer {bearer}"
        # mTLS: the identity's certificate and the CAs of its known servers; both bodies
        # hand this to their httpx client or transport as ``verify``.
        identity = resolve_cert_dir(cert_dir, self._target.base_url, has_transport=has_transport)
        host = httpx.URL(self._target.base_url).host or None
        self._verify: ssl.SSLContext | bool = True
        self._presented: Presented | None = None  # named if the server refuses it
        if identity is not None:
            self._verify, self._presented = tls_identity(identity, host)
        # Every request carries its timeout (see _build_request): this one unless the
        # call gives its own.
        self._timeout = httpx.Timeout(timeout)
        self._retry = RetryPolicy(max_retries=max_retries, rng=rng or random.random)
        # The clock ``wait`` measures its timeout with.
        self._clock = clock or time.monotonic
        # Whether wait and wait_all listen to GET /v1/events (see _wait) before polling.
        self._events = wants_events(events, network_transport=network_transport)
        # Both bodies hand this to their httpx client: the local secret, sent to a
        # loopback server that cannot tell our uid (never over a UNIX socket).
        self._auth = LocalSecretAuth() if self._target.uds is None else None

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
        content: bytes | None = None,
        stream: httpx.SyncByteStream | httpx.AsyncByteStream | None = None,
        headers: Mapping[str, str] | None = None,
        options: RequestOptions = DEFAULT_OPTIONS,
    ) -> httpx.Request:
        """The request for ``method path`` (path from the API root, e.g. ``/v1/jobs``),
        its body ``json``, raw ``content``, or a ``stream`` that both clients can send
        (the operation sets its Content-Length or Transfer-Encoding).

        Headers are the client's, then the operation's, then the call's
        ``extra_headers`` (each replacing the one before, whatever its case). The
        timeout travels in the request's extensions, as httpx's own clients put it.
        """
        merged = httpx.Headers(self._headers)
        merged.update(headers or {})
        merged.update(options.extra_headers or {})
        url = httpx.URL(self._prefix + path)
        if stream is not None:  # httpx adds no header to a request built from a stream
            merged.setdefault("Host", url.netloc.decode("ascii"))
        return httpx.Request(
            method,
            url,
            params=tuple(params or ()),
            json=json,
            content=content,
            stream=stream,
            headers=merged,
            extensions={"timeout": options.timeout_for(self._timeout).as_dict()},
        )

    # ---- the flows every operation is made of ----

    def _send_flow(
        self, request: httpx.Request, *, stream: bool = False, retry: bool = True
    ) -> Flow[httpx.Response]:
        """Send ``request``, retrying as the policy allows; return a 2xx response or
        raise the mapped error. With ``stream``, the response is returned with its body
        unread (an error response's body is read: it decides retries and the message).
        ``retry=False`` sends it once (a body that cannot be sent twice)."""
        attempt = 0
        while True:
            outcome = yield Stream(request) if stream else request
            if not isinstance(outcome, httpx.Response | httpx.TransportError):
                raise RuntimeError(f"a flow driver answered a request with {outcome!r}")
            if stream and isinstance(outcome, httpx.Response) and not outcome.is_success:
                body = yield Read(outcome)
                if isinstance(body, httpx.TransportError):
                    outcome = body
            delay = self._retry.delay(request, outcome, attempt) if retry else None
            if delay is None:
                break
            attempt += 1
            yield Sleep(delay)
        if isinstance(outcome, httpx.TransportError):
            raise error_from_transport(outcome, request, self._where(), self._presented) from outcome
        if not outcome.is_success:
            raise error_from_response(outcome)
        return outcome

    def _read_chunk_flow(self, response: httpx.Response) -> Flow[bytes | None]:
        """The next chunk of a streamed response's body, None at its end; a broken
        connection raises :class:`APIConnectionError`."""
        outcome = yield ReadChunk(response)
        if isinstance(outcome, httpx.TransportError):
            raise error_from_transport(outcome, response.request, self._where(), self._presented) from outcome
        if outcome is not None and not isinstance(outcome, bytes):
            raise RuntimeError(f"a flow driver answered a chunk read with {outcome!r}")
        return outcome

    def _read_flow(self, response: httpx.Response) -> Flow[bytes]:
        """The rest of a streamed response's body (``response.content`` then works); a
        broken connection raises :class:`APIConnectionError`."""
        outcome = yield Read(response)
        if isinstance(outcome, httpx.TransportError):
            raise error_from_transport(outcome, response.request, self._where(), self._presented) from outcome
        if not isinstance(outcome, bytes):
            raise RuntimeError(f"a flow driver answered a body read with {outcome!r}")
        return outcome

    def _fetch_flow(self, into: pydantic.TypeAdapter[T], request: httpx.Request) -> Flow[T]:
        """Send ``request`` and parse its answer as ``into``'s type."""
        response = yield from self._send_flow(request)
        return parse(response, into)

    # ---- one flow per operation (the clients' public methods drive these) ----

    def _submit_flow(
        self,
        spec: JobSpec | Mapping[str, Any],
        key: str | None,
        *,
        start: bool,
        after: AfterArg = None,
        labels: Mapping[str, str] | None = None,
        options: RequestOptions = DEFAULT_OPTIONS,
    ) -> Flow[Job]:
        """POST the spec (with ``after`` and ``labels`` merged in) to ``/v1/jobs``
        (create and submit) or ``/v1/jobs/new``."""
        body = spec_body(with_extras(spec, after=after, labels=labels))
        headers = {"Idempotency-Key": idempotency_key(key)}
        path = "/v1/jobs" if start else "/v1/jobs/new"
        request = self._build_request("POST", path, json=body, headers=headers, options=options)
        if len(request.content) > LIMITS.max_body_bytes:
            raise InvalidRequestError(
                f"the job spec is {len(request.content)} bytes as JSON; the server accepts "
                f"at most {LIMITS.max_body_bytes} (put a long script in a file the job runs)"
            )
        return self._fetch_flow(_JOB, request)

    def _start_flow(self, jobid: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[Job]:
        """POST ``/v1/jobs/{id}/start``."""
        path = f"/v1/jobs/{path_jobid(jobid)}/start"
        return self._fetch_flow(_JOB, self._build_request("POST", path, options=options))

    def _get_flow(self, jobid: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[Job]:
        """GET ``/v1/jobs/{id}``."""
        path = f"/v1/jobs/{path_jobid(jobid)}"
        return self._fetch_flow(_JOB, self._build_request("GET", path, options=options))

    def _state_flow(self, jobid: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[JobStatus]:
        """GET ``/v1/jobs/{id}/state``."""
        path = f"/v1/jobs/{path_jobid(jobid)}/state"
        return self._fetch_flow(_STATUS, self._build_request("GET", path, options=options))

    def _page_flow(self, params: Params, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[Page[JobSummary]]:
        """GET ``/v1/jobs`` with ``params``: one page."""
        request = self._build_request("GET", "/v1/jobs", params=params, options=options)
        return self._fetch_flow(_PAGE, request)

    def _full_page_flow(
        self, params: Params, options: RequestOptions = DEFAULT_OPTIONS
    ) -> Flow[Page[Job | JobSummary]]:
        """GET ``/v1/jobs?view=full`` with ``params``: one page of whole jobs (a job
        whose directory cannot be read stays a summary)."""
        request = self._build_request("GET", "/v1/jobs", params=[*params, ("view", "full")], options=options)
        return self._fetch_flow(_FULL_PAGE, request)

    def _list_flow(self, pager: Pager, options: RequestOptions = DEFAULT_OPTIONS) -> EmitFlow[JobSummary]:
        """Every job of a list, page after page as the caller iterates."""
        while (params := pager.next_params()) is not None:
            page = yield from self._page_flow(params, options)
            for item in pager.take(page):
                yield Emit(item)

    def _cancel_flow(self, jobid: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[Job]:
        """DELETE ``/v1/jobs/{id}``."""
        path = f"/v1/jobs/{path_jobid(jobid)}"
        return self._fetch_flow(_JOB, self._build_request("DELETE", path, options=options))

    def _purge_flow(self, jobid: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[None]:
        """DELETE ``/v1/jobs/{id}?purge=true`` (answered by 204, no body)."""
        path = f"/v1/jobs/{path_jobid(jobid)}"
        request = self._build_request("DELETE", path, params=[("purge", "true")], options=options)
        yield from self._send_flow(request)

    def _backends_flow(self, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[list[BackendInfo]]:
        """GET ``/v1/backends``."""
        return self._fetch_flow(_BACKENDS, self._build_request("GET", "/v1/backends", options=options))

    def _backend_flow(self, name: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[BackendInfo]:
        """GET ``/v1/backends/{name}``."""
        # Even quoted, a "/" reaches the server's router as a path separator, and "."
        # or ".." as a path step: no such name can be asked for (it is in backends()).
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name:
            raise InvalidRequestError(
                f"not a backend name: {name!r} (GET /v1/backends/NAME takes no '/', '.' or '..')"
            )
        path = f"/v1/backends/{quote(name, safe='')}"
        return self._fetch_flow(_BACKEND, self._build_request("GET", path, options=options))

    def _token_flow(
        self, expires: float | dt.timedelta | None, options: RequestOptions = DEFAULT_OPTIONS
    ) -> Flow[str]:
        """GET ``/v1/token[?expires=S]``: a token minted for the caller."""
        params = [] if expires is None else [("expires", str(lifetime_seconds(expires)))]
        request = self._build_request("GET", "/v1/token", params=params, options=options)
        minted = yield from self._fetch_flow(_MINTED, request)
        return minted.token

    def _token_key_flow(self, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[str]:
        """GET ``/v1/token/key``: the server's public key."""
        request = self._build_request("GET", "/v1/token/key", options=options)
        answer = yield from self._fetch_flow(_TOKEN_KEY, request)
        return answer.public_key

    def _health_flow(self, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[dict[str, Any]]:
        """GET ``/healthz``."""
        return self._fetch_flow(_HEALTH, self._build_request("GET", "/healthz", options=options))
