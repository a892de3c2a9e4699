"""The token routes (``authz: token``; see ``tokens`` and ``tokenauth``).

* ``GET /v1/token[?expires=SECONDS]`` mints a token for the caller's certificate. Not
  without TLS (401), and not for a request that itself carries a token (403): a narrowed
  token must not buy a wide one.
* ``GET /v1/token/key``: the public key tokens are checked with (for attenuating offline).
* ``POST /v1/token`` with ``{"token": "..."}``: what the token says, if it is valid here
  (401 if not). JSON, not text/plain: a browser form could post that from any page.

In ``authz: local`` there are no tokens: each route is 404 saying so.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from psik_api_core import LIMITS, ProblemCode, field_error
from psik_api_core.models import InvalidJSON, loads_input

from ..auth.token import CALLER_KEY, Caller, insecure, unauthorized
from ..auth.tokens import TokenAuthority, TokenError, rfc3339
from ..context import context
from ..errors import ApiError
from .bodies import read_body
from .params import bad_query


def _only_params(request: Request, allowed: set[str]) -> None:
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in allowed or name in seen:
            why = (
                "given more than once"
                if name in seen
                else f"unknown; allowed: {', '.join(allowed) or 'none'}"
            )
            raise bad_query(name, why)
        seen.add(name)


def _tokens(request: Request) -> TokenAuthority:
    tokens = context(request.app).tokens
    if tokens is None or not tokens.loaded:
        raise ApiError(
            ProblemCode.not_found, "this server (authz: local) has no tokens; they are for authz: token"
        )
    return tokens


def _caller(request: Request) -> Caller:
    caller = request.scope.get("state", {}).get(CALLER_KEY)
    if not isinstance(caller, Caller):
        raise unauthorized("this request carries no identity")
    return caller


async def mint_token(request: Request) -> Response:
    _only_params(request, {"expires"})
    tokens = _tokens(request)
    caller = _caller(request)
    if not caller.tls:
        raise insecure("minting a token")
    if caller.refused is not None:
        raise unauthorized(caller.refused)
    if caller.bearer is not None:
        raise ApiError(
            ProblemCode.forbidden,
            "a request carrying a token cannot mint one (a narrowed token must not buy a wide one); "
            "mint with the client certificate alone",
        )
    lifetime = None
    raw = request.query_params.get("expires")
    if raw is not None:
        try:
            lifetime = float(raw)
        except ValueError:
            lifetime = -1.0
        if not 0 < lifetime <= tokens.lifetime:
            raise bad_query(
                "expires", f"{raw[:32]!r} is not a number of seconds from 1 to {tokens.lifetime:g}"
            )
    minted = tokens.mint(caller.identity, lifetime)
    return JSONResponse({"token": minted.token, "user": minted.user, "expires": rfc3339(minted.expires)})


async def token_key(request: Request) -> Response:
    _only_params(request, set())
    return JSONResponse({"public_key": _tokens(request).public_key})


async def show_token(request: Request) -> Response:
    _only_params(request, set())
    tokens = _tokens(request)
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
    try:
        shown = tokens.show(data["token"])
    except TokenError as e:
        raise unauthorized(e.reason) from None
    expires = None if shown.expires is None else rfc3339(shown.expires)
    return JSONResponse({"user": shown.user, "expires": expires, "blocks": shown.blocks})
