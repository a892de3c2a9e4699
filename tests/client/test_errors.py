"""Error responses become the exception classes of the contract (code first, then status)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, job_json, problem
from psik_api_client._exceptions import BY_CODE
from psik_api_core import ProblemCode

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "bad_request", pac.BadRequestError),
        (400, "invalid_path", pac.InvalidPathError),
        (401, "unauthorized", pac.AuthenticationError),
        (403, "forbidden", pac.PermissionDeniedError),
        (404, "not_found", pac.NotFoundError),
        (405, "method_not_allowed", pac.MethodNotAllowedError),
        (409, "conflict", pac.ConflictError),
        (409, "idempotency_in_flight", pac.IdempotencyInFlightError),
        (412, "precondition_failed", pac.PreconditionFailedError),
        (416, "range_not_satisfiable", pac.RangeNotSatisfiableError),
        (413, "too_large", pac.RequestTooLargeError),
        (422, "validation_error", pac.UnprocessableEntityError),
        (422, "unknown_backend", pac.UnknownBackendError),
        (422, "idempotency_mismatch", pac.IdempotencyMismatchError),
        (429, "rate_limited", pac.RateLimitError),
        (500, "internal_error", pac.InternalServerError),
        (502, "submit_failed", pac.SubmitFailedError),
        (503, "backend_unavailable", pac.ServiceUnavailableError),
        (507, "insufficient_storage", pac.InsufficientStorageError),
        # The code wins over the status: a 400 that says not_found is a NotFoundError.
        (400, "not_found", pac.NotFoundError),
    ],
)
async def test_problem_maps_to_exception_by_code_then_status(
    connect: Callable[..., Api], status: int, code: str, cls: type[pac.APIStatusError]
) -> None:
    detail = f"something about {code}"
    api = connect(lambda req: problem(status, code, detail), max_retries=0)
    with pytest.raises(pac.APIStatusError) as info:
        await api.get(JOBID)
    exc = info.value
    assert type(exc) is cls
    assert str(exc) == detail
    assert exc.status_code == status
    assert exc.code == code
    assert exc.problem is not None and exc.problem.detail == detail


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (404, b"no such thing", pac.NotFoundError),
        (405, b"Method Not Allowed", pac.MethodNotAllowedError),
        (409, b"", pac.ConflictError),
        (413, b"<html>413 Request Entity Too Large</html>", pac.RequestTooLargeError),
        (422, b"{not json", pac.UnprocessableEntityError),
        (429, b"slow down", pac.RateLimitError),
        (500, b"oops", pac.InternalServerError),
        (502, b"<html><body>Bad Gateway</body></html>", pac.InternalServerError),
        (503, b"Service Unavailable", pac.ServiceUnavailableError),
        (504, b"Gateway Timeout", pac.InternalServerError),
        (418, b"teapot", pac.APIStatusError),
        # JSON, but not a problem document: still mapped by status.
        (403, b'{"message": "nope"}', pac.PermissionDeniedError),
    ],
)
async def test_non_problem_body_maps_by_status(
    connect: Callable[..., Api], status: int, body: bytes, cls: type[pac.APIStatusError]
) -> None:
    api = connect(lambda req: httpx.Response(status, content=body), max_retries=0)
    with pytest.raises(pac.APIStatusError) as info:
        await api.backends()
    assert type(info.value) is cls
    assert info.value.problem is None
    assert info.value.code is None
    assert str(info.value).startswith(f"HTTP {status}")
    if body:
        assert body.decode()[:5] in str(info.value)


async def test_conflict_message_is_the_detail_and_names_the_job(connect: Callable[..., Api]) -> None:
    detail = f"job {JOBID} is active; cancel it before starting it again"
    api = connect(lambda req: problem(409, "conflict", detail, jobid=JOBID, state="active"))
    with pytest.raises(pac.ConflictError) as info:
        await api.start(JOBID)
    assert str(info.value) == detail
    assert info.value.jobid == JOBID
    assert info.value.state == "active"


async def test_submit_failed_exposes_the_created_job(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: problem(502, "submit_failed", "sbatch: invalid partition", jobid=JOBID))
    with pytest.raises(pac.SubmitFailedError) as info:
        await api.submit({"script": "true"})
    assert info.value.jobid == JOBID
    assert str(info.value) == "sbatch: invalid partition"


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        (httpx.ConnectError("Connection refused"), pac.APIConnectionError),
        (httpx.ReadTimeout("timed out"), pac.APITimeoutError),
    ],
)
async def test_transport_errors_map_to_connection_errors(
    connect: Callable[..., Api], error: httpx.TransportError, cls: type[pac.APIConnectionError]
) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise error

    api = connect(handler, base_url="http://hpc.example:8123", max_retries=0)
    with pytest.raises(cls) as info:
        await api.get(JOBID)
    assert type(info.value) is cls
    assert info.value.request.url.path == f"/v1/jobs/{JOBID}"
    assert info.value.__cause__ is error
    if cls is pac.APIConnectionError:
        assert str(info.value) == "cannot reach http://hpc.example:8123: Connection refused"
    else:
        assert "timed out" in str(info.value)


async def test_unexpected_success_body_is_a_response_validation_error(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(200, text="<html>login page</html>"))
    with pytest.raises(pac.APIResponseValidationError) as info:
        await api.get(JOBID)
    assert f"GET /v1/jobs/{JOBID}" in str(info.value)
    assert info.value.response.status_code == 200


async def test_unknown_response_fields_are_ignored(connect: Callable[..., Api]) -> None:
    body = job_json(JOBID, "completed", gpu_hours=3, spec={"script": "x", "future": True})
    body["history"][0]["signature"] = "abc"
    api = connect(lambda req: httpx.Response(200, json=body))
    job = await api.get(JOBID)
    assert job.jobid == JOBID
    assert job.state is pac.JobState.completed
    assert job.spec.script == "x"
    assert not hasattr(job, "gpu_hours")


def test_wait_timeout_is_a_timeout_error_and_a_client_error() -> None:
    exc = pac.WaitTimeout("job 1.2 is not final", pending=["1.2"])
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, pac.PsikApiError)
    assert str(exc) == "job 1.2 is not final"
    assert exc.pending == ["1.2"]
    assert exc.status is None


def test_exception_tree() -> None:
    assert issubclass(pac.APITimeoutError, pac.APIConnectionError)
    assert issubclass(pac.IdempotencyInFlightError, pac.ConflictError)
    assert issubclass(pac.UnknownBackendError, pac.UnprocessableEntityError)
    assert issubclass(pac.IdempotencyMismatchError, pac.UnprocessableEntityError)
    # A 503 says "try later", a 500 says "the server is broken": not one family.
    assert not issubclass(pac.ServiceUnavailableError, pac.InternalServerError)
    assert issubclass(pac.InvalidRequestError, ValueError)
    classes = (
        pac.APIConnectionError,
        pac.APIStatusError,
        pac.APIResponseValidationError,
        pac.InvalidRequestError,
        pac.WaitTimeout,
    )
    for cls in classes:
        assert issubclass(cls, pac.PsikApiError)


def test_the_old_validation_error_name_is_gone() -> None:
    # It shadowed pydantic's ValidationError in code importing both.
    assert not hasattr(pac, "ValidationError")
    assert "ValidationError" not in pac.__all__


def test_every_exported_name_exists_and_has_a_docstring() -> None:
    for name in pac.__all__:
        obj = getattr(pac, name)
        if isinstance(obj, type):
            assert obj.__doc__, name


@pytest.mark.parametrize("code", list(ProblemCode), ids=str)
def test_every_problem_code_has_its_own_class_with_its_status(code: ProblemCode) -> None:
    cls = BY_CODE[code]
    assert cls.status_code == code.status
    assert cls is not pac.APIStatusError
    # Exported, so callers can catch it by name.
    assert getattr(pac, cls.__name__) is cls


def test_problem_codes_map_to_distinct_classes() -> None:
    classes = [BY_CODE[code] for code in ProblemCode]
    assert len(set(classes)) == len(ProblemCode)


@pytest.mark.parametrize("code", list(ProblemCode), ids=str)
async def test_every_problem_code_raises_its_class(connect: Callable[..., Api], code: ProblemCode) -> None:
    api = connect(lambda req: problem(code.status, code.value, f"about {code}"), max_retries=0)
    with pytest.raises(pac.APIStatusError) as info:
        await api.get(JOBID)
    assert type(info.value) is BY_CODE[code]
    assert info.value.status_code == code.status
    assert info.value.code == code.value


async def test_an_unknown_code_falls_back_to_the_status(connect: Callable[..., Api]) -> None:
    # A newer server's code this client does not know yet.
    api = connect(lambda req: problem(404, "job_archived", "moved to tape"), max_retries=0)
    with pytest.raises(pac.NotFoundError, match="moved to tape"):
        await api.get(JOBID)
