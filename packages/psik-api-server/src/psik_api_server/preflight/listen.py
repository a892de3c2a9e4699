"""Where ``serve`` would listen: an address ``authz: local`` allows, and free."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import TYPE_CHECKING

from .report import Report

if TYPE_CHECKING:
    from ..settings import Settings


def check_listen(
    report: Report, settings: Settings, host: str | None, port: int | None, uds: str | None
) -> None:
    """Where ``serve`` would listen: allowed (``authz: local``: loopback or a UNIX
    socket) and free, bound here as ``serve`` binds it and let go at once."""
    from ..auth.loopback import is_loopback_host
    from ..cli import _answers, _tcp_socket
    from ..errors import StartupError

    what = "listen"
    if uds:
        path = Path(uds).expanduser()
        if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.lstat().st_mode)):
            report.fail(what, f"{path} exists and is not a socket; serve will not replace it: remove it")
        elif path.exists() and _answers(path):
            report.fail(what, f"{path} is in use by a running server; stop it, or pick another --uds")
        elif not path.parent.is_dir():
            report.fail(what, f"{path.parent} does not exist; make it, or pick another --uds")
        else:
            report.ok(what, f"unix:{path} can be made (owner-only)")
        return
    host = host or settings.host
    port = settings.port if port is None else port
    if settings.authz == "local" and not is_loopback_host(host):
        report.config_error = True
        report.fail(
            what,
            f"authz 'local' serves only loopback or a UNIX socket; serve refuses {host}: listen on "
            "127.0.0.1 (reach it from elsewhere with ssh -L to a UNIX socket), or use authz 'token'",
        )
        return
    where = f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = _tcp_socket(host, port)
    except StartupError as e:
        if "in use" in str(e):
            fix = "stop what listens there (ss -ltnp), or pick another --port"
        elif "Permission denied" in str(e) and 0 < port < 1024:
            # Only root (or CAP_NET_BIND_SERVICE) binds a port below 1024: no host helps.
            fix = (
                "pick a --port of 1024 or above (ports below need root or the "
                "CAP_NET_BIND_SERVICE capability)"
            )
        elif "Permission denied" in str(e):
            fix = "pick another --port, or see what forbids it (SELinux, a firewall)"
        else:
            fix = "pick another --host"
        report.fail(what, f"{e}; {fix}")
        return
    sock.close()
    report.ok(what, f"{where} is free" + (" (serve picks a free port)" if port == 0 else ""))
