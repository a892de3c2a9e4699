"""A job's logs: all of them, one, or one followed as it is written, as flows (see ``_base``).

A follow is one long response the server ends once the job is final (or was never
started: a ``new`` job's follow gives what there is and ends) and the log read to its
end. If the connection drops before that, the follow asks again from the byte
after the last one it handed out, waiting as the retry policy says; the retries are
counted anew whenever bytes arrived, so only a link that stays down ends it (with
:class:`APIConnectionError`). A job may stay quiet for hours, so unless the call sets
``timeout=``, a follow waits for the next bytes without a read timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pydantic

from ._base import Close, Emit, EmitFlow, Flow, ReadChunk, Sleep
from ._exceptions import (
    APIResponseValidationError,
    InvalidRequestError,
    NotFoundError,
    error_from_transport,
)
from ._inputs import count, log_name, path_jobid
from ._types import DEFAULT_OPTIONS, NotGiven, RequestOptions

if TYPE_CHECKING:
    from ._base import BaseClient

_LOGS = pydantic.TypeAdapter(dict[str, str])
#: A log is bytes as the job wrote them; an error is problem+json.
_RAW = {"Accept": "*/*"}


def log_path(jobid: str, name: str) -> str:
    """The API path of one log, checked."""
    return f"/v1/jobs/{path_jobid(jobid)}/logs/{log_name(name)}"


def logs_flow(
    client: BaseClient, jobid: str, options: RequestOptions = DEFAULT_OPTIONS
) -> Flow[dict[str, str]]:
    """GET ``/v1/jobs/{id}/logs``: ``{name: text}``."""
    request = client._build_request("GET", f"/v1/jobs/{path_jobid(jobid)}/logs", options=options)
    return client._fetch_flow(_LOGS, request)


def read_log_flow(
    client: BaseClient,
    jobid: str,
    name: str,
    *,
    tail: int | None = None,
    offset: int | None = None,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[bytes]:
    """GET ``/v1/jobs/{id}/logs/{name}``: the log's bytes, from ``offset`` or its last
    ``tail`` lines."""
    params = _start(tail=tail, offset=offset)
    request = client._build_request(
        "GET", log_path(jobid, name), params=params, headers=_RAW, options=options
    )
    response = yield from client._send_flow(request)
    return response.content


def follow_log_flow(
    client: BaseClient,
    jobid: str,
    name: str,
    *,
    offset: int = 0,
    tail: int | None = None,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> EmitFlow[bytes]:
    """Emit the log's bytes from ``offset`` (or its last ``tail`` lines) on, as they are
    written, until the server ends the follow (see the module docstring).

    With ``tail``, the last lines are read first (a plain read, which says where they
    begin), then followed from their end; a log not written yet is followed from its
    start."""
    path = log_path(jobid, name)
    _start(tail=tail, offset=offset if offset else None)
    options = _patient(client, options)
    pos, tailing, attempt = offset, tail is not None, 0
    while True:
        params = [("tail", str(tail))] if tailing else [("offset", str(pos)), ("follow", "true")]
        request = client._build_request("GET", path, params=params, headers=_RAW, options=options)
        try:
            response = yield from client._send_flow(request, stream=True)
        except NotFoundError:
            if not tailing:
                raise
            tailing = False  # not written yet: a follow waits for it
            continue
        if tailing:
            pos = _tail_start(response)
        received, dropped = 0, None
        while True:
            chunk = yield ReadChunk(response)
            if isinstance(chunk, httpx.TransportError):
                dropped = chunk
                break
            if chunk is None:
                break
            assert isinstance(chunk, bytes)
            pos += len(chunk)
            received += len(chunk)
            yield Emit(chunk)
        yield Close(response)
        if dropped is None and not tailing:
            return  # the server ended it: the job is final (or new) and the log read to its end
        if dropped is not None:
            if received:
                attempt = 0
            delay = client._retry.delay(request, dropped, attempt)
            if delay is None:
                raise error_from_transport(dropped, request, client._where()) from dropped
            attempt += 1
            yield Sleep(delay)
        tailing = False  # the rest, from the byte after the last one handed out


def _start(*, tail: int | None, offset: int | None) -> list[tuple[str, str]]:
    """The query of where a read starts: ``tail`` lines from the end or byte ``offset``."""
    tail = count(tail, "tail=", 1)
    offset = count(offset, "offset=", 0)
    if tail is not None and offset is not None:
        raise InvalidRequestError("give tail= or offset=, not both")
    if tail is not None:
        return [("tail", str(tail))]
    return [] if offset is None else [("offset", str(offset))]


def _tail_start(response: httpx.Response) -> int:
    """Where a tail read begins: the log's size less the bytes it is answered with."""
    try:
        start = int(response.headers["X-Log-Size"]) - int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        start = -1
    if start < 0:
        raise APIResponseValidationError(
            f"GET {response.request.url.path} answered without a valid X-Log-Size and Content-Length",
            response=response,
        )
    return start


def _patient(client: BaseClient, options: RequestOptions) -> RequestOptions:
    """``options``, with no read timeout unless the call set ``timeout=``."""
    if not isinstance(options.timeout, NotGiven):
        return options
    default = client._timeout
    timeout = httpx.Timeout(connect=default.connect, read=None, write=default.write, pool=default.pool)
    return RequestOptions(timeout, options.extra_headers)
