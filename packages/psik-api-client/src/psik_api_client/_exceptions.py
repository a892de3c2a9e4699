"""Every error the client raises, and the one place HTTP errors are mapped to them.

::

    PsikApiError
     ├── APIConnectionError            the server could not be reached, or the link broke
     │    ├── APITimeoutError          ... because a timeout expired
     │    └── CertificateRefusedError  ... because the TLS server refused our certificate
     ├── APIResponseValidationError    a 2xx answer that is not what the API promises
     ├── APIStatusError                the server answered with an error (problem+json)
     │    ├── BadRequestError              400 bad_request
     │    │    └── InvalidPathError            400 invalid_path
     │    ├── AuthenticationError          401 unauthorized
     │    ├── PermissionDeniedError        403 forbidden
     │    ├── NotFoundError                404 not_found
     │    ├── MethodNotAllowedError        405 method_not_allowed
     │    ├── ConflictError                409 conflict
     │    │    └── IdempotencyInFlightError    409 idempotency_in_flight
     │    ├── PreconditionFailedError      412 precondition_failed
     │    ├── RequestTooLargeError         413 too_large
     │    ├── UnsupportedMediaTypeError    415 unsupported_media_type
     │    ├── RangeNotSatisfiableError     416 range_not_satisfiable
     │    ├── UnprocessableEntityError     422 validation_error
     │    │    ├── UnknownBackendError         422 unknown_backend
     │    │    └── IdempotencyMismatchError    422 idempotency_mismatch
     │    ├── RateLimitError               429 rate_limited (retried as Retry-After says)
     │    ├── InternalServerError          500 internal_error, and any other 5xx
     │    ├── SubmitFailedError            502 submit_failed (the job exists, failed)
     │    ├── ServiceUnavailableError      503 backend_unavailable
     │    │    └── TooManyStreamsError         503 too_many_streams (event streams)
     │    └── InsufficientStorageError     507 insufficient_storage (nothing was made)
     ├── ChecksumMismatchError         a download's bytes are not the file the server has
     ├── InvalidRequestError           refused before sending (bad id, spec, key, ...);
     │                                 also a ValueError
     └── WaitTimeout                   wait() gave up; also a TimeoutError

An :class:`APIStatusError` is chosen by the problem's ``code`` first (it is stable and
more precise), then by HTTP status, so a non-JSON error from a proxy still maps sensibly.
Every :class:`~psik_api_core.ProblemCode` has its own class, whose ``status_code`` is
the code's status. The message is the problem's ``detail``: a sentence a user can act on,
then the request's id when the server gave one (``request_id``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pydantic
from pydantic_core import ErrorDetails

from psik_api_core import JobStatus, Problem, ProblemCode

if TYPE_CHECKING:
    from ._tls import Presented


class PsikApiError(Exception):
    """Base class of every error raised by psik_api_client."""


class APIConnectionError(PsikApiError):
    """The request did not get an answer: connection refused, reset, DNS, ...

    ``request`` is the request that failed.
    """

    def __init__(self, message: str, *, request: httpx.Request) -> None:
        super().__init__(message)
        self.request = request


class CertificateRefusedError(APIConnectionError):
    """A TLS server refused the client certificate presented (``cert_dir=``): it closed
    the connection during or right after the handshake, with an alert or without a
    word. ``certificate`` is the file presented; the message names its subject and
    issuer, so that its user can ask the server's admin to trust it."""

    def __init__(self, message: str, *, request: httpx.Request, certificate: Path) -> None:
        super().__init__(message, request=request)
        self.certificate = certificate


class APITimeoutError(APIConnectionError):
    """The request timed out (connecting, writing or reading)."""


