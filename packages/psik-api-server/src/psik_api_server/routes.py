"""The HTTP routes under ``/v1``: parse and check the request, call the JobService,
serialise with core's models. Every refusal names the parameter or field at fault."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from psik_api_core import (
    STRICT_INPUT,
    Job,
    JobSpec,
    JobState,
    ProblemCode,
    field_error,
    is_jobid,
)

from .errors import ApiError
from .problems import validation_problem
from .security import principal
from .service import JobService

Endpoint = Callable[[Request], Awaitable[Response]]

MAX_BODY = 1 << 20  # a JobSpec is a few KiB; a MiB leaves room for big scripts
MAX_IDS = 1000
MAX_KEY = 200


def _service(request: Request) -> JobService:
    service: JobService = request.app.state.service
    return service


def _json(model: BaseModel | Sequence[BaseModel], status: int = 200, **headers: str) -> Response:
    if not isinstance(model, BaseModel):
        content: Any = [m.model_dump(mode="json") for m in model]
    elif isinstance(model, Job):
        # cb_secret is write-only: it is never sent back, not even masked.
        content = model.model_dump(mode="json", exclude={"spec": {"cb_secret"}})
    else:
        content = model.model_dump(mode="json")
    return JSONResponse(content, status_code=status, headers=headers or None)


def _bad_query(name: str, why: str) -> ApiError:
    return ApiError(
        ProblemCode.validation_error,
        f"query parameter {name!r}: {why}",
        errors=[field_error(["query", name], why)],
    )


def _only_params(request: Request, allowed: set[str]) -> None:
    for name in request.query_params:
        if name not in allowed:
            raise _bad_query(name, f"unknown parameter; allowed: {', '.join(sorted(allowed)) or 'none'}")


def _jobid(request: Request) -> str:
    jobid = str(request.path_params["jobid"])
    if not is_jobid(jobid):
        raise ApiError(
            ProblemCode.validation_error,
            f"{jobid[:64]!r} is not a job id (digits with an optional fraction, e.g. 1693992878.203)",
            errors=[field_error(["path", "jobid"], "not a job id")],
        )
    return jobid


async def _spec(request: Request) -> JobSpec:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(ProblemCode.too_large, f"the body is over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(ProblemCode.too_large, f"the body is over {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(
            ProblemCode.bad_request,
            f"the body is not valid JSON: {e}",
            errors=[field_error(["body"], "not valid JSON")],
        ) from None
    if not isinstance(data, dict):
        raise ApiError(
            ProblemCode.validation_error,
            "the body must be a JSON object (a JobSpec)",
            errors=[field_error(["body"], "must be an object")],
        )
    try:
        return JobSpec.model_validate(data, context=STRICT_INPUT)
    except ValidationError as e:
        raise validation_problem(e) from None


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_KEY and key.isprintable()):
        raise ApiError(
            ProblemCode.validation_error,
            f"Idempotency-Key must be 1..{MAX_KEY} printable characters",
            errors=[field_error(["header", "Idempotency-Key"], "bad length or characters")],
        )
    return key


# ---- backends ----


async def list_backends(request: Request) -> Response:
    _only_params(request, set())
    return _json(_service(request).backends())


async def get_backend(request: Request) -> Response:
    _only_params(request, set())
    return _json(_service(request).backend_info(str(request.path_params["name"])))


# ---- jobs ----


async def _create(request: Request, submit: bool) -> Response:
    _only_params(request, set())
    spec = await _spec(request)
    key = _idempotency_key(request)
    job, _ = await _service(request).create(principal(request), spec, submit=submit, idempotency_key=key)
    return _json(job, 201, Location=f"/v1/jobs/{job.jobid}")


async def submit_job(request: Request) -> Response:
    return await _create(request, submit=True)


async def new_job(request: Request) -> Response:
    return await _create(request, submit=False)


async def start_job(request: Request) -> Response:
    _only_params(request, set())
    return _json(await _service(request).start(principal(request), _jobid(request)))


async def list_jobs(request: Request) -> Response:
    q = request.query_params
    _only_params(request, {"state", "backend", "name", "id", "limit", "cursor"})
    states: list[JobState] = []
    for value in q.getlist("state"):
        for part in value.split(","):
            try:
                states.append(JobState(part))
            except ValueError:
                raise _bad_query(
                    "state", f"{part!r} is not one of {', '.join(s.value for s in JobState)}"
                ) from None
    ids = q.getlist("id")
    if len(ids) > MAX_IDS:
        raise _bad_query("id", f"at most {MAX_IDS} ids per request")
    for jobid in ids:
        if not is_jobid(jobid):
            raise _bad_query("id", f"{jobid[:64]!r} is not a job id")
    limit = 100
    if "limit" in q:
        raw = q["limit"]
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise _bad_query("limit", f"{raw[:32]!r} is not an integer from 1 to 1000")
        limit = int(raw)
    cursor = q.get("cursor") or None
    page = _service(request).list(
        principal(request),
        states=states,
        backend=q.get("backend"),
        name=q.get("name"),
        ids=ids,
        limit=limit,
        cursor=cursor,
    )
    return _json(page)


async def get_job(request: Request) -> Response:
    _only_params(request, set())
    return _json(await _service(request).get(principal(request), _jobid(request)))


async def get_state(request: Request) -> Response:
    _only_params(request, set())
    return _json(_service(request).status(principal(request), _jobid(request)))


async def delete_job(request: Request) -> Response:
    _only_params(request, {"purge"})
    purge = request.query_params.get("purge", "false").lower()
    if purge not in {"true", "false", "1", "0"}:
        raise _bad_query("purge", "must be true or false")
    service, who, jobid = _service(request), principal(request), _jobid(request)
    if purge in {"true", "1"}:
        await service.purge(who, jobid)
        return Response(status_code=204)
    return _json(await service.cancel(who, jobid))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


class Resource:
    """The endpoint of one path: dispatches by method, and answers any other method
    with a 405 problem naming exactly the methods the path has. (Two starlette Routes on
    one path would each name only their own, and ``GET /v1/jobs/new`` would fall
    through to ``/v1/jobs/{jobid}``.) An ASGI app rather than a function, so that
    starlette routes every method here."""

    def __init__(self, **handlers: Endpoint) -> None:
        self.handlers = handlers
        methods = {m.upper() for m in handlers} | ({"HEAD"} if "get" in handlers else set())
        self.allow = ", ".join(sorted(methods))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        method = request.method.lower()
        handler = self.handlers.get("get" if method == "head" else method)
        if handler is None:
            raise ApiError(
                ProblemCode.method_not_allowed,
                f"{request.method} is not allowed on {request.url.path}; allowed: {self.allow}",
                headers={"Allow": self.allow},
            )
        response = await handler(request)
        await response(scope, receive, send)


def resource(path: str, **handlers: Endpoint) -> Route:
    return Route(path, Resource(**handlers))


def build_routes(*, openapi: dict[str, Any], docs: str) -> list[Route]:
    """Every route of the app: the API's, the OpenAPI document and the docs page."""

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def docs_page(request: Request) -> Response:
        return HTMLResponse(docs)

    return [*ROUTES, resource("/openapi.json", get=openapi_json), resource("/", get=docs_page)]


ROUTES = [
    resource("/v1/backends", get=list_backends),
    resource("/v1/backends/{name}", get=get_backend),
    resource("/v1/jobs", get=list_jobs, post=submit_job),
    resource("/v1/jobs/new", post=new_job),
    resource("/v1/jobs/{jobid}/start", post=start_job),
    resource("/v1/jobs/{jobid}/state", get=get_state),
    resource("/v1/jobs/{jobid}", get=get_job, delete=delete_job),
    resource("/healthz", get=healthz),
]
