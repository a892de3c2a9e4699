"""Problem codes: the stable names of everything that can go wrong, with their HTTP status.

On the wire every error is an RFC 9457 ``application/problem+json`` document whose
``code`` is one of :class:`ProblemCode`; the client maps codes to exception classes.
Core knows no HTTP: the server's ``ApiError`` carries a code (and any headers) to the wire.
"""

from __future__ import annotations

from enum import StrEnum

from .models import FieldError


class ProblemCode(StrEnum):
    bad_request = "bad_request"
    invalid_path = "invalid_path"
    validation_error = "validation_error"
    unknown_backend = "unknown_backend"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    conflict = "conflict"
    job_files_invalid = "job_files_invalid"
    precondition_failed = "precondition_failed"
    range_not_satisfiable = "range_not_satisfiable"
    too_large = "too_large"
    unsupported_media_type = "unsupported_media_type"
    idempotency_mismatch = "idempotency_mismatch"
    idempotency_in_flight = "idempotency_in_flight"
    submit_failed = "submit_failed"
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    backend_unavailable = "backend_unavailable"
    insufficient_storage = "insufficient_storage"
    too_many_streams = "too_many_streams"
    rate_limited = "rate_limited"
    internal_error = "internal_error"

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def problem_title(self) -> str:
        return _TITLE[self]


_STATUS: dict[ProblemCode, int] = {
    ProblemCode.bad_request: 400,
    ProblemCode.invalid_path: 400,
    ProblemCode.validation_error: 422,
    ProblemCode.unknown_backend: 422,
    ProblemCode.not_found: 404,
    ProblemCode.method_not_allowed: 405,
    ProblemCode.conflict: 409,
    ProblemCode.job_files_invalid: 409,
    ProblemCode.precondition_failed: 412,
    ProblemCode.range_not_satisfiable: 416,
    ProblemCode.too_large: 413,
    ProblemCode.unsupported_media_type: 415,
    ProblemCode.idempotency_mismatch: 422,
    ProblemCode.idempotency_in_flight: 409,
    ProblemCode.submit_failed: 502,
    ProblemCode.unauthorized: 401,
    ProblemCode.forbidden: 403,
    ProblemCode.backend_unavailable: 503,
    ProblemCode.insufficient_storage: 507,
    ProblemCode.too_many_streams: 503,
    ProblemCode.rate_limited: 429,
    ProblemCode.internal_error: 500,
}

_TITLE: dict[ProblemCode, str] = {
    ProblemCode.bad_request: "Bad request",
    ProblemCode.invalid_path: "Invalid file path",
    ProblemCode.validation_error: "Invalid request",
    ProblemCode.unknown_backend: "Unknown backend",
    ProblemCode.not_found: "Not found",
    ProblemCode.method_not_allowed: "Method not allowed",
    ProblemCode.conflict: "Conflict with the job's state",
    ProblemCode.job_files_invalid: "The job's own files are not as the server wrote them",
    ProblemCode.precondition_failed: "Precondition failed",
    ProblemCode.range_not_satisfiable: "Range not satisfiable",
    ProblemCode.too_large: "Request too large",
    ProblemCode.unsupported_media_type: "Unsupported body type",
    ProblemCode.idempotency_mismatch: "Idempotency-Key reused with another request",
    ProblemCode.idempotency_in_flight: "A request with this Idempotency-Key is in progress",
    ProblemCode.submit_failed: "The backend did not accept the job",
    ProblemCode.unauthorized: "Not authenticated",
    ProblemCode.forbidden: "Not allowed",
    ProblemCode.backend_unavailable: "Backend unavailable",
    ProblemCode.insufficient_storage: "The server's disk is full",
    ProblemCode.too_many_streams: "Too many event streams are open",
    ProblemCode.rate_limited: "Too many requests",
    ProblemCode.internal_error: "Internal server error",
}


def field_error(loc: str | list[str | int], msg: str, type: str = "value_error") -> FieldError:
    """A one-field reason, e.g. ``field_error(["query", "limit"], "must be 1..1000")``."""
    return FieldError(loc=[loc] if isinstance(loc, str) else loc, msg=msg, type=type)
