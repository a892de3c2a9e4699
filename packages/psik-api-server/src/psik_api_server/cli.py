"""``psik-api-server serve [--config FILE] [--host H] [--port P] [--uds PATH]``, and
``psik-api-server check [--config FILE]``: whether ``serve`` would start and work
(:mod:`psik_api_server.preflight`).

Runs uvicorn on the app with forwarded headers ignored (``proxy_headers=False``) and its
own HTTP protocol class (``uvicorn.Config(http=...)``, :mod:`psik_api_server.serving.uvicorn_seam`: the
peer's uid at accept, the connection limits; uvicorn's classes are not patched). In
``authz: local`` mode it refuses to listen anywhere but loopback or a UNIX socket, and
the socket is created readable and writable by its owner only (uvicorn's own is 0666).
The listening socket is made before anything else, so that a port already in use stops
start-up before the prefix or the index is created. Ctrl-C (once, or twice in a hurry)
ends it without a traceback, wherever it comes (exit status 130): this module imports
only the standard library, and the rest is imported inside :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import preflight  # the standard library only, at import


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psik-api-server", description="The psik-api job server.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (default: local backend on 127.0.0.1:8000)")
    serve.add_argument(
        "--config", help="config file (default: $PSIK_API_CONFIG, $VIRTUAL_ENV/etc/psik_api.json)"
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--uds", help="listen on this UNIX socket instead of TCP")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text: human-readable lines; json: one JSON object per line and one access line "
        "per request (default: the config's log_format, else text)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive(int),
        help="open connections at most; at the limit the one idle longest, else the one whose "
        "request body stalled longest, is closed (default 1000)",
    )
    serve.add_argument(
        "--header-timeout",
        type=_positive(float),
        help="seconds a connection has to send its request head, and the longest a request body "
        "may stall; after that long a body must average 1 KiB/s (default 10)",
    )
    serve.add_argument(
        "--keep-alive-timeout",
        type=_positive(int),
        help="seconds an idle keep-alive connection stays open (default 5)",
    )
    preflight.add_arguments(
        sub.add_parser("check", help="say whether serve would start and work with this config")
    )
    return p


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _answers(path: Path) -> bool:
    """True if something listens on the UNIX socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _unix_socket(path: Path) -> socket.socket:
    """A listening UNIX socket at ``path`` that only its owner may connect to."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            if _answers(path):
                raise SystemExit(f"psik-api-server: {path} is in use by a running server; not taking it over")
            path.unlink()  # a stale socket from an earlier run
        else:
            raise SystemExit(f"psik-api-server: {path} exists and is not a socket; not replacing it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(512)
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn binds one (it listens once uvicorn
    starts), or :class:`StartupError` saying why not: the port is in use, say."""
    from .errors import StartupError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, as getaddrinfo gives uvicorn: asyncio sets TCP_NODELAY only on
    # connections accepted from a socket that says it is TCP. With proto 0, Nagle held
    # each response's body until the client's delayed ACK: 40 ms per keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        where = f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"
        why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise StartupError(f"cannot listen on {where}: {why}") from None
    sock.set_inheritable(True)
    return sock


#: The listen backlog asked for (uvicorn's default); limits.fit may lower it.
_BACKLOG = 2048