class APIResponseValidationError(PsikApiError):
    """A successful response whose body does not match the API's models."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response


class InvalidRequestError(PsikApiError, ValueError):
    """The client refused to send a request because its input is bad: a malformed job
    id, an invalid job spec, a bad ``Idempotency-Key``, page size, id list or backend
    name, a header HTTP cannot carry (a line break in a value, ...). Nothing was sent.
    It is also a ``ValueError``.

    For a job spec given as a mapping, ``errors`` holds pydantic's error details (and
    the ``pydantic.ValidationError`` is the ``__cause__``); it is empty otherwise.
    """

    def __init__(self, message: str, *, errors: Sequence[ErrorDetails] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


class APIStatusError(PsikApiError):
    """The server answered with a 4xx or 5xx status.

    ``status_code`` is the HTTP status, ``problem`` the parsed problem+json document
    (None if the body was not one) and ``response`` the raw response. On a subclass,
    ``status_code`` is also a class attribute: the status that kind of error is sent with.
    ``request_id`` is the id the server logged the request under (the problem's, else the
    response's ``X-Request-ID``; None if neither says): the message ends with it, for a
    user to quote and an admin to find in the server's log.
    """

    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, problem: Problem | None) -> None:
        self.request_id = _request_id(response, problem)
        if self.request_id is not None:
            message = f"{message} (request id {self.request_id})"
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code
        self.problem = problem

    @property
    def code(self) -> str | None:
        """The problem's stable ``code`` (e.g. ``"not_found"``), if there was one."""
        return self.problem.code if self.problem else None

    def _extension(self, name: str) -> str | None:
        extra = self.problem.model_extra if self.problem else None
        value = (extra or {}).get(name)
        return None if value is None else str(value)


class BadRequestError(APIStatusError):
    """400: the request was malformed."""

    status_code = 400


class InvalidPathError(BadRequestError):
    """400: a job file path the server refuses: a ``..`` or ``.`` segment, an absolute
    path, a NUL byte, a backslash, an empty segment; the detail says which."""


class AuthenticationError(APIStatusError):
    """401: the server does not know who is calling."""

    status_code = 401


class PermissionDeniedError(APIStatusError):
    """403: the caller may not do this."""

    status_code = 403


class NotFoundError(APIStatusError):
    """404: no such job, backend or route (a malformed job id names no job)."""

    status_code = 404


class MethodNotAllowedError(APIStatusError):
    """405: the route exists but not with this method (a client older or newer than
    the server); the response's ``Allow`` header lists the methods it has."""

    status_code = 405


class ConflictError(APIStatusError):
    """409: the job's state forbids the action (e.g. starting an active job).

    ``jobid`` and ``state`` are taken from the problem when the server sent them.
    """

    status_code = 409

    @property
    def jobid(self) -> str | None:
        """The job the conflict is about."""
        return self._extension("jobid")

    @property
    def state(self) -> str | None:
        """The job's state when the request was refused."""
        return self._extension("state")


class IdempotencyInFlightError(ConflictError):
    """409: a request with the same Idempotency-Key is still being processed."""


class JobFilesInvalidError(ConflictError):
    """409: the job replaced one of its own bookkeeping files (its ``status.csv`` or
    ``spec.json`` is a FIFO, a directory, a link, or cannot be written), so the server
    cannot read or record its state. The problem's ``file`` names it; the job is
    failed and can be purged."""


class PreconditionFailedError(APIStatusError):
    """412: a condition of the request does not hold, e.g. an upload that must not
    overwrite (``If-None-Match: *``) found the file already there; nothing changed."""

    status_code = 412


class RequestTooLargeError(APIStatusError):
    """413: the request body is larger than the server accepts (a job spec holding a
    very long script, say); the detail states the limit."""

    status_code = 413


class UnsupportedMediaTypeError(APIStatusError):
    """415: the body is not JSON (the server takes ``application/json`` and nothing a
    browser form can send); the client always sends JSON, so this comes from a
    hand-built request."""

    status_code = 415


class RangeNotSatisfiableError(APIStatusError):
    """416: a download's ``Range`` starts past the end of the file (it is shorter than
    a partial download assumed); the response's ``Content-Range`` says its size."""

    status_code = 416


class UnprocessableEntityError(APIStatusError):
    """422: the request is well-formed but invalid; ``problem.errors`` says where."""

    status_code = 422


class UnknownBackendError(UnprocessableEntityError):
    """422: the job spec names a backend the server does not have."""


class IdempotencyMismatchError(UnprocessableEntityError):
    """422: the Idempotency-Key was already used with a different request body."""


class RateLimitError(APIStatusError):
    """429: the caller sent more requests, or submitted more jobs, than the server's
    rate limits allow (``rate_limited``); nothing was done. The client waits as
    ``Retry-After`` says and sends the request again (``max_retries`` times, if the wait
    is at most a minute), so this is raised only once those tries are spent:
    ``retry_after`` is the server's last word on when to come back."""

    status_code = 429

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait (its ``Retry-After``), if it said."""
        from ._retry import parse_retry_after  # _retry imports this module

        return parse_retry_after(self.response.headers.get("Retry-After"))


class InternalServerError(APIStatusError):
    """500, or any 5xx without a more specific class: the server (or a proxy in front
    of it) failed."""

    status_code = 500


class SubmitFailedError(APIStatusError):
    """502: the backend refused the job. The job exists (state ``failed``): see ``jobid``."""

    status_code = 502

    @property
    def jobid(self) -> str | None:
        """The id of the job that was created but could not be submitted."""
        return self._extension("jobid")


class ServiceUnavailableError(APIStatusError):
    """503: the server is up but cannot serve the request now (e.g. the job's backend
    is unavailable); worth trying again later. A submit refused because its backend
    could not be reached still made the job (state ``failed``, the reason in its
    history): ``jobid`` names it, to ``start`` once the backend is back."""

    status_code = 503

    @property
    def jobid(self) -> str | None:
        """The id of the job that was kept, if the request made one."""
        return self._extension("jobid")


class TooManyStreamsError(ServiceUnavailableError):
    """503: the server holds as many event streams (``watch``) as it keeps open; the
    ``Retry-After`` header says when to try again. ``watch`` does so by itself, and
    ``wait`` polls instead."""


class InsufficientStorageError(APIStatusError):
    """507: the server's disk (the job prefix or its index) is full, so it could not
    record the request; nothing was made, and an ``Idempotency-Key`` is free again.
    Reads still work; retry once space has been freed."""

    status_code = 507


class ChecksumMismatchError(PsikApiError):
    """A downloaded file is not what the server said it was: its SHA-256 is not the
    one sent (``X-Checksum-Sha256``), or, when the server sent none (a large file not
    hashed yet), its size is not the one announced. The bytes were damaged or cut on
    the way, or the file changed while it was read. The partial file was removed and
    nothing was written at the destination; downloading again starts afresh.

    ``path`` is the job file's path; ``expected`` and ``actual`` are the server's
    digest and that of what arrived (hex), or the sizes ("N bytes") when no digest was sent.
    """

    def __init__(self, message: str, *, path: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


class WaitTimeout(PsikApiError, TimeoutError):
    """``wait``/``wait_all`` gave up before the job(s) became final.

    The jobs are left alone (never cancelled). ``status`` is the last state seen by
    ``wait``; ``pending`` lists the job ids that were not final yet.
    """

    def __init__(
        self,
        message: str,
        *,
        status: JobStatus | None = None,
        pending: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.pending = list(pending)

    def __str__(self) -> str:
        # TimeoutError is an OSError, whose __str__ would format errno fields.
        return str(self.args[0])


#: The class of each problem code: every member of core's ProblemCode has its own.
BY_CODE: dict[ProblemCode, type[APIStatusError]] = {
    ProblemCode.bad_request: BadRequestError,
    ProblemCode.invalid_path: InvalidPathError,
    ProblemCode.unauthorized: AuthenticationError,
    ProblemCode.forbidden: PermissionDeniedError,
    ProblemCode.not_found: NotFoundError,
    ProblemCode.method_not_allowed: MethodNotAllowedError,
    ProblemCode.conflict: ConflictError,
    ProblemCode.idempotency_in_flight: IdempotencyInFlightError,
    ProblemCode.job_files_invalid: JobFilesInvalidError,
    ProblemCode.precondition_failed: PreconditionFailedError,
    ProblemCode.range_not_satisfiable: RangeNotSatisfiableError,
    ProblemCode.too_large: RequestTooLargeError,
    ProblemCode.unsupported_media_type: UnsupportedMediaTypeError,
    ProblemCode.validation_error: UnprocessableEntityError,
    ProblemCode.unknown_backend: UnknownBackendError,
    ProblemCode.idempotency_mismatch: IdempotencyMismatchError,
    ProblemCode.internal_error: InternalServerError,
    ProblemCode.submit_failed: SubmitFailedError,
    ProblemCode.backend_unavailable: ServiceUnavailableError,
    ProblemCode.insufficient_storage: InsufficientStorageError,
    ProblemCode.too_many_streams: TooManyStreamsError,
    ProblemCode.rate_limited: RateLimitError,
}

#: Without a known code (a proxy's error page, an older server), the status decides.
BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        MethodNotAllowedError,
        ConflictError,
        PreconditionFailedError,
        RangeNotSatisfiableError,
        RequestTooLargeError,
        UnsupportedMediaTypeError,
        UnprocessableEntityError,
        RateLimitError,
        InternalServerError,
        ServiceUnavailableError,
        InsufficientStorageError,
    )
}


#: A request id as the server makes and takes them; anything else (a proxy's header, a
#: damaged body) is not repeated in a message.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _request_id(response: httpx.Response, problem: Problem | None) -> str | None:
    for found in (problem.request_id if problem else None, response.headers.get("x-request-id")):
        if found is not None and _REQUEST_ID.fullmatch(found):
            return found
    return None


def parse_problem(response: httpx.Response) -> Problem | None:
    """The response's problem+json document, or None if the body is not one."""
    try:
        return Problem.model_validate_json(response.content)
    except pydantic.ValidationError:
        return None


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The exception for an error response (not raised here)."""
    status = response.status_code
    problem = parse_problem(response)
    cls = _by_code(problem.code) if problem else None
    if cls is None:
        cls = BY_STATUS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    if problem is not None:
        message = problem.detail or problem.title
    else:
        message = f"HTTP {status} {response.reason_phrase}".rstrip()
        text = " ".join(response.text.split())[:200]
        if text:
            message = f"{message}: {text}"
    return cls(message, response=response, problem=problem)


def _by_code(code: str | None) -> type[APIStatusError] | None:
    if code is None:
        return None
    try:
        return BY_CODE[ProblemCode(code)]
    except (ValueError, KeyError):  # no code, or one this client does not know yet
        return None


#: What a TLS server's refusal of our certificate looks like from here: its alert, when
#: it sends one before closing (OpenSSL's names), else a close before any answer.
_REFUSAL_ALERTS = ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE", "ALERT_ACCESS_DENIED")
_SILENT_CLOSE = "without sending a response"


def error_from_transport(
    exc: httpx.TransportError,
    request: httpx.Request,
    where: str,
    presented: Presented | None = None,
) -> APIConnectionError:
    """The exception for a request that got no response; ``where`` names the server,
    ``presented`` the client certificate of an https request, if one was."""
    text = str(exc)
    # A TLS 1.3 server checks the client certificate after the client's handshake is
    # done: a refusal shows as an alert, or as the first read finding the line closed.
    alert = any(name in text.upper() for name in _REFUSAL_ALERTS)
    closed = isinstance(exc, httpx.RemoteProtocolError) and _SILENT_CLOSE in text
    if presented is not None and request.url.scheme == "https" and (alert or closed):
        return CertificateRefusedError(
            f"{where} refused the client certificate (it closed the connection "
            f"{'with a TLS alert' if alert else 'without answering'}): "
            f"presented {presented.describe()}; ask the server's admin to trust it "
            "(certified add-client, or introduce)",
            request=request,
            certificate=presented.path,
        )
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__
        return APITimeoutError(
            f"{request.method} {request.url.path} to {where} timed out ({kind})",
            request=request,
        )
    return APIConnectionError(f"cannot reach {where}: {str(exc) or type(exc).__name__}", request=request)
