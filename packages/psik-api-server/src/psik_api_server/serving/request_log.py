"""Request ids and the server's log lines: one id per request, seen by the client and in
every log line of that request, and (``log_format: json``) one access line per request.

* :class:`RequestLog` (pure ASGI, so that streamed answers, event streams and downloads,
  pass through untouched) takes the client's ``X-Request-ID`` when it is sane
  (:func:`sane_request_id`: 1 to 64 of ``[A-Za-z0-9._-]``), else makes one; an unsafe
  value is never echoed. The id is set in :data:`REQUEST_ID` (a context variable: the
  request's task, its child tasks and the worker threads ``anyio`` runs for it see it),
  sent back in ``X-Request-ID`` on every answer, and put in every problem+json body
  (``http.problems``). With ``access_log`` it logs one line per request when the answer
  is over: route template (never the raw path: no job ids, no query), status, identity,
  duration, bytes in and out.
* :class:`RequestIdFilter` gives every log record the request id of the code that made
  it (``record.request_id``, None outside a request); :class:`TextFormatter` appends it to
  a human-readable line, :class:`JsonFormatter` writes each record as one JSON object.
* :func:`configure_logging` puts one handler with those on the root logger, and
  :func:`uvicorn_log_config` says how uvicorn's own loggers log in each format.

Nothing here reads a header other than ``X-Request-ID``, nor a query or a body: a token or
a secret cannot reach a line written here.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # only names: the OpenAPI table imports this module without starlette
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The response (and request) header that carries the id.
HEADER = "X-Request-ID"
_HEADER_RAW = HEADER.lower().encode("latin-1")

#: The id of the request being served, None outside one.
REQUEST_ID: ContextVar[str | None] = ContextVar("psik_api_request_id", default=None)

#: The logger of the access lines (``log_format: json``).
ACCESS_LOGGER = "psik_api_server.access"
#: Where an access line's fields are, on its log record.
_ACCESS_ATTR = "psik_api_access"

#: What a request id may be (the client's is taken only if it is one): safe in a header,
#: a log line and a file name as it is.
REQUEST_ID_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
_SANE = re.compile(REQUEST_ID_PATTERN)

LogFormat = Literal["text", "json"]


def sane_request_id(value: bytes | str | None) -> str | None:
    """``value`` if it may be used as a request id as it is (a log line, a header), else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if value is None or not _SANE.fullmatch(value):
        return None
    return value


def new_request_id() -> str:
    """A fresh request id (random, 32 hex digits)."""
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request being served by the calling code, None outside a request."""
    return REQUEST_ID.get()


def _client_id(scope: Scope) -> str | None:
    given = [v for k, v in scope.get("headers", []) if k.lower() == _HEADER_RAW]
    # Two ids for one request say nothing usable: a new one.
    return sane_request_id(given[0]) if len(given) == 1 else None


def route_template(scope: Scope) -> str:
    """The template of the route that served the request (``/v1/jobs/{jobid}``), or
    ``"unmatched"``: a request refused before routing is matched here, one that no
    route matches is never logged with its raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        path = _match(scope)
    if path is None:
        return "unmatched"
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)  # "{path:path}" is "{path}" in the document


def _match(scope: Scope) -> str | None:
    from starlette.routing import Match

    router = getattr(scope.get("app"), "router", None)
    for route in getattr(router, "routes", ()):
        try:
            match, _ = route.matches(scope)
        except Exception:  # a path no converter takes: no route of ours
            return None
        if match is not Match.NONE:
            return getattr(route, "path", None)
    return None


class RequestLog:
    """Pure ASGI middleware: the request's id (the module doc), and with ``access_log``
    one access line per request. ``identity(scope)`` names the caller once the app has
    run (None: unknown); it must never return a credential. ``observe(scope, status,
    seconds)`` is told of every request once its answer is over (the metrics)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        access_log: bool = False,
        identity: Callable[[Scope], str | None] = lambda scope: None,
        clock: Callable[[], float] = time.perf_counter,
        observe: Callable[[Scope, int, float], None] | None = None,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.identity = identity
        self.clock = clock
        self.observe = observe
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_id(scope) or new_request_id()
        started = self.clock()
        status = 500  # if the app ends without an answer
        bytes_in = 0
        bytes_out = 0
        length: int | None = None

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status, bytes_out, length
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER_RAW]
                headers.append((_HEADER_RAW, request_id.encode("ascii")))
                message = {**message, "headers": headers}
                for k, v in headers:
                    if k.lower() == b"content-length" and v.isdigit():
                        length = int(v)
            elif kind == "http.response.body":
                bytes_out += len(message.get("body", b""))
            elif kind in ("http.response.pathsend", "http.response.zerocopysend"):
                bytes_out = length or 0  # the server sends the file: its announced size
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            try:
                if self.observe is not None:
                    self.observe(scope, status, self.clock() - started)
                if self.access_log:
                    self._log(scope, request_id, status, started, bytes_in, bytes_out)
            finally:
                REQUEST_ID.reset(token)

    def _log(
        self, scope: Scope, request_id: str, status: int, started: float, bytes_in: int, bytes_out: int
    ) -> None:
        fields = {
            "request_id": request_id,
            "identity": self.identity(scope),
            "method": scope.get("method"),
            "route": route_template(scope),
            "status": status,
            "duration_ms": round((self.clock() - started) * 1000, 3),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
        }
        # The id in the message too: a launcher's own text handler (certified serve) shows it.
        self.logger.info(
            "%s %s %s (request %s)",
            fields["method"],
            fields["route"],
            status,
            request_id,
            extra={_ACCESS_ATTR: fields},
        )


class RequestIdFilter(logging.Filter):
    """Puts the request id of the code logging in ``record.request_id`` (None outside a
    request). On a handler, so that it sees every record that handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The human-readable line (the format given), ``(request <id>)`` at its end when it
    was written for a request."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} (request {request_id})"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, ``request_id`` (within a request), an access line's fields,
    and ``exc_info`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        access = getattr(record, _ACCESS_ATTR, None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exc_info"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


#: The server's own human-readable line (before request ids, the whole of it).
TEXT_FORMAT = "%(levelname)s: %(name)s: %(message)s"


def handler(log_format: LogFormat) -> logging.Handler:
    """A stderr handler writing ``log_format``, each line with its request id."""
    out = logging.StreamHandler(sys.stderr)
    out.addFilter(RequestIdFilter())
    out.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    return out


def configure_logging(level: str, log_format: LogFormat) -> None:
    """The root logger's level and handler (:func:`handler`), as ``logging.basicConfig``
    sets them: left alone if the root logger has a handler already."""
    logging.basicConfig(level=level.upper(), handlers=[handler(log_format)])


def uvicorn_log_config(log_format: LogFormat) -> dict[str, Any] | None:
    """uvicorn's ``log_config`` for ``log_format``. Text: uvicorn's own, its access line
    ending in the request id. JSON: None, so that uvicorn's loggers reach the root
    handler (:func:`configure_logging`); ``serve`` turns uvicorn's access line off then,
    :class:`RequestLog` writes one instead."""
    if log_format == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["request_id"] = {"()": f"{__name__}.RequestIdFilter"}
    config["handlers"]["access"]["filters"] = ["request_id"]
    config["formatters"]["access"]["fmt"] += " (request %(request_id)s)"
    return config