class _QuietStartupError(logging.Filter):
    """Drops uvicorn's traceback of a :class:`StartupError` and its log of the same
    reason (from ``lifespan.startup.failed``): ``serve`` says it in one line."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.state = state

    def filter(self, record: logging.LogRecord) -> bool:
        from .errors import StartupError

        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        said = self.state.startup_error
        # starlette hands the lifespan's traceback to uvicorn as the failure's message.
        return (
            not isinstance(exc, StartupError)
            and f"{StartupError.__module__}.{StartupError.__qualname__}" not in message
            and (said is None or message != str(said))
        )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .auth.loopback import is_loopback_host
    from .context import context
    from .errors import StartupError
    from .serving import limits
    from .serving.request_log import configure_logging, uvicorn_log_config
    from .serving.uvicorn_seam import ConnectionHooks
    from .settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"psik-api-server: config error: {e}", file=sys.stderr)
        return 2
    overrides = {
        "max_connections": args.max_connections,
        "header_timeout": args.header_timeout,
        "keep_alive_timeout": args.keep_alive_timeout,
        "log_format": args.log_format,
    }
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    # Each line names its request (serving.request_log); json: every line is an object.
    configure_logging(args.log_level, settings.log_format)
    json_log = settings.log_format == "json"
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    if settings.authz == "local" and not args.uds and not is_loopback_host(host):
        print(
            "psik-api-server: authz 'local' serves only loopback or a UNIX socket; "
            f"refusing to listen on {host}",
            file=sys.stderr,
        )
        return 2
    path = Path(args.uds).expanduser() if args.uds else None
    try:
        # The socket first: a port in use must stop us before anything is on disk.
        sockets = [_unix_socket(path) if path else _tcp_socket(host, port)]
    except StartupError as e:
        print(f"psik-api-server: cannot start: {e}", file=sys.stderr)
        return 3
    if path is None:
        port = sockets[0].getsockname()[1]  # --port 0 picked one
    connection_limits, backlog = limits.start(settings, backlog=_BACKLOG)
    app = create_app(settings)
    # Our own protocol class, uvicorn's left as they are: every connection carries its
    # socket (the uid check) and the connection limits are enforced (serving.uvicorn_seam).
    hooks = ConnectionHooks(connection_limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        proxy_headers=False,  # never trust X-Forwarded-For & co.
        server_header=False,
        log_level=args.log_level,
        log_config=uvicorn_log_config(settings.log_format),
        access_log=not json_log,  # json: the app's access line (RequestLog) instead
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive_timeout,
        backlog=backlog,
        http=hooks.protocol(),
        # No limit_concurrency: it counts idle connections and answers 503 past it, so
        # idle sockets would shut real clients out. The hooks cap connections.
    )
    server = _server_class()(config)
    server.before_shutdown = lambda: context(app).service.events.close()
    repeats = limits.quiet_repeats()  # after uvicorn.Config, which configures logging
    bracketed = f"[{host.strip('[]')}]" if ":" in host else host
    where = f"unix:{args.uds}" if args.uds else f"http://{bracketed}:{port}"
    starting = (
        f"starting on {where}; jobs in {settings.prefix}, "
        f"the server's own files in {settings.state_directory}"
    )
    if json_log:  # a log collector reading stderr gets JSON only
        logging.getLogger(__name__).info("%s", starting)
    else:
        print(f"psik-api-server: {starting}", file=sys.stderr)
    quiet = _QuietStartupError(context(app))
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn's way of saying the lifespan did not start
        if context(app).startup_error is None:
            raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        repeats.flush()
        for sock in sockets:
            sock.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if context(app).startup_error is not None:
        print(f"psik-api-server: cannot start: {context(app).startup_error}", file=sys.stderr)
        return 3
    return 0


def _server_class() -> Any:
    """uvicorn's server, but a second Ctrl-C still lets the app shut down. uvicorn takes
    one to mean "force quit": it stops waiting for connections and tasks (kept here) and
    also skips the app's lifespan shutdown, which asyncio then cancels as it ends the
    loop: a ``CancelledError`` traceback per pending step, and the app's own clean-up
    (the job service, the prefix lock, the local secret) never runs."""

    import uvicorn

    class Server(uvicorn.Server):
        #: Called as shutdown begins, before uvicorn waits for the open connections (the
        #: app's event streams end there, each with a comment saying why).
        before_shutdown: Any = None

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if self.before_shutdown is not None:
                self.before_shutdown()
            await super().shutdown(sockets=sockets)
            lifespan = getattr(self, "lifespan", None)
            done = getattr(lifespan, "shutdown_event", None)
            if self.force_exit and lifespan is not None and done is not None and not done.is_set():
                await lifespan.shutdown()

    return Server


#: The exit status of a server ended by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "check":
            return preflight.run(args)
    except KeyboardInterrupt:
        # Ctrl-C during start-up (an import, the index), or after uvicorn's shutdown:
        # uvicorn raises again the signal it caught, once it has shut down. Either way
        # the end that was asked for, not a failure: no traceback. Another Ctrl-C from
        # now on changes nothing: left to Python, whose finalization puts SIGINT back to
        # its default action, it would kill the ending process (no status 130).
        with contextlib.suppress(ValueError):  # not the main thread: Python's rules
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return INTERRUPTED
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    raise SystemExit(main())
