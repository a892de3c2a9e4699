"""The token routes (``authz: token``; see :mod:`..auth.tokens` and :mod:`..auth.token`).

* ``GET /v1/token[?expires=SECONDS]`` mints a token for the caller's certificate. Not
  without TLS (401), and not for a request that itself carries a token (403): a narrowed
  token must not buy a wide one.
* ``GET /v1/token/key``: the public key tokens are checked with (for attenuating offline).
* ``POST /v1/token`` with ``{"token": "..."}``: what the token says, if it is valid here
  (401 if not). JSON, not text/plain: a browser form could post that from any page.

In ``authz: local`` there are no tokens: each route is 404 saying so.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from psik_api_core import ProblemCode

from ..auth.token import CALLER_KEY, Caller, insecure, unauthorized
from ..auth.tokens import TokenAuthority, TokenError, rfc3339
from ..context import context
from ..errors import ApiError
from .bodies import read_token_body
from .params import Params, bad_query


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


async def mint_token(request: Request, params: Params) -> Response:
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
    raw = params.text("expires")  # bounded by the settings: read here, after the checks above
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


async def token_key(request: Request, params: Params) -> Response:
    return JSONResponse({"public_key": _tokens(request).public_key})


async def show_token(request: Request, params: Params) -> Response:
    tokens = _tokens(request)
    token = await read_token_body(request)
    try:
        shown = tokens.show(token)
    except TokenError as e:
        raise unauthorized(e.reason) from None
    expires = None if shown.expires is None else rfc3339(shown.expires)
    return JSONResponse({"user": shown.user, "expires": expires, "blocks": shown.blocks})
