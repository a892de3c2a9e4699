"""``psik-api-server serve [--config FILE] [--host H] [--port P] [--uds PATH]``.

Runs uvicorn on the app with forwarded headers ignored (``proxy_headers=False``). In
``authz: local`` mode it refuses to listen anywhere but loopback or a UNIX socket, and
the socket is created readable and writable by its owner only (uvicorn's own is 0666).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import stat
import sys
from pathlib import Path

from .errors import StartupError
from .security import is_loopback_host
from .settings import ConfigError, load_settings


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
    return p


def _unix_socket(path: Path) -> socket.socket:
    """A listening UNIX socket at ``path`` that only its owner may connect to."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
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


_STARTUP_ERROR = f"{StartupError.__module__}.{StartupError.__qualname__}"


class _QuietStartupError(logging.Filter):
    """Drops uvicorn's traceback of a :class:`StartupError`: ``serve`` says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # starlette hands the lifespan's traceback to uvicorn as the failure's message.
        return not isinstance(exc, StartupError) and _STARTUP_ERROR not in record.getMessage()


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"psik-api-server: config error: {e}", file=sys.stderr)
        return 2
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    if settings.authz == "local" and not args.uds and not is_loopback_host(host):
        print(
            "psik-api-server: authz 'local' serves only loopback or a UNIX socket; "
            f"refusing to listen on {host}",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        proxy_headers=False,  # never trust X-Forwarded-For & co.
        server_header=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    where = f"unix:{args.uds}" if args.uds else f"http://{host}:{port}"
    print(f"psik-api-server: starting on {where}; jobs in {settings.prefix}", file=sys.stderr)
    path = Path(args.uds).expanduser() if args.uds else None
    sockets = [_unix_socket(path)] if path else None  # refuses to replace what is not a socket
    quiet = _QuietStartupError()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn's way of saying the lifespan did not start
        if app.state.startup_error is None:
            raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if app.state.startup_error is not None:
        print(f"psik-api-server: cannot start: {app.state.startup_error}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    raise SystemExit(main())
