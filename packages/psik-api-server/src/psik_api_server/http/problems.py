"""Every error leaves the server as ``application/problem+json`` (RFC 9457).

``ApiError`` carries its own code; starlette's HTTP errors and pydantic's validation
errors are translated; a full disk (ENOSPC, SQLITE_FULL) that reaches here becomes a
507 ``insufficient_storage`` naming what is full (logged once per episode, see
``diskfull``); a client that went away before its request body was complete
(starlette's ``ClientDisconnect``, on any route that reads a body) is not a server
error: a debug line, no traceback, and a 400 that nobody reads; anything else is logged
and becomes a 500 ``internal_error`` that leaks no detail. Every problem names the
request it answers (``request_id``, as the ``X-Request-ID`` header does: see
:mod:`psik_api_server.serving.request_log`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from psik_api_core import FieldError, ProblemCode

from ..errors import ApiError
from ..jobs.diskfull import is_disk_full
from ..serving.request_log import current_request_id

_logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(err: ApiError, instance: str | None = None) -> Response:
    """``err`` as problem+json, with the id of the request it answers (``request_id``)."""
    problem = err.problem(instance)
    problem.request_id = current_request_id()  # None (left out) outside a request
    body = problem.model_dump(mode="json", exclude_none=True)
    return Response(
        json.dumps(body), status_code=err.code.status, media_type=PROBLEM_JSON, headers=err.headers
    )


def validation_problem(e: ValidationError, prefix: tuple[str | int, ...] = ("body",)) -> ApiError:
    """A 422 naming each offending field, e.g. ``body.resources.duration``."""
    errors: list[FieldError] = []
    for err in e.errors(include_url=False):
        loc = [*prefix, *err["loc"]]
        if err["type"] == "extra_forbidden" and err.get("ctx", {}).get("fields"):
            # Our strict-input check reports unknown keys on the model; name each one.
            for name in str(err["ctx"]["fields"]).split(", "):
                errors.append(FieldError(loc=[*loc, name], msg="unknown field", type="extra_forbidden"))
            continue
        errors.append(FieldError(loc=loc, msg=err["msg"], type=err["type"]))
    detail = "; ".join(f"{'.'.join(str(x) for x in fe.loc)}: {fe.msg}" for fe in errors)
    return ApiError(ProblemCode.validation_error, detail, errors=errors)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return problem_response(exc, request.url.path)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {
        404: ProblemCode.not_found,
        405: ProblemCode.method_not_allowed,
        413: ProblemCode.too_large,
        415: ProblemCode.unsupported_media_type,
    }.get(exc.status_code, ProblemCode.bad_request)
    detail = exc.detail if isinstance(exc.detail, str) else code.problem_title
    if exc.status_code == 404:
        detail = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    headers: dict[str, Any] = dict(exc.headers or {})
    return problem_response(ApiError(code, detail, headers=headers), request.url.path)


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    HTTPException: handle_http_exception,
}


class CatchAll:
    """Pure ASGI middleware: an unexpected exception becomes a 500 problem (logged,
    with no detail leaked) instead of a bare text error and a re-raise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # Thousands of clients can do this in seconds: one debug line each, at most.
            _logger.debug("client went away mid-request: %s %s", scope.get("method"), scope.get("path"))
            if not started:
                # Sent for ASGI's sake (a request gets a response); the server drops it.
                err = ApiError(ProblemCode.bad_request, "the client closed the connection mid-request")
                with contextlib.suppress(Exception):
                    await problem_response(err, scope.get("path"))(scope, receive, send)
        except Exception as e:
            # The app's context, if it has one yet (an app that failed to start has none).
            ctx = getattr(getattr(scope.get("app"), "state", None), "context", None)
            disk = getattr(getattr(ctx, "service", None), "disk", None)
            if is_disk_full(e) and disk is not None and not started:
                err = disk.error(e)  # logged there, once per episode
                await problem_response(err, scope.get("path"))(scope, receive, send)
                return
            _logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            err = ApiError(ProblemCode.internal_error, "the server failed; the error is in its log")
            await problem_response(err, scope.get("path"))(scope, receive, send)
