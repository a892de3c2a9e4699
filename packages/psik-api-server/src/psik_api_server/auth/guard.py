"""The request-shape guard: the refusals of a request's shape, the same in both
``authz`` modes (:mod:`.authenticator` runs them around the mode's authenticator):

* :func:`header_refusal`: a ``Host``, ``Content-Type`` or ``Origin`` header given more
  than once (400, naming it): the checks read one value, and whatever reads the request
  after them (a proxy, the framework, a handler) may read the other; a body framed two
  ways (``Content-Length`` and ``Transfer-Encoding``: 400, and the connection closed);
* :func:`origin_refusal`: an ``Origin`` that is not the server's own ``scheme://Host``
  (403: a page in the user's browser; one holding a client certificate would present
  it to any page);
* :func:`body_refusal`: a body a browser form could send without a preflight
  (``text/plain``, urlencoded, multipart) on any route, and any body that is not JSON
  (``application/json`` or ``*/*+json``): 415. Every route takes JSON or nothing, except
  the file uploads (:func:`upload_kind`): a raw upload takes any other type, or none
  (``curl --upload-file``); the multipart upload only ``multipart/form-data``, which the
  Origin check has already refused from another origin's page. A request no route takes
  is left to the router (404 or 405, its body unread).

No CORS headers are ever sent, and there are no websocket routes
(:func:`refuse_websocket`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from psik_api_core import ProblemCode, field_error

from ..errors import ApiError
from ..http.problems import problem_response

_FORM_TYPES = {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
_NAME = r"[a-z0-9!#$&^_.+-]+"  # RFC 6838 type and subtype names
_JSON_TYPE = re.compile(rf"application/json|{_NAME}/{_NAME}\+json")


#: The upload routes: ``/v1/jobs/{jobid}/files`` (multipart) and ``.../files/{path}`` (raw).
_UPLOAD_PATH = re.compile(r"/v1/jobs/[^/]+/files(/.*)?", re.DOTALL)


def upload_kind(scope: Scope) -> str | None:
    """``"multipart"`` or ``"raw"`` for a request to a file-upload route, else None."""
    if scope.get("method") not in ("PUT", "POST"):
        return None
    found = _UPLOAD_PATH.fullmatch(str(scope.get("path", "")))
    if found is None:
        return None
    return "raw" if found.group(1) is not None else "multipart"


def _media_type(value: str | None) -> str | None:
    return None if value is None else value.split(";", 1)[0].strip().lower()


def _has_body(headers: Mapping[str, str]) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))


#: The headers the checks (or the routes) read, which must come once: (lower-case name,
#: as named in a refusal). Two Idempotency-Keys would be one request under two keys: a
#: replay with either must not find different answers.
_ONCE = {
    b"host": "Host",
    b"content-type": "Content-Type",
    b"origin": "Origin",
    b"idempotency-key": "Idempotency-Key",
}


def _repeated(raw: list[tuple[bytes, bytes]]) -> ApiError | None:
    """400 for the first of :data:`_ONCE` given more than once (names are case-blind)."""
    seen: set[bytes] = set()
    for name, _value in raw:
        key = name.lower()
        if key in _ONCE:
            if key in seen:
                return ApiError(
                    ProblemCode.bad_request,
                    f"the {_ONCE[key]} header is given more than once; send it once",
                )
            seen.add(key)
    return None


def _framing(raw: list[tuple[bytes, bytes]]) -> ApiError | None:
    """400 for a body framed two ways (``Content-Length`` and ``Transfer-Encoding``): a
    proxy in front of the server could take another body than the server does (request
    smuggling). The connection is closed after the answer (RFC 9112, 6.3)."""
    names = {name.lower() for name, _value in raw}
    if b"content-length" not in names or b"transfer-encoding" not in names:
        return None
    return ApiError(
        ProblemCode.bad_request,
        "the request gives both Content-Length and Transfer-Encoding; send one of them",
        errors=[field_error(["header", "Transfer-Encoding"], "not allowed with Content-Length")],
        headers={"Connection": "close"},
    )


def header_refusal(raw: list[tuple[bytes, bytes]]) -> ApiError | None:
    """The refusals of a request's head alone, in either mode: a header the checks read
    given twice, a body framed two ways."""
    return _repeated(raw) or _framing(raw)


def _routed(scope: Scope) -> bool:
    """Whether a route of the app takes this request's method on its path. One that none
    takes is answered 404 or 405 without its body being read: its body is then no reason
    to refuse it, and a 415 would hide the 405 a client needs."""
    router = getattr(scope.get("app"), "router", None)
    for route in getattr(router, "routes", ()):
        match, _child = route.matches(scope)
        if match is Match.NONE:
            continue
        allows = getattr(getattr(route, "endpoint", None), "allows", None)
        if match is Match.PARTIAL or allows is None:
            return match is Match.FULL
        return bool(allows(str(scope.get("method"))))
    return False


async def refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """There are no websocket routes: a handshake is answered with a 404 problem where
    the server offers ASGI's denial response (``websocket.http.response``), else closed
    before it is accepted (which the server answers with a bare 403)."""
    path = str(scope.get("path", ""))
    if "websocket.http.response" in (scope.get("extensions") or {}):
        err = ApiError(
            ProblemCode.not_found,
            f"{path[:200]} has no websocket: this API is plain HTTP (its events are Server-Sent "
            "Events, GET /v1/events)",
        )
        response = problem_response(err, path)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": response.body})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": "this API has no websocket routes"})


def origin_refusal(scope: Scope, headers: Mapping[str, str]) -> ApiError | None:
    """403 for a request from a web page of another origin than the server's own
    ``scheme://Host``: a page in the user's browser."""
    origin = headers.get("origin")
    if origin is None:
        return None
    own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
    if origin.lower() == own:
        return None
    return ApiError(
        ProblemCode.forbidden,
        f"a request from the web page at Origin {origin!r} is refused: this server "
        "answers only its own pages and non-browser clients",
    )


def body_refusal(scope: Scope, headers: Mapping[str, str]) -> ApiError | None:
    """415 for a body a browser form could send without a preflight, or one that is not
    JSON, on a route that would read it (the module doc)."""
    media = _media_type(headers.get("content-type"))
    kind = upload_kind(scope)
    if kind == "raw" and media not in _FORM_TYPES:
        return None
    if kind == "multipart" and (media == "multipart/form-data" or not _has_body(headers)):
        return None
    if kind is not None:
        if not _routed(scope):
            return None  # e.g. PUT /files: 405 from the router, the body unread
        wanted = (
            "multipart/form-data"
            if kind == "multipart"
            else "the file's bytes (application/octet-stream, or no Content-Type)"
        )
        return ApiError(
            ProblemCode.unsupported_media_type,
            f"{scope.get('method')} {scope.get('path')} takes {wanted}, not a "
            f"{media or 'body with no Content-Type'}"
            + (" body: a browser form can send that from any web page" if kind == "raw" else " body"),
        )
    if media in _FORM_TYPES:  # what a browser form sends without a preflight
        said = f"a {media} body"
    elif _has_body(headers) and (media is None or not _JSON_TYPE.fullmatch(media)):
        said = f"a {media} body" if media else "a body with no Content-Type"
    else:
        return None
    if not _routed(scope):
        return None  # 404 or 405 from the router, the body unread
    return ApiError(
        ProblemCode.unsupported_media_type,
        f"{scope.get('method')} {scope.get('path')} takes JSON (Content-Type: application/json), not {said}",
    )
