"""Who may call: ``authz: local``, the server that is the user's own (``authz: token``,
for other machines, is ``tokenauth``; both end in :func:`principal`).

Every request passes :class:`LocalOnly`, which refuses, in this order:

0. a ``Host``, ``Content-Type`` or ``Origin`` header given more than once (400, naming
   it): the checks below read one value, and whatever reads the request after them (a
   proxy, the framework, a handler) may read the other;
1. a request that reached a socket listening on a public address (403; ``psik-api-server
   serve`` refuses to listen there at all, ``uvicorn --host 0.0.0.0`` is refused here)
   or that comes from another host (403);
2. a ``Host`` that is not a loopback name: ``localhost``, ``127.0.0.0/8`` or ``[::1]``,
   any port (403: DNS rebinding), and an ``Origin`` that is not the server's own
   ``scheme://Host`` (403: a page in the user's browser);
3. a caller that is another user (403). Over a UNIX socket the kernel says who it is
   (``SO_PEERCRED``); over loopback TCP, the owner of the client's socket (see
   ``peer``). Where that cannot be told (a system without those tables, e.g. macOS),
   the request must carry the local secret (401 otherwise; see :class:`LocalSecrets`);
4. a body a browser form could send without a preflight (``text/plain``, urlencoded,
   multipart) on any route, and any body that is not JSON (``application/json`` or
   ``*/*+json``): 415. Every route takes JSON or nothing, except the file uploads
   (:func:`upload_kind`): a raw upload takes any other type, or none (``curl
   --upload-file``); the multipart upload only ``multipart/form-data``, which step 2
   has already refused from another origin's page.

No CORS headers are ever sent. Forwarded headers (``X-Forwarded-For``, ``Forwarded``,
``X-Real-IP``) are never read: the peer is the connection's own.

Which connections: the server's connections carry their socket (``serve``'s protocol
class, :mod:`psik_api_server.serving.uvicorn_seam`; the hooks ``main:app`` installs on uvicorn and
hypercorn: README, "What each launcher gets") and get every check. A request with
no socket behind it comes from an in-process ASGI transport (``httpx.ASGITransport``):
code already running in the server's own process, as its owner, so it gets no uid and no
Host check (its Host is a made-up name like ``testserver``); the other checks apply. A
request is taken as in-process only when it carries no connection *and* its
``scope["server"]`` is a host name without a port, which names no socket. Every other
request without its connection (another ASGI server) is checked as a real one: a host
name with a port is a socket too (a launcher reporting the name it bound); an IP address
with a port is looked up per request; no port (a UNIX socket: ``None``, or its path) or
an address of another shape (``()``, a one-element tuple) cannot be told and is refused.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import pwd
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from psik_api_core import LOCAL_USER, Principal, ProblemCode, field_error

from ..context import context
from ..errors import ApiError, StartupError
from ..http.problems import problem_response
from ..jobs import statedir
from ..serving.hypercorn_seam import install_hypercorn_hook
from ..settings import Settings, default_data_dir
from .peer import Connection, connection_of

_logger = logging.getLogger(__name__)

LOCAL_PRINCIPAL = Principal(user=LOCAL_USER)
#: Where ``tokenauth.TokenAuth`` puts the request's principal (in ``scope["state"]``).
PRINCIPAL_KEY = "psik_api.principal"

#: The request header carrying the local secret (not Authorization: tokens will use it).
SECRET_HEADER = "Psik-Local-Secret"  # noqa: S105 - a header's name, not a secret


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and others."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_local_connection(scope: Scope) -> bool:
    """A UNIX-socket connection (uvicorn reports no client address) or a loopback one."""
    client = scope.get("client")
    if client is None:
        return True
    return is_loopback_host(str(client[0]))


_PORT = re.compile(r"(:[0-9]{1,5})?")


def is_loopback_authority(host: str) -> bool:
    """A ``Host`` header naming this machine by a name no DNS answer can change:
    ``localhost``, an IPv4 loopback address, ``[::1]``; with any port or none."""
    host = host.lower()
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or not _PORT.fullmatch(port):
            return False
        try:
            return ipaddress.IPv6Address(name).is_loopback
        except ValueError:
            return False
    name, _, port = host.partition(":")
    if not _PORT.fullmatch(host[len(name) :]):
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


#: An ASGI address: ``(host, port)``; the port is None for a UNIX socket.
Address = tuple[str, int | None]


def _address(scope: Scope, key: str) -> Address | None:
    """``scope[key]`` (``"server"`` or ``"client"``) as an :data:`Address`, None when the
    server reports none. Any other shape (``()``, a one-element tuple, a port that is
    not a number) is refused: a request must not be judged on an address half read."""
    value = scope.get(key)
    if value is None:
        return None
    if isinstance(value, tuple | list) and len(value) >= 2:
        host, port = value[0], value[1]
        if (
            isinstance(host, str)
            and host
            and (port is None or (isinstance(port, int) and not isinstance(port, bool)))
        ):
            return host, port
    raise ApiError(
        ProblemCode.forbidden,
        f"this server (authz: local) cannot tell who is calling: the ASGI server reports the "
        f"connection's {key} address as {str(value)[:80]!r}, which is not (host, port)",
    )


def _made_up(server: Address | None) -> bool:
    """Whether ``scope["server"]`` names no socket: a host name with no port, as an
    in-process transport makes up (httpx's ``("testserver", None)``). A real socket
    reports an IP address with its port, or a UNIX socket (no address, or its path): a
    host name *with* a port is a server reporting the name it was told to bind, a
    socket all the same."""
    if server is None or server[1] is not None:
        return False
    return _ip(server[0]) is None and not server[0].startswith("/")


# ---- the local secret: who the caller is, where the uid cannot be told ----


def runtime_dir() -> Path:
    """Where local secrets live: ``$XDG_RUNTIME_DIR/psik_api``, else
    ``$XDG_DATA_HOME/psik_api/runtime`` (``~/.local/share/psik_api/runtime``). The
    client looks in both (``psik_api_client._local_secret``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "psik_api"
    return default_data_dir() / "runtime"


class LocalSecrets:
    """The secret a caller over loopback TCP shows when its uid cannot be told
    (Jupyter's way, made invisible: the client finds it by itself).

    One secret per listening port, made at the first request that needs it, as
    ``local-PORT.json`` (``{"port", "pid", "secret"}``, mode 0600, in a 0700
    directory); it is a new random secret for every server run, so the file a killed
    server left behind is worthless to whoever listens on that port next, and it is
    removed when the server stops.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or runtime_dir()
        self._secrets: dict[int, str] = {}

    def path(self, port: int) -> Path:
        return self.directory / f"local-{port}.json"

    def secret(self, port: int, host: str = "127.0.0.1") -> str:
        """This run's secret for ``port``, written to :meth:`path` the first time, with
        the address the server listens on: the client sends it to that address only,
        never to whoever else may listen on the same port of another loopback address."""
        if port not in self._secrets:
            secret = secrets.token_urlsafe(32)
            self._write(port, host, secret)
            self._secrets[port] = secret
        return self._secrets[port]

    def check(self, port: int, given: bytes | None, host: str = "127.0.0.1") -> bool:
        """Whether ``given`` is the secret for ``port`` (a constant-time compare)."""
        expected = self.secret(port, host).encode()
        return given is not None and hmac.compare_digest(given, expected)

    def _write(self, port: int, host: str, secret: str) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A directory someone else owns or can write to (a shared XDG_RUNTIME_DIR) could
        # swap or hold open the file: refuse it rather than hand them the secret.
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(
                13, f"{self.directory} must be a directory of yours with mode 0700 (chmod 700 it)"
            )
        path = self.path(port)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            doc = {"port": port, "host": host, "pid": os.getpid(), "secret": secret}
            os.write(fd, json.dumps(doc).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def remove_all(self) -> None:
        """Remove the files this run wrote (those still holding its secret)."""
        for port, secret in self._secrets.items():
            with contextlib.suppress(OSError, ValueError):
                path = self.path(port)
                if json.loads(path.read_text(encoding="utf-8")).get("secret") == secret:
                    path.unlink()
        self._secrets.clear()


# ---- the checks ----

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


def _has_body(headers: dict[str, str]) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))


#: The headers the checks read, which must come once: (lower-case name, as named in a refusal).
_ONCE = {b"host": "Host", b"content-type": "Content-Type", b"origin": "Origin"}


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


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class LocalOnly:
    """Pure ASGI middleware: the checks of the module doc, before anything else runs.

    The peer lookup and the local secrets are the app's (``context(app).peer_lookup``,
    ``context(app).local_secrets``; tests swap them). Building it hooks hypercorn's
    connections (idempotent; hypercorn has no protocol class to pass, and ``serve``
    never runs it), so that they carry their socket; uvicorn's get theirs from whoever
    runs the app (module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        install_hypercorn_hook()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await refuse_websocket(scope, receive, send)
            return
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                await problem_response(error, scope.get("path"))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> ApiError | None:
        """Why this request is refused, or None."""
        refused = header_refusal(scope.get("headers", []))
        if refused is not None:
            return refused
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        conn = connection_of(scope)
        if conn is not None:
            local, peer = conn.local, conn.peer
        else:
            try:
                local, peer = _address(scope, "server"), _address(scope, "client")
            except ApiError as e:
                return e
        in_process = conn is None and _made_up(local)
        if in_process:
            error = self._peer_address(peer)
        else:
            error = self._socket(conn, local, peer) or self._host(headers.get("host"))
        error = error or self._origin(scope, headers)
        if error is None and not in_process:
            error = self._caller(conn, local, peer, scope, headers)
        return error or self._body(scope, headers)

    @staticmethod
    def _peer_address(client: Any) -> ApiError | None:
        if not (isinstance(client, tuple | list) and client) or is_loopback_host(str(client[0])):
            return None
        return ApiError(
            ProblemCode.forbidden,
            f"this server (authz: local) serves only this host; {client[0]} is not local",
        )

    def _socket(self, conn: Connection | None, local: Any, peer: Any) -> ApiError | None:
        """The socket's own ends: it must listen on loopback (or be a UNIX socket) and
        the peer must be on this host. Forwarded headers change neither."""
        if conn is not None and conn.is_unix:
            return None
        ip = _ip(str(local[0])) if isinstance(local, tuple | list) and local else None
        if ip is not None and not ip.is_loopback:
            return ApiError(
                ProblemCode.forbidden,
                f"this server (authz: local) listens on {ip}, which is not loopback; "
                "it serves only 127.0.0.1, ::1 or a UNIX socket (run `psik-api-server serve`)",
            )
        return self._peer_address(peer)

    @staticmethod
    def _host(host: str | None) -> ApiError | None:
        if host is not None and is_loopback_authority(host):
            return None
        said = "no Host header" if host is None else f"Host {host!r}"
        return ApiError(
            ProblemCode.forbidden,
            f"{said} is not this machine's loopback name; this server (authz: local) answers "
            "only requests for localhost, 127.0.0.1 or [::1]",
        )

    @staticmethod
    def _origin(scope: Scope, headers: dict[str, str]) -> ApiError | None:
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

    def _caller(
        self, conn: Connection | None, local: Any, peer: Any, scope: Scope, headers: dict[str, str]
    ) -> ApiError | None:
        """The caller must be the server's own uid (or show the secret where no uid can
        be told over TCP)."""
        state = context(scope["app"])
        lookup = state.peer_lookup
        me = os.geteuid()
        if conn is not None:
            uid = conn.peer_uid(lookup)
            unix = conn.is_unix
        else:  # a server that does not tell us its connection: one lookup per request
            # No port: a UNIX socket (or a server that would not say): nobody to ask.
            unix = local is None or local[1] is None
            tcp = not unix and peer is not None and peer[1] is not None
            uid = lookup.tcp_uid(peer, local) if tcp else None
        if uid == me:
            return None
        if uid is not None:
            return ApiError(
                ProblemCode.forbidden,
                f"this server (authz: local) serves only its owner, {_user(me)}; the caller is {_user(uid)}",
            )
        if unix or not (isinstance(local, tuple | list) and len(local) >= 2 and isinstance(local[1], int)):
            return ApiError(
                ProblemCode.forbidden,
                "this server (authz: local) cannot tell which user is calling over this socket; "
                "serve it with `psik-api-server serve --uds PATH`",
            )
        secrets_ = state.local_secrets
        port = int(local[1])
        given = headers.get(SECRET_HEADER.lower())
        try:
            if secrets_.check(port, None if given is None else given.encode("latin-1"), str(local[0])):
                return None
        except OSError as e:
            return ApiError(
                ProblemCode.forbidden,
                "this server (authz: local) cannot tell which user is calling here, and cannot write "
                f"the local secret to {secrets_.path(port)}: {e.strerror}",
            )
        return ApiError(
            ProblemCode.unauthorized,
            f"this server (authz: local) cannot tell which user is calling here; send the secret "
            f"in {secrets_.path(port)} as the {SECRET_HEADER} header (psik-api-client does this by itself)",
            headers={"WWW-Authenticate": f'{SECRET_HEADER} realm="psik-api"'},
        )

    @staticmethod
    def _body(scope: Scope, headers: dict[str, str]) -> ApiError | None:
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
            f"{scope.get('method')} {scope.get('path')} takes JSON "
            f"(Content-Type: application/json), not {said}",
        )


def principal(request: Request) -> Principal:
    """Who the request acts for. Local mode: everyone who got past :class:`LocalOnly`
    is the user. Token mode: what ``tokenauth.TokenAuth`` worked out (the certificate's
    user, or the bearer token's); a request it left none is refused, never local."""
    found = request.scope.get("state", {}).get(PRINCIPAL_KEY)
    if isinstance(found, Principal):
        return found
    if context(request.app).settings.authz == "local":
        return LOCAL_PRINCIPAL
    raise ApiError(ProblemCode.unauthorized, "this request carries no identity (authz: token)")


# ---- the prefix is the owner's alone ----


def _access(mode: int) -> str:
    who = [name for bits, name in ((0o070, "your group"), (0o007, "other users")) if mode & bits]
    return " and ".join(who)


def check_private_dir(path: Path, what: str = "prefix") -> None:
    """Refuse (:class:`StartupError`) a directory that is not the owner's alone, as ssh's
    StrictModes does: ``path`` must belong to this uid with no group or other access,
    and no directory above it may be writable by every user (who could swap it for
    their own) unless it is sticky (``/tmp``). A directory above that only a group may
    write, or that belongs to another user (a project directory, often), is logged as a
    warning: its members could do the same. A ``path`` that does not exist is made here,
    0700, and then checked like any other: had it been left to be made later, another
    user could make it in between (in /tmp, say) and own every job of ours. A component
    of ``path`` that is a symbolic link of another user's (in /tmp: theirs to re-point at
    will) is refused too. The message names the mode and the fix."""
    me = os.geteuid()
    if (link := _foreign_link(path, me)) is not None:
        raise StartupError(
            f"{what} {path} goes through {link}, a symbolic link of {_user(link.lstat().st_uid)}'s: "
            f"its owner can point it elsewhere at any time; use a {what} whose path is yours"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)  # not exist_ok: whoever made one first, it is checked below
        st = path.stat()
    except OSError as e:
        raise StartupError(f"{what} {path}: cannot be made or read: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{what} {path} is not a directory")
    if st.st_uid != me:
        raise StartupError(
            f"{what} {path} belongs to {_user(st.st_uid)}, not to you ({_user(me)}): "
            "its owner controls your jobs' scripts; use a prefix of your own"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise StartupError(
            f"{what} {path} is mode {mode:04o}: {_access(mode)} can reach your jobs' scripts and "
            f"secrets; chmod 700 {path}"
        )
    for parent in path.resolve().parents:
        try:
            pst = parent.stat()
        except OSError:
            continue
        pmode = stat.S_IMODE(pst.st_mode)
        if pmode & stat.S_ISVTX:
            continue  # only a file's owner may rename it there
        if pmode & 0o002:
            raise StartupError(
                f"{what} {path} is inside {parent}, which is mode {pmode:04o}: any user could "
                f"replace your {what}; chmod o-w {parent}, or use a {what} in a directory only you can write"
            )
        if pmode & 0o020 or pst.st_uid not in (me, 0):
            who = "its group" if pmode & 0o020 else _user(pst.st_uid)
            _logger.warning(
                "%s %s is inside %s (mode %04o, %s): %s could replace your %s",
                what, path, parent, pmode, _user(pst.st_uid), who, what,
            )  # fmt: skip
            return  # one warning: the directories above it matter no more


def _foreign_link(path: Path, me: int) -> Path | None:
    """The first component of ``path`` that is a symbolic link owned by neither ``me``
    nor root, if any (components that do not exist yet end the walk)."""
    current = Path(path.absolute().anchor)
    for part in path.absolute().parts[1:]:
        current = current / part
        try:
            st = current.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (me, 0):
            return current
    return None


def check_private_file(path: Path, what: str) -> None:
    """Refuse a file (the index) that others can read: the mode and the fix."""
    try:
        st = path.stat()
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise StartupError(f"{what} {path} is mode {mode:04o}: {_access(mode)} can read it; chmod 600 {path}")


class LocalLifespan:
    """Pure ASGI middleware on the lifespan: before the app starts, the prefix, the state
    directory (statedir.prepare) and the index must be the owner's alone
    (:func:`check_private_dir`), so that also
    ``uvicorn psik_api_server.main:app`` refuses a shared prefix; when the app stops,
    the local secrets it wrote are removed. A refusal is ``lifespan.startup.failed``
    with the one-line reason (also kept in ``context(app).startup_error``) and the
    :class:`StartupError` raised."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        first = await receive()
        if first["type"] == "lifespan.startup":
            try:
                check_private_dir(self.settings.prefix)
                # Before the index's mode is read: a link there is refused as a link.
                statedir.prepare(self.settings)
                check_private_file(self.settings.database_path, "index")
            except StartupError as e:
                context(scope["app"]).startup_error = e
                # As starlette's own lifespan: say it failed, then raise (uvicorn stops
                # on the first, asgi_lifespan on the second).
                await send({"type": "lifespan.startup.failed", "message": str(e)})
                raise
        pending: list[Message] = [first]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        async def cleanup(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                with contextlib.suppress(AttributeError):
                    context(scope["app"]).local_secrets.remove_all()
            await send(message)

        await self.app(scope, replay, cleanup)
