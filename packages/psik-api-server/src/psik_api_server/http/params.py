"""Query and path parameters of the routes: each given once, only the known ones, and a
job id that is one; a bad one is a 422 naming it (``validation_error``)."""

from __future__ import annotations

from starlette.requests import Request

from psik_api_core import ProblemCode, field_error, is_jobid

from ..errors import ApiError


def bad_query(name: str, why: str) -> ApiError:
    return ApiError(
        ProblemCode.validation_error,
        f"query parameter {name!r}: {why}",
        errors=[field_error(["query", name], why)],
    )


def single_params(request: Request, allowed: set[str]) -> dict[str, str]:
    """The query parameters, each of which must be in ``allowed`` and given once."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise bad_query(name, f"unknown parameter; allowed: {', '.join(sorted(allowed)) or 'none'}")
        if name in found:
            raise bad_query(name, "given more than once")
        found[name] = value
    return found


def path_jobid(request: Request) -> str:
    """``{jobid}`` of the path, if it is a job id."""
    jobid = str(request.path_params["jobid"])
    if not is_jobid(jobid):
        raise ApiError(
            ProblemCode.validation_error,
            f"{jobid[:64]!r} is not a job id (digits with an optional fraction, e.g. 1693992878.203)",
            errors=[field_error(["path", "jobid"], "not a job id")],
        )
    return jobid
