"""The group routes: ``POST /v1/groups``, ``GET`` and ``DELETE /v1/groups/{group}``
(what they do: :mod:`psik_api_server.jobs.groups`)."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from psik_api_core import GROUP_ID_PATTERN, Group, ProblemCode, field_error

from ..auth.authenticator import principal
from ..context import context
from ..errors import ApiError
from .bodies import read_group_request
from .params import Params

_GROUP = re.compile(GROUP_ID_PATTERN)


def _json(group: Group, status: int = 200, **headers: str) -> Response:
    # Members are jobs as GET /v1/jobs/{id} shows them: the callback fields stay write-only.
    from .routes import _dump

    content = {"group": group.group, "jobs": [_dump(j) for j in group.jobs], "states": group.states}
    return JSONResponse(content, status_code=status, headers=headers or None)


async def post_group(request: Request, params: Params) -> Response:
    body = await read_group_request(request)
    group, _ = await context(request.app).groups.create(
        principal(request), body, params.text("Idempotency-Key")
    )
    return _json(group, 201, Location=f"/v1/groups/{group.group}")


def _group(params: Params) -> str:
    gid = params.path("group")
    if not _GROUP.fullmatch(gid):
        raise ApiError(
            ProblemCode.validation_error,
            f"{gid[:64]!r} is not a group id (32 lower-case hex digits)",
            errors=[field_error(["path", "group"], "not a group id")],
        )
    return gid


async def get_group(request: Request, params: Params) -> Response:
    return _json(await context(request.app).groups.get(principal(request), _group(params)))


async def delete_group(request: Request, params: Params) -> Response:
    return _json(await context(request.app).groups.cancel(principal(request), _group(params)))
