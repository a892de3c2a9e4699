"""Request bodies of the JSON routes: read whole with a cap, then parsed as strict JSON
(core's :func:`~psik_api_core.models.loads_input`, the parser the client checks with: no
byte order mark, no ``NaN``, no key given twice, no number past what Python converts).
The one way the JSON routes read a body."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from psik_api_core import LIMITS, STRICT_INPUT, GroupRequest, JobSpec, ProblemCode, field_error
from psik_api_core.limits import byte_size
from psik_api_core.models import InvalidJSON, loads_input

from ..errors import ApiError
from .problems import validation_problem

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int, what: str = "the body") -> bytes:
    """The body, at most ``limit`` bytes: 413 ``too_large`` as soon as a declared
    Content-Length or the bytes read so far go over it (the rest is never read)."""
    too_large = ApiError(ProblemCode.too_large, f"{what} is over {byte_size(limit)}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def read_job_spec(request: Request) -> JobSpec:
    """The body as a :class:`JobSpec`: 400 ``bad_request`` if it is not JSON, 422
    ``validation_error`` naming the field (or the key given twice) otherwise."""
    return await _read_model(request, JobSpec, "a JobSpec", LIMITS.max_body_bytes)


#: A group's body holds up to ``max_group_jobs`` specs.
MAX_GROUP_BODY = 16 << 20


async def read_group_request(request: Request) -> GroupRequest:
    """The body as a :class:`GroupRequest` (as :func:`read_job_spec`; up to 16 MiB)."""
    return await _read_model(request, GroupRequest, "a GroupRequest", MAX_GROUP_BODY)


async def _read_model(request: Request, model: type[M], what: str, limit: int) -> M:
    body = await read_body(request, limit)
    try:
        data = loads_input(body)
    except InvalidJSON as e:
        raise ApiError(
            ProblemCode.bad_request,
            f"the body is not valid JSON: {e}",
            errors=[field_error(["body"], "not valid JSON")],
        ) from None
    except ValidationError as e:  # valid JSON, but a key twice or a number too large
        raise validation_problem(e) from None
    if not isinstance(data, dict):
        raise ApiError(
            ProblemCode.validation_error,
            f"the body must be a JSON object ({what})",
            errors=[field_error(["body"], "must be an object")],
        )
    try:
        if model is JobSpec:
            return JobSpec.validate_input(data)  # type: ignore[return-value]
        return model.model_validate(data, strict=True, context=STRICT_INPUT)
    except ValidationError as e:
        raise validation_problem(e) from None


async def read_token_body(request: Request) -> str:
    """The token of a ``{"token": "..."}`` body: 400 ``bad_request`` if it is not JSON
    (a key given twice included: the body has one field, no field to name), 422
    ``validation_error`` if it is anything else."""
    body = await read_body(request, LIMITS.max_body_bytes)
    try:
        data = loads_input(body)
    except (InvalidJSON, ValidationError) as e:
        raise ApiError(
            ProblemCode.bad_request,
            f"the body is not valid JSON: {e}",
            errors=[field_error(["body"], "not JSON")],
        ) from None
    if not isinstance(data, dict) or set(data) != {"token"} or not isinstance(data["token"], str):
        raise ApiError(
            ProblemCode.validation_error,
            'the body must be {"token": "<biscuit, base64>"}',
            errors=[field_error(["body", "token"], "a string is required, and nothing else")],
        )
    return data["token"]
