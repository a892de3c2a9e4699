"""Reading a small request body whole, with a cap: the one way the JSON routes do it."""

from __future__ import annotations

from starlette.requests import Request

from psik_api_core import ProblemCode
from psik_api_core.limits import byte_size

from ..errors import ApiError


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
