"""The local secret: who the caller is, where its uid cannot be told (``authz: local``
over loopback TCP on a system without Linux's socket tables, e.g. macOS).

The client's side is ``psik_api_client._local_secret``: the header name and the two
directories must match (a test checks they do).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

from ..settings import default_data_dir

#: The request header carrying the local secret (not Authorization: tokens will use it).
SECRET_HEADER = "Psik-Local-Secret"  # noqa: S105 - a header's name, not a secret


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
