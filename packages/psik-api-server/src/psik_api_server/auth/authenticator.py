"""Who may call, in either ``authz`` mode: one middleware, one request-shape guard, one
:class:`Authenticator` per mode.

:class:`AuthMiddleware` (pure ASGI) refuses every websocket handshake and runs, for each
HTTP request, the guard both modes share (:mod:`.guard`) around the authenticator of the
``authz`` setting, in this order:

1. the request head (:func:`.guard.header_refusal`: a header the checks read given
   twice, a body framed two ways);
2. where the request comes from (:meth:`Authenticator.admit`: local mode serves only
   this host, by a loopback name; token mode takes any);
3. its ``Origin`` (:func:`.guard.origin_refusal`: a page in the user's browser);
4. who is calling (:meth:`Authenticator.identify`);
5. its body (:func:`.guard.body_refusal`: JSON, or an upload's own types).

So a stranger is refused before anything of its request is judged, and a body is only
judged for a caller known. The authenticators:

* ``local`` (:mod:`.local`): the server that is the user's own; the caller is the
  connection's peer uid (or shows the local secret where no uid can be told);
* ``token`` (:mod:`.token`): the server for other machines; the caller is named by its
  TLS client certificate, or by a biscuit bearer token.

Either refuses with an :class:`~psik_api_server.errors.ApiError` (answered as a problem
here, the request going no further) or puts the :class:`~psik_api_core.Principal` the
handlers act for in ``scope["state"]`` (:func:`principal` reads it). An authenticator is
registered under its mode's name (:func:`register`) in the module of that name in this
package, imported the first time the mode is asked for: adding a mode is one module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from psik_api_core import Principal, ProblemCode

from ..errors import ApiError
from ..http.problems import problem_response
from ..settings import Settings
from .guard import body_refusal, header_refusal, origin_refusal, refuse_websocket

#: Where an authenticator puts the request's principal (in ``scope["state"]``).
PRINCIPAL_KEY = "psik_api.principal"


class Authenticator(Protocol):
    """What one ``authz`` mode checks of a request (the module doc). Both steps refuse by
    raising :class:`~psik_api_server.errors.ApiError`; ``headers`` are the request's, by
    lower-case name (the last of a repeated one)."""

    def admit(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Refuse a request from where this mode serves no one (before its Origin is read)."""
        ...

    def identify(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Refuse a caller this mode does not serve, or put who it is (and the principal,
        where the route needs one) in ``scope["state"]``."""
        ...


A = TypeVar("A", bound=type[Authenticator])

#: The authenticator class of each ``authz`` mode (built with no arguments).
AUTHENTICATORS: dict[str, type[Authenticator]] = {}


def register(mode: str) -> Callable[[A], A]:
    """Class decorator: the authenticator of ``authz: <mode>``."""

    def add(cls: A) -> A:
        AUTHENTICATORS[mode] = cls
        return cls

    return add


def authenticator_class(mode: str) -> type[Authenticator]:
    """The authenticator class of ``authz: <mode>``, from this package's module of that name."""
    if mode not in AUTHENTICATORS:
        importlib.import_module(f"{__package__}.{mode}")
    return AUTHENTICATORS[mode]


class AuthMiddleware:
    """Pure ASGI middleware: the guard and ``authenticator`` (the module doc). The
    authenticator is built with the middleware stack (the app's first call)."""

    def __init__(self, app: ASGIApp, authenticator: type[Authenticator]) -> None:
        self.app = app
        self.authenticator = authenticator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await refuse_websocket(scope, receive, send)
            return
        if scope["type"] == "http":
            try:
                self.authenticate(scope)
            except ApiError as error:
                await problem_response(error, scope.get("path"))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def authenticate(self, scope: Scope) -> None:
        """Refuse (:class:`ApiError`) or let the request through, its caller known."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = header_refusal(scope.get("headers", []))
        if refused is not None:
            raise refused
        self.authenticator.admit(scope, headers)
        refused = origin_refusal(scope, headers)
        if refused is not None:
            raise refused
        self.authenticator.identify(scope, headers)
        refused = body_refusal(scope, headers)
        if refused is not None:
            raise refused


def auth_middleware(settings: Settings) -> Middleware:
    """The app's auth middleware for ``settings.authz``."""
    return Middleware(AuthMiddleware, authenticator=authenticator_class(settings.authz))


def principal(request: Request) -> Principal:
    """Who the request acts for: what the authenticator found (local mode: the user, on
    every request it lets through; token mode: the certificate's user, or the bearer
    token's). A request it left none is refused, never taken as local."""
    found = request.scope.get("state", {}).get(PRINCIPAL_KEY)
    if isinstance(found, Principal):
        return found
    raise ApiError(ProblemCode.unauthorized, "this request carries no identity (authz: token)")
