"""The HTTP routes under ``/v1``: parse and check the request, call the JobService,
serialise with core's models. Every refusal names the parameter or field at fault.

The router is built from the OpenAPI table (:data:`psik_api_server.http.openapi.OPERATIONS`): each
operation's ``operation_id`` names its handler in :data:`HANDLERS`, and
:func:`build_routes` refuses to build a router where the two disagree. The table stays
in ``openapi.py``, which needs no starlette; only the handlers live here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from psik_api_core import (
    LIMITS,
    Job,
    JobSpec,
    JobState,
    ProblemCode,
    field_error,
    is_jobid,
)
from psik_api_core.models import InvalidJSON, loads_input

from ..auth.local import principal
from ..context import context
from ..errors import ApiError
from ..jobs.service import JobService
from .bodies import read_body
from .callback import post_callback
from .files import delete_job_file, get_job_file, list_job_files, put_job_file, upload_job_files
from .logs import get_job_log, get_job_logs
from .openapi import OPERATIONS, Operation
from .params import bad_query, path_jobid
from .problems import validation_problem
from .token import mint_token, show_token, token_key

Endpoint = Callable[[Request], Awaitable[Response]]


def _service(request: Request) -> JobService:
    service = context(request.app).service
    return service


def _json(model: BaseModel | Sequence[BaseModel], status: int = 200, **headers: str) -> Response:
    if not isinstance(model, BaseModel):
        content: Any = [m.model_dump(mode="json") for m in model]
    elif isinstance(model, Job):
        # The callback fields are write-only: never sent back, not even masked (spec.json
        # may hold this server's own callback and secret instead, see callbacks.py).
        content = model.model_dump(mode="json", exclude={"spec": {"callback", "cb_secret", "cb_headers"}})
    else:
        content = model.model_dump(mode="json")
    return JSONResponse(content, status_code=status, headers=headers or None)


#: Query parameters that may be given more than once (``?state=queued&state=active``),
#: as the OpenAPI table says.
REPEATABLE = frozenset(
    p.name for op in OPERATIONS for p in op.params if p.location == "query" and p.repeatable
)


def _only_params(request: Request, allowed: set[str]) -> None:
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in allowed:
            raise bad_query(name, f"unknown parameter; allowed: {', '.join(sorted(allowed)) or 'none'}")
        if name in seen and name not in REPEATABLE:
            raise bad_query(name, "given more than once")
        seen.add(name)


async def _spec(request: Request) -> JobSpec:
    body = await read_body(request, LIMITS.max_body_bytes)
    try:
        # The same parser as the client's check (core's JobSpec.validate_input).
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
            "the body must be a JSON object (a JobSpec)",
            errors=[field_error(["body"], "must be an object")],
        )
    try:
        return JobSpec.validate_input(data)
    except ValidationError as e:
        raise validation_problem(e) from None


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    longest = LIMITS.max_idempotency_key
    if key is not None and not (0 < len(key) <= longest and key.isascii() and key.isprintable()):
        raise ApiError(
            ProblemCode.validation_error,
            f"Idempotency-Key must be 1..{longest} printable ASCII characters",
            errors=[field_error(["header", "Idempotency-Key"], "bad length or characters")],
        )
    return key


# ---- backends ----


async def list_backends(request: Request) -> Response:
    _only_params(request, set())
    return _json(await _service(request).backends())


async def get_backend(request: Request) -> Response:
    _only_params(request, set())
    return _json(await _service(request).backend_info(str(request.path_params["name"])))


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
    return _json(await _service(request).start(principal(request), path_jobid(request)))


async def list_jobs(request: Request) -> Response:
    q = request.query_params
    _only_params(request, {"state", "backend", "name", "id", "limit", "cursor"})
    states: list[JobState] = []
    for value in q.getlist("state"):
        for part in value.split(","):
            try:
                states.append(JobState(part))
            except ValueError:
                raise bad_query(
                    "state", f"{part!r} is not one of {', '.join(s.value for s in JobState)}"
                ) from None
    ids = q.getlist("id")
    if len(ids) > LIMITS.max_ids:
        raise bad_query("id", f"at most {LIMITS.max_ids} ids per request")
    for jobid in ids:
        if not is_jobid(jobid):
            raise bad_query("id", f"{jobid[:64]!r} is not a job id")
    limit = LIMITS.default_page_size
    if "limit" in q:
        raw, most = q["limit"], LIMITS.max_page_size
        if not raw.isdigit() or not 1 <= int(raw) <= most:
            raise bad_query("limit", f"{raw[:32]!r} is not an integer from 1 to {most}")
        limit = int(raw)
    cursor = q.get("cursor") or None
    page = await _service(request).list(
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
    return _json(await _service(request).get(principal(request), path_jobid(request)))


async def get_state(request: Request) -> Response:
    _only_params(request, set())
    return _json(await _service(request).status(principal(request), path_jobid(request)))


async def delete_job(request: Request) -> Response:
    _only_params(request, {"purge"})
    purge = request.query_params.get("purge", "false").lower()
    if purge not in {"true", "false", "1", "0"}:
        raise bad_query("purge", "must be true or false")
    service, who, jobid = _service(request), principal(request), path_jobid(request)
    if purge in {"true", "1"}:
        await service.purge(who, jobid)
        return Response(status_code=204)
    return _json(await service.cancel(who, jobid))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


#: The handler of each operation of the OpenAPI table, by ``operation_id`` (the
#: document's own two, ``getOpenAPI`` and ``getDocs``, are made by :func:`build_routes`).
HANDLERS: Mapping[str, Endpoint] = {
    "listBackends": list_backends,
    "getBackend": get_backend,
    "mintToken": mint_token,
    "getTokenKey": token_key,
    "showToken": show_token,
    "submitJob": submit_job,
    "createJob": new_job,
    "startJob": start_job,
    "listJobs": list_jobs,
    "getJob": get_job,
    "cancelJob": delete_job,
    "getJobState": get_state,
    "getJobLogs": get_job_logs,
    "getJobLog": get_job_log,
    "listJobFiles": list_job_files,
    "uploadJobFiles": upload_job_files,
    "getJobFile": get_job_file,
    "putJobFile": put_job_file,
    "postJobFile": put_job_file,
    "deleteJobFile": delete_job_file,
    "postCallback": post_callback,
    "healthz": healthz,
}


class Resource:
    """The endpoint of one path: dispatches by method, and answers any other method
    with a 405 problem naming exactly the methods the path has. (Two starlette Routes on
    one path would each name only their own, and ``GET /v1/jobs/new`` would fall
    through to ``/v1/jobs/{jobid}``.) An ASGI app rather than a function, so that
    starlette routes every method here."""

    def __init__(self, handlers: Mapping[str, Endpoint]) -> None:
        self.handlers = {method.upper(): handler for method, handler in handlers.items()}
        methods = set(self.handlers) | ({"HEAD"} if "GET" in self.handlers else set())
        self.allow = ", ".join(sorted(methods))

    def allows(self, method: str) -> bool:
        """Whether this path takes ``method`` (``security`` asks before judging a body)."""
        return ("GET" if method == "HEAD" else method) in self.handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        handler = self.handlers.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            raise ApiError(
                ProblemCode.method_not_allowed,
                f"{request.method} is not allowed on {request.url.path}; allowed: {self.allow}",
                headers={"Allow": self.allow},
            )
        response = await handler(request)
        await response(scope, receive, send)


def _route_path(op: Operation) -> str:
    """The operation's path as starlette routes it: a parameter that may hold ``/``
    (a file path) becomes ``{name:path}``."""
    path = op.path
    for param in op.params:
        if param.location == "path" and param.slashes:
            path = path.replace(f"{{{param.name}}}", f"{{{param.name}:path}}")
    return path


def build_routes(*, openapi: dict[str, Any], docs: str) -> list[Route]:
    """Every route of the app, one per path of the OpenAPI table, in the table's order:
    the API's, the OpenAPI document (``openapi``) and the docs page (``docs``).

    Raises :class:`RuntimeError` if the table and :data:`HANDLERS` disagree, or if a
    path could never be reached because an earlier one matches it.
    """

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def docs_page(request: Request) -> Response:
        return HTMLResponse(docs)

    handlers = {**HANDLERS, "getOpenAPI": openapi_json, "getDocs": docs_page}
    documented = {op.operation_id for op in OPERATIONS}
    if documented != set(handlers):
        raise RuntimeError(
            "the OpenAPI table and the handlers disagree: operations without a handler"
            f" {sorted(documented - set(handlers))}, handlers without an operation"
            f" {sorted(set(handlers) - documented)}"
        )
    by_path: dict[str, dict[str, Endpoint]] = {}
    for op in OPERATIONS:
        by_path.setdefault(_route_path(op), {})[op.method] = handlers[op.operation_id]
    routes: list[Route] = []
    for path, methods in by_path.items():
        # Starlette takes the first route that matches: a path an earlier template
        # matches (its own "{param}" text fits "[^/]+") would never be reached.
        shadow = next((r.path for r in routes if r.path_regex.match(path)), None)
        if shadow is not None:
            raise RuntimeError(f"route {path} comes after {shadow}, which matches it first")
        routes.append(Route(path, Resource(methods)))
    return routes
