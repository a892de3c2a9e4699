"""Who may call: ``authz: token``, the server that serves other machines.

Around the request-shape guard both modes share (:mod:`.authenticator`), :class:`TokenAuthenticator`
works out the caller and, on the routes that need one, the
:class:`~psik_api_core.Principal` the handlers act for (:func:`.authenticator.principal`):

* **TLS** (the app runs under ``certified serve``, which puts the connection's
  ``transport`` in the scope): the caller is named by its client certificate as
  certified names it, ``uid:<userId>``, else ``cn:<commonName>``, when the CA that
  signed it may vouch for that name (:mod:`psik_api_server.auth.certnames`: bob's own CA cannot sign for
  alice); a certificate that names nobody believable is 401. A request may carry
  ``Authorization: Bearer <biscuit>``: it then acts for the token's user, within the
  token's checks (``tokens``); a token that is not valid is 401, one whose checks
  forbid this request 403.
* **Insecure** (no TLS): the caller is ``addr:<ip>`` and is trusted with nothing: every
  ``/v1/jobs*`` and ``/v1/events*`` route, and minting a token, is 401 with the way out.

``/healthz``, ``/``, ``/openapi.json``, ``/v1/backends*``, ``/v1/token/key`` and
``POST /v1/token`` (which only shows a token given to it) need no caller; nor does
``/v1/callback``, whose reports are signed per job (``callbacks``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

from psik_api_core import Principal, ProblemCode, is_jobid

from ..context import context
from ..errors import ApiError
from .authenticator import PRINCIPAL_KEY, register
from .certnames import CertificateRefused
from .tokens import TokenError

#: Where the README says how to serve with TLS.
TLS_HELP = "see the README, 'Serving other machines: TLS and tokens'"

#: Every path under these (a prefix, not a whole-path pattern: a route's ``$`` also
#: matches before a trailing newline, ``/v1/jobs%0A``). ``/metrics`` then also needs its
#: caller in ``metrics_readers`` (http.metrics), and a token narrowed to jobs fails here.
_PROTECTED = re.compile(r"/v1/(jobs|events|groups)|/metrics")
_JOB = re.compile(r"/v1/jobs/([^/]+)(/.*)?", re.DOTALL)
CALLER_KEY = "psik_api.caller"
#: ``GET /v1/events`` names no job: a token narrowed to some jobs is not refused there,
#: each event is checked against it instead (the callable under ``JOB_CHECK_KEY``).
_EVENTS = "/v1/events"
JOB_CHECK_KEY = "psik_api.job_check"
#: Jobs whose verdict one such stream remembers (a token's checks take ~0.1 ms each).
_CHECKS_KEPT = 10_000


@dataclass(frozen=True)
class Caller:
    """Who is on the other end: ``identity`` (``uid:``, ``cn:`` or ``addr:``), whether
    over TLS, and the bearer token sent, if any."""

    identity: str
    tls: bool
    bearer: str | None
    #: Why the client certificate names nobody (TLS callers only; then ``identity`` is
    #: the address).
    refused: str | None = None


#: ``Bearer <token>``: one space, a token of base64url characters (biscuit's alphabet).
_BEARER = re.compile(r"Bearer ([A-Za-z0-9_=+/-]+)", re.IGNORECASE)


def _bearer(scope: Scope) -> str | None:
    """The bearer token sent, if any. An ``Authorization`` header in any other shape, or
    given twice, is refused: ignoring it would run the request with the certificate's
    full rights when the caller meant a narrower token."""
    given = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
    if not given:
        return None
    if len(given) > 1:
        raise ApiError(ProblemCode.bad_request, "the Authorization header is given more than once")
    found = _BEARER.fullmatch(given[0].decode("latin-1").strip())
    if found is None:
        raise unauthorized("the Authorization header must be `Bearer <token>` (a biscuit, base64url)")
    return found.group(1)


def caller_of(scope: Scope) -> Caller:
    """The caller of a request (see the module doc)."""
    bearer = _bearer(scope)
    transport: Any = scope.get("transport")  # certified's patch of uvicorn's h11 protocol
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    client = scope.get("client")
    address = f"addr:{client[0] if client else 'unknown'}"
    if ssl_object is None:
        return Caller(address, False, bearer)
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return Caller(address, True, bearer, "no client certificate was presented")
    names = context(scope["app"]).client_names
    assert names is not None  # token mode: create_app made it
    try:
        return Caller(names.identity(der), True, bearer)
    except CertificateRefused as e:
        return Caller(address, True, bearer, str(e))


def _jobid(path: str) -> str | None:
    found = _JOB.fullmatch(path)
    return found.group(1) if found and is_jobid(found.group(1)) else None


def unauthorized(detail: str) -> ApiError:
    return ApiError(ProblemCode.unauthorized, detail, headers={"WWW-Authenticate": 'Bearer realm="psik-api"'})


def insecure(what: str) -> ApiError:
    return unauthorized(
        f"{what} needs a TLS client certificate, and this server (authz: token) runs without TLS; "
        f"run it under `certified serve psik_api_server.main:app https://...` ({TLS_HELP})"
    )


@register("token")
class TokenAuthenticator:
    """The caller of the module doc."""

    def admit(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Any host may call: who it is decides (:meth:`identify`)."""

    def identify(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Refuse (:class:`ApiError`) or put the caller (and the principal, on the
        routes that need one) in ``scope["state"]``."""
        caller = caller_of(scope)
        state = scope.setdefault("state", {})
        state[CALLER_KEY] = caller
        path = str(scope.get("path", ""))
        if not _PROTECTED.match(path):
            return
        if not caller.tls:
            raise insecure(f"{path}")
        if caller.refused is not None:
            raise unauthorized(caller.refused)
        if caller.bearer is None:
            state[PRINCIPAL_KEY] = Principal(caller.identity)
            return
        tokens = context(scope["app"]).tokens
        assert tokens is not None  # token mode: create_app made it
        method = str(scope.get("method", "GET"))
        operation = "GET" if method == "HEAD" else method
        try:
            user = tokens.authorize(caller.bearer, operation, _jobid(path))
        except TokenError as e:
            if e.status == 403 and path == _EVENTS and operation == "GET":
                user = self._per_job(tokens, caller.bearer, state)
            elif e.status == 403:
                raise ApiError(ProblemCode.forbidden, e.reason) from None
            else:
                raise unauthorized(e.reason) from None
        state[PRINCIPAL_KEY] = Principal(user)

    @staticmethod
    def _per_job(tokens: Any, bearer: str, state: dict[str, Any]) -> str:
        """The user of a token that names jobs, for the whole event stream: its events
        are each checked against the token (``state[JOB_CHECK_KEY]``)."""
        try:
            user = str(tokens.show(bearer).user)
        except TokenError as e:
            raise unauthorized(e.reason) from None
        verdicts: dict[str, bool] = {}

        def may_read(jobid: str) -> bool:
            found = verdicts.get(jobid)
            if found is None:
                try:
                    tokens.authorize(bearer, "GET", jobid)
                    found = True
                except TokenError:
                    found = False
                if len(verdicts) >= _CHECKS_KEPT:
                    verdicts.clear()
                verdicts[jobid] = found
            return found

        state[JOB_CHECK_KEY] = may_read
        return user
