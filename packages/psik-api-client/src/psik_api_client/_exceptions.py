"""Every error the client raises, and the one place HTTP errors are mapped to them.

::

    PsikApiError
     ├── APIConnectionError            the server could not be reached, or the link broke
     │    └── APITimeoutError          ... because a timeout expired
     ├── APIResponseValidationError    a 2xx answer that is not what the API promises
     ├── APIStatusError                the server answered with an error (problem+json)
     │    ├── BadRequestError              400
     │    ├── AuthenticationError          401
     │    ├── PermissionDeniedError        403
     │    ├── NotFoundError                404
     │    ├── ConflictError                409
     │    │    └── IdempotencyInFlightError    code idempotency_in_flight
     │    ├── ValidationError              422
     │    │    ├── UnknownBackendError         code unknown_backend
     │    │    └── IdempotencyMismatchError    code idempotency_mismatch
     │    ├── RateLimitError               429
     │    ├── SubmitFailedError            502 code submit_failed (the job exists, failed)
     │    └── InternalServerError          other 5xx
     └── WaitTimeout                   wait() gave up; also a TimeoutError

An :class:`APIStatusError` is chosen by the problem's ``code`` first (it is stable and
more precise), then by HTTP status, so a non-JSON error from a proxy still maps sensibly.
Its message is the problem's ``detail``: a sentence a user can act on.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import pydantic

from psik_api_core import JobStatus, Problem


class PsikApiError(Exception):
    """Base class of every error raised by psik_api_client."""


class APIConnectionError(PsikApiError):
    """The request did not get an answer: connection refused, reset, DNS, ...

    ``request`` is the request that failed.
    """

    def __init__(self, message: str, *, request: httpx.Request) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (connecting, writing or reading)."""


class APIResponseValidationError(PsikApiError):
    """A successful response whose body does not match the API's models."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response


class APIStatusError(PsikApiError):
    """The server answered with a 4xx or 5xx status.

    ``status_code`` is the HTTP status, ``problem`` the parsed problem+json document
    (None if the body was not one) and ``response`` the raw response.
    """

    def __init__(self, message: str, *, response: httpx.Response, problem: Problem | None) -> None:
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


class AuthenticationError(APIStatusError):
    """401: the server does not know who is calling."""


class PermissionDeniedError(APIStatusError):
    """403: the caller may not do this."""


class NotFoundError(APIStatusError):
    """404: no such job, backend or route (a malformed job id names no job)."""


class ConflictError(APIStatusError):
    """409: the job's state forbids the action (e.g. starting an active job).

    ``jobid`` and ``state`` are taken from the problem when the server sent them.
    """

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


class ValidationError(APIStatusError):
    """422: the request is well-formed but invalid; ``problem.errors`` says where."""


class UnknownBackendError(ValidationError):
    """422: the job spec names a backend the server does not have."""


class IdempotencyMismatchError(ValidationError):
    """422: the Idempotency-Key was already used with a different request body."""


class RateLimitError(APIStatusError):
    """429: too many requests."""


class SubmitFailedError(APIStatusError):
    """502: the backend refused the job. The job exists (state ``failed``): see ``jobid``."""

    @property
    def jobid(self) -> str | None:
        """The id of the job that was created but could not be submitted."""
        return self._extension("jobid")


class InternalServerError(APIStatusError):
    """5xx: the server (or a proxy in front of it) failed."""


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


_BY_CODE: dict[str, type[APIStatusError]] = {
    "bad_request": BadRequestError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "idempotency_in_flight": IdempotencyInFlightError,
    "validation_error": ValidationError,
    "unknown_backend": UnknownBackendError,
    "idempotency_mismatch": IdempotencyMismatchError,
    "submit_failed": SubmitFailedError,
    "backend_unavailable": InternalServerError,
    "internal_error": InternalServerError,
}

_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitError,
}


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
    cls = _BY_CODE.get(problem.code) if problem else None
    if cls is None:
        cls = _BY_STATUS.get(status)
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


def error_from_transport(exc: httpx.TransportError, request: httpx.Request, where: str) -> APIConnectionError:
    """The exception for a request that got no response; ``where`` names the server."""
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__
        return APITimeoutError(
            f"{request.method} {request.url.path} to {where} timed out ({kind})",
            request=request,
        )
    return APIConnectionError(f"cannot reach {where}: {str(exc) or type(exc).__name__}", request=request)
