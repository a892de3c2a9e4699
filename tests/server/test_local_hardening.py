"""Found by trying to break issue 6's local mode: the secret file is never written
into a directory another user can touch, and a second server never takes over the
UNIX socket of a running one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from psik_api_server.auth.local_secret import LocalSecrets


def test_the_secret_is_written_only_into_a_private_directory_of_ours(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # a shared XDG_RUNTIME_DIR someone else can write to
    with pytest.raises(PermissionError, match="chmod 700"):
        LocalSecrets(shared).secret(8123)
    assert list(shared.iterdir()) == []
    private = tmp_path / "private"
    secret = LocalSecrets(private).secret(8123, "127.0.0.1")
    doc = json.loads((private / "local-8123.json").read_text())
    assert (doc["host"], doc["secret"]) == ("127.0.0.1", secret)
    assert (private / "local-8123.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in private.iterdir()] == ["local-8123.json"]  # no temp file left


def test_a_second_server_does_not_take_over_a_live_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
        proc = subprocess.run(
            [sys.executable, "-m", "psik_api_server", "serve", "--uds", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert proc.returncode != 0 and "in use by a running server" in proc.stderr, proc.stderr
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # still the first server's
        probe.close()
        assert not (tmp_path / "data").exists()
    finally:
        live.close()
