"""The HTTP routes under ``/v1``: parse and check the request, call the JobService,
serialise with core's models. Every refusal names the parameter or field at fault.

The router is built from the OpenAPI table (:data:`psik_api_server.http.openapi.OPERATIONS`): each
operation's ``operation_id`` names its handler in :data:`HANDLERS`, and
:func:`build_routes` refuses to build a router where the two disagree. The router reads
and checks each operation's parameters as the table declares them
(:func:`.params.read_params`) and hands them to the handler. The table stays in
``openapi.py``, which needs no starlette; only the handlers live here."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from psik_api_core import GROUP_ID_PATTERN, Job, JobState, Page, ProblemCode, field_error

from ..auth.authenticator import principal
from ..context import context
from ..errors import ApiError
from ..jobs.service import JobService
from .bodies import read_job_spec
from .callback import post_callback
from .events import get_events, get_job_events
from .files import delete_job_file, get_job_file, list_job_files, put_job_file, upload_job_files
from .groups import delete_group, get_group, post_group
from .logs import get_job_log, get_job_logs
from .metrics import get_metrics
from .openapi import OPERATIONS, Operation
from .params import Params, label_filters, read_params
from .token import mint_token, show_token, token_key

#: What answers a request: a route's endpoint.
Endpoint = Callable[[Request], Awaitable[Response]]
#: What answers a request whose parameters the router has read and checked.
Handler = Callable[[Request, Params], Awaitable[Response]]


def _service(request: Request) -> JobService:
    service = context(request.app).service
    return service


def _json(model: BaseModel | Sequence[BaseModel], status: int = 200, **headers: str) -> Response:
    if not isinstance(model, BaseModel):
        content: Any = [_dump(m) for m in model]
    elif isinstance(model, Page):
        content = {"items": [_dump(m) for m in model.items], "next_cursor": model.next_cursor}
    else:
        content = _dump(model)
    return JSONResponse(content, status_code=status, headers=headers or None)


def _dump(model: BaseModel) -> Any:
    if isinstance(model, Job):
        # The callback fields are write-only: never sent back, not even masked (spec.json
        # may hold this server's own callback and secret instead, see callbacks.py).
        dumped = model.model_dump(mode="json", exclude={"spec": {"callback", "cb_secret", "cb_headers"}})
        # An after entry names its job by jobid (index is a request's own): the other is
        # left out, not null, as the schema says.
        dumped["spec"]["after"] = [
            {k: v for k, v in d.items() if v is not None} for d in dumped["spec"]["after"]
        ]
        return dumped
    return model.model_dump(mode="json")


# ---- backends ----


async def list_backends(request: Request, params: Params) -> Response:
    return _json(await _service(request).backends())


async def get_backend(request: Request, params: Params) -> Response:
    return _json(await _service(request).backend_info(params.path("name")))


# ---- jobs ----


async def _create(request: Request, params: Params, submit: bool) -> Response:
    spec = await read_job_spec(request)
    key = params.text("Idempotency-Key")
    job, _ = await _service(request).create(principal(request), spec, submit=submit, idempotency_key=key)
    return _json(job, 201, Location=f"/v1/jobs/{job.jobid}")


async def submit_job(request: Request, params: Params) -> Response:
    return await _create(request, params, submit=True)


async def new_job(request: Request, params: Params) -> Response:
    return await _create(request, params, submit=False)


async def start_job(request: Request, params: Params) -> Response:
    return _json(await _service(request).start(principal(request), params.path("jobid")))


async def list_jobs(request: Request, params: Params) -> Response:
    page = await _service(request).list(
        principal(request),
        states=[JobState(s) for s in params.texts("state")],
        backend=params.text("backend"),
        name=params.text("name"),
        ids=params.texts("id"),
        limit=_limit(params),
        cursor=params.text("cursor") or None,
        full=params.text("view") == "full",
        labels=label_filters(params.texts("label")),
        group=_group_filter(params.text("group")),
    )
    return _json(page)


_GROUP = re.compile(GROUP_ID_PATTERN)


def _group_filter(group: str | None) -> str | None:
    """``?group=``: a group id, else 422 naming it (as ``/v1/groups/{group}`` does)."""
    if group is not None and not _GROUP.fullmatch(group):
        raise ApiError(
            ProblemCode.validation_error,
            f"query parameter 'group': {group[:64]!r} is not a group id (32 lower-case hex digits)",
            errors=[field_error(["query", "group"], "not a group id")],
        )
    return group


def _limit(params: Params) -> int:
    limit = params.integer("limit")
    assert limit is not None  # it has a default
    return limit


async def get_job(request: Request, params: Params) -> Response:
    return _json(await _service(request).get(principal(request), params.path("jobid")))


async def get_state(request: Request, params: Params) -> Response:
    return _json(await _service(request).status(principal(request), params.path("jobid")))


async def delete_job(request: Request, params: Params) -> Response:
    service, who, jobid = _service(request), principal(request), params.path("jobid")
    if params.flag("purge"):
        await service.purge(who, jobid)
        return Response(status_code=204)
    return _json(await service.cancel(who, jobid))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


#: The handler of each operation of the OpenAPI table whose parameters the router reads
#: (:func:`.params.read_params`), by ``operation_id``.
HANDLERS: Mapping[str, Handler] = {
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
    "getEvents": get_events,
    "createGroup": post_group,
    "getGroup": get_group,
    "cancelGroup": delete_group,
    "getJobEvents": get_job_events,
    "listJobFiles": list_job_files,
    "uploadJobFiles": upload_job_files,
    "getJobFile": get_job_file,
    "putJobFile": put_job_file,
    "postJobFile": put_job_file,
    "deleteJobFile": delete_job_file,
}
#: The operations that read the request themselves: the health check answers whatever
#: query a prober adds, and the callback refuses any as 401, saying no more to a caller
#: it cannot trust. (The document's own two, ``getOpenAPI`` and ``getDocs``, are made by
#: :func:`build_routes`.)
ENDPOINTS: Mapping[str, Endpoint] = {
    "postCallback": post_callback,
    "healthz": healthz,
    "getMetrics": get_metrics,  # a scraper's query is its own business, as a prober's
}


def _checked(op: Operation, handler: Handler) -> Endpoint:
    """``handler`` given the parameters of ``op`` read from each request."""

    async def endpoint(request: Request) -> Response:
        return await handler(request, read_params(op, request))

    return endpoint


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
        """Whether this path takes ``method`` (the request guard asks before judging a body)."""
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

    Raises :class:`RuntimeError` if the table and :data:`HANDLERS` with :data:`ENDPOINTS`
    disagree, or if a path could never be reached because an earlier one matches it.
    """

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def docs_page(request: Request) -> Response:
        return HTMLResponse(docs)

    endpoints = {**ENDPOINTS, "getOpenAPI": openapi_json, "getDocs": docs_page}
    handled = set(HANDLERS) | set(endpoints)
    documented = {op.operation_id for op in OPERATIONS}
    if documented != handled or set(HANDLERS) & set(endpoints):
        raise RuntimeError(
            "the OpenAPI table and the handlers disagree: operations without a handler"
            f" {sorted(documented - handled)}, handlers without an operation"
            f" {sorted(handled - documented)}, operations with two"
            f" {sorted(set(HANDLERS) & set(endpoints))}"
        )
    by_path: dict[str, dict[str, Endpoint]] = {}
    for op in OPERATIONS:
        handler = HANDLERS.get(op.operation_id)
        endpoint = endpoints[op.operation_id] if handler is None else _checked(op, handler)
        by_path.setdefault(_route_path(op), {})[op.method] = endpoint
    routes: list[Route] = []
    for path, methods in by_path.items():
        # Starlette takes the first route that matches: a path an earlier template
        # matches (its own "{param}" text fits "[^/]+") would never be reached.
        shadow = next((r.path for r in routes if r.path_regex.match(path)), None)
        if shadow is not None:
            raise RuntimeError(f"route {path} comes after {shadow}, which matches it first")
        routes.append(Route(path, Resource(methods)))
    return routes
