"""Bearer tokens: which one the client sends and where, and narrowing one offline.

A token (``token=`` / ``$PSIK_API_TOKEN``) is a biscuit the server minted
(``GET /v1/token``); the client sends it as ``Authorization: Bearer``, and only where
nobody can read it on the way: over https, a UNIX socket, or plain http to this
machine's loopback (an ssh tunnel's end). A token for plain http to another host is
refused when the client is made, before anything is sent.

:func:`attenuate` appends a block of checks to a token (read-only, some jobs, an
earlier expiry) without asking the server: the holder of a token can narrow it and hand
the result to an agent. It needs biscuit-python (``pip install
'psik-api-client[tokens]'``), imported only then (it has no wheels for every Python).
"""

from __future__ import annotations

import datetime as dt
import importlib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from ._exceptions import InvalidRequestError
from ._inputs import path_jobid

ENV = "PSIK_API_TOKEN"

#: What a bearer token may hold (RFC 6750's b64token): biscuit's base64url and more.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

#: How long a token lives: seconds, a ``timedelta``; for attenuate also a datetime.
Lifetime = float | dt.timedelta


def resolve_token(
    token: str | None, base_url: str, *, uds: str | None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The token to send to ``base_url``: the argument, else ``$PSIK_API_TOKEN`` (an
    empty one is unset; spaces around it are dropped); None for none. Raises
    ``ValueError`` for a value that is not a token, or for a server whose plain http
    connection others could read it on (the message never holds the token)."""
    origin = "token="
    if token is None:
        token = environ.get(ENV, "").strip() or None
        origin = f"${ENV}"
        if token is None:
            return None
    if not isinstance(token, str) or not _B64TOKEN.fullmatch(token):
        raise ValueError(f"{origin} is not a token (one word of base64url, as `psik-api token` prints it)")
    if uds is None and not _private(httpx.URL(base_url)):
        raise ValueError(
            f"{origin}: a token is only sent over https:// (or to this machine); "
            f"{base_url} is plain http to another host, where it could be read on the way"
        )
    return token


def _private(url: httpx.URL) -> bool:
    """Whether what is sent to ``url`` is safe from eavesdroppers: https, or this
    machine's loopback."""
    if url.scheme == "https":
        return True
    host = url.host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def lifetime_seconds(expires: object, *, argument: str = "expires") -> int:
    """``expires`` (seconds or a ``timedelta``) as whole seconds > 0, rounded up."""
    if isinstance(expires, dt.timedelta):
        seconds = expires.total_seconds()
    elif isinstance(expires, int | float) and not isinstance(expires, bool):
        seconds = float(expires)
    else:
        raise InvalidRequestError(f"{argument}= is seconds or a timedelta, not {expires!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequestError(f"{argument}= is a lifetime > 0, not {expires!r}")
    return math.ceil(seconds)


def _deadline(expires: object) -> dt.datetime:
    """The time an attenuated token stops working: ``expires`` from now (seconds or a
    ``timedelta``), or a timezone-aware ``datetime``."""
    if isinstance(expires, dt.datetime):
        if expires.tzinfo is None or expires.utcoffset() is None:
            raise InvalidRequestError(
                "expires= needs a timezone (e.g. datetime.now(timezone.utc) + timedelta(hours=1))"
            )
        return expires
    try:
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime_seconds(expires))
    except OverflowError:  # past the year 9999: no narrowing at all
        raise InvalidRequestError(f"expires= is too far away: {expires!r} seconds") from None


def _biscuit() -> Any:
    """The biscuit_auth module, or an ImportError that says what to install."""
    try:
        return importlib.import_module("biscuit_auth")
    except ImportError as exc:
        raise ImportError(
            "narrowing a token needs biscuit-python: pip install 'psik-api-client[tokens]'"
        ) from exc


def attenuate(
    token: str,
    *,
    public_key: str,
    read_only: bool = False,
    jobs: str | Iterable[str] | None = None,
    expires: Lifetime | dt.datetime | None = None,
) -> str:
    """``token`` narrowed by a block of checks, offline (the server is not asked):

    * ``read_only``: only GET requests (``check if operation("GET")``);
    * ``jobs``: only the routes of these jobs (a job id or several); list routes are
      refused too, since they name no job;
    * ``expires``: an earlier end, in seconds or a ``timedelta`` from now, or an aware
      ``datetime`` (a later one than the token's has no effect).

    ``public_key`` is the server's (``api.token_key()``: ``"ed25519/<hex>"``): the
    token is verified with it before a block is added. Narrowing again narrows further.
    Raises :class:`InvalidRequestError` for a token or key that is not one, a token the
    key did not sign, or nothing to narrow; ``ImportError`` without biscuit-python.
    """
    checks: list[str] = []
    params: dict[str, Any] = {}
    if read_only:
        checks.append('check if operation("GET");')
    if jobs is not None:
        ids = [jobs] if isinstance(jobs, str) else list(jobs)
        if not ids:
            raise InvalidRequestError("jobs= names at least one job (a token for no job is of no use)")
        params["jobs"] = {path_jobid(jobid) for jobid in ids}
        checks.append("check if job($j), {jobs}.contains($j);")
    if expires is not None:
        params["expires"] = _deadline(expires)
        checks.append("check if time($t), $t < {expires};")
    if not checks:
        raise InvalidRequestError("nothing to narrow: give read_only=True, jobs= or expires=")
    if not isinstance(token, str) or not _B64TOKEN.fullmatch(token):
        raise InvalidRequestError(
            "token is not a token (one word of base64url, as `psik-api token` prints it)"
        )
    biscuit = _biscuit()
    try:
        key = biscuit.PublicKey(public_key)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(
            f"not a public key: {public_key!r} (ed25519/<hex>, as token_key() gives)"
        ) from exc
    try:
        parsed = biscuit.Biscuit.from_base64(token, key)
    except biscuit.BiscuitValidationError as exc:
        raise InvalidRequestError(
            f"the token does not verify with the public key {public_key} "
            f"(another server's token, or damaged): {exc}"
        ) from exc
    narrowed = parsed.append(biscuit.BlockBuilder("\n".join(checks), params))
    return str(narrowed.to_base64())
