"""``psik-api-server check``: one line per check, and an exit status that says whether
``serve`` would start and work, on real directories (modes, another user's, a full
filesystem), a real index and its locks, a real port, the local interpreter and a real
certified directory. The Slurm backend's checks are in tests/slurm/test_preflight_slurm.py."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from psik_api_server import preflight
from psik_api_server.jobs.prefix_lock import PrefixLock
from psik_api_server.jobs.store import JobStore
from tls_support import Identities

NOBODY = 65534


def check(*argv: str) -> tuple[int, list[str]]:
    """The exit status and the lines of ``check`` with ``argv``."""
    parser = argparse.ArgumentParser()
    preflight.add_arguments(parser)
    out = io.StringIO()
    code = preflight.run(parser.parse_args(list(argv)), out=out)
    return code, out.getvalue().splitlines()


def lines_of(lines: list[str], level: str, what: str) -> list[str]:
    return [line for line in lines if line.split(" ", 1)[0] == level and line[5:].startswith(f"{what}:")]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site's directory (0700): the config goes in it, and the prefix and the state
    directory below it, not made yet."""
    root = tmp_path / "site"
    root.mkdir(mode=0o700)
    return root


def write_config(site: Path, **extra: Any) -> Path:
    config = {"prefix": str(site / "jobs"), "state_dir": str(site / "state"), "port": 0, **extra}
    path = site / "psik_api.json"
    path.write_text(json.dumps(config))
    return path


def made(site: Path) -> Path:
    """The prefix and state directory as serve leaves them, with an index."""
    (site / "jobs").mkdir(mode=0o700)
    (site / "state").mkdir(mode=0o700)
    JobStore(site / "state" / "index.sqlite").open().close()
    return site


def test_a_good_local_config_is_all_ok_exit_0_and_leaves_nothing_made(site: Path) -> None:
    code, lines = check("--config", str(write_config(site)))
    assert code == 0, lines
    assert all(line.startswith("ok ") for line in lines), lines
    for what in ("config", "listen", "prefix", "state directory", "index", "backend default (local)"):
        assert lines_of(lines, "ok", what), (what, lines)
    # What did not exist was made to be checked, as serve makes it, then removed.
    assert sorted(p.name for p in site.iterdir()) == ["psik_api.json"]


def test_a_server_made_site_is_ok_with_its_index_and_locks(site: Path) -> None:
    code, lines = check("--config", str(write_config(made(site))))
    assert code == 0, lines
    assert any("opens, is sound, version 1" in line for line in lines_of(lines, "ok", "index")), lines
    assert lines_of(lines, "ok", "locks"), lines


def test_run_as_a_module_reads_psik_api_config_like_serve(site: Path) -> None:
    env = {**os.environ, "PSIK_API_CONFIG": str(write_config(site))}
    done = subprocess.run(
        [sys.executable, "-m", "psik_api_server.preflight"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == f"ok   config: {site / 'psik_api.json'}, authz local"


def test_the_server_command_runs_it_as_check(site: Path) -> None:
    """``psik-api-server check``, the command the README's deployment sections use."""
    env = {k: v for k, v in os.environ.items() if k != "PSIK_API_CONFIG"}
    config = str(write_config(site))
    ok = subprocess.run(
        [sys.executable, "-m", "psik_api_server", "check", "--config", config],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[0] == f"ok   config: {config}, authz local"
    (site / "jobs").mkdir(mode=0o777)
    (site / "jobs").chmod(0o777)
    bad = subprocess.run(
        [sys.executable, "-m", "psik_api_server", "check", "--config", config],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert lines_of(bad.stdout.splitlines(), "FAIL", "prefix"), bad.stdout


def test_a_broken_config_is_a_config_error_exit_2(site: Path) -> None:
    path = site / "psik_api.json"
    path.write_text('{"prefix": ')
    code, lines = check("--config", str(path))
    assert code == 2
    assert lines == [lines_of(lines, "FAIL", "config")[0]]
    assert "not valid JSON" in lines[0] and "fix the file" in lines[0]


def test_local_mode_on_a_public_address_is_refused_as_serve_does_exit_2(site: Path) -> None:
    code, lines = check("--config", str(write_config(site)), "--host", "0.0.0.0")
    assert code == 2, lines
    [line] = lines_of(lines, "FAIL", "listen")
    assert "serves only loopback or a UNIX socket" in line and "127.0.0.1" in line


def test_a_port_in_use_fails_with_what_to_do(site: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = check("--config", str(write_config(site)), "--port", str(port))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "listen")
    assert f"127.0.0.1:{port}: the port is in use" in line and "pick another --port" in line


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


@pytest.mark.skipif(
    _unprivileged_port_start() <= 80 or (os.geteuid() == 0 and shutil.which("setpriv") is None),
    reason="port 80 is not privileged here, or root cannot drop CAP_NET_BIND_SERVICE (no setpriv)",
)
def test_a_privileged_port_refused_says_pick_a_port_of_1024_or_above(site: Path) -> None:
    # EACCES: no --host helps; the port is what is wrong (or the missing capability).
    config = write_config(site)
    argv = [sys.executable, "-m", "psik_api_server", "check", "--config", str(config), "--port", "80"]
    if os.geteuid() == 0:
        drop = "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"
        argv = ["setpriv", *drop, "--", *argv]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    [line] = lines_of(run.stdout.splitlines(), "FAIL", "listen")
    assert "127.0.0.1:80: Permission denied" in line, line
    assert "pick a --port of 1024 or above" in line and "CAP_NET_BIND_SERVICE" in line, line
    assert "another --host" not in line, line


def test_a_unix_socket_path_taken_by_a_file_fails(site: Path) -> None:
    (site / "api.sock").write_text("")
    code, lines = check("--config", str(write_config(site)), "--uds", str(site / "api.sock"))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "listen")
    assert "is not a socket" in line and "remove it" in line


def test_a_prefix_others_can_reach_fails_with_the_chmod(site: Path) -> None:
    made(site)
    (site / "jobs").chmod(0o755)
    code, lines = check("--config", str(write_config(site)))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "prefix")
    assert "mode 0755" in line and f"chmod 700 {site / 'jobs'}" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_prefix_of_another_user_fails(site: Path) -> None:
    made(site)
    os.chown(site / "jobs", NOBODY, -1)
    code, lines = check("--config", str(write_config(site)))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "prefix")
    assert f"belongs to uid {NOBODY}" in line and "use a prefix of your own" in line
    # Nothing is locked or written in a prefix that failed.
    assert not (site / "jobs" / ".psik-api.lock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_state_directory_of_another_user_fails(site: Path) -> None:
    made(site)
    os.chown(site / "state", NOBODY, -1)
    code, lines = check("--config", str(write_config(site)))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "state directory")
    assert f"belongs to uid {NOBODY}" in line and "remove it, or set state_dir" in line


def test_a_state_directory_others_can_write_fails(site: Path) -> None:
    made(site)
    (site / "state").chmod(0o777)
    code, lines = check("--config", str(write_config(site)))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "state directory")
    assert "mode 0777" in line and f"chmod 700 {site / 'state'}" in line


def test_a_prefix_that_cannot_be_made_fails(site: Path) -> None:
    (site / "file").write_text("")
    code, lines = check("--config", str(write_config(site, prefix=str(site / "file" / "jobs"))))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "prefix")
    assert "cannot be made" in line


def test_an_index_others_can_read_fails_with_the_chmod(site: Path) -> None:
    made(site)
    (site / "state" / "index.sqlite").chmod(0o644)
    code, lines = check("--config", str(write_config(site)))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "index")
    assert "mode 0644" in line and "chmod 600" in line


def test_a_damaged_index_is_a_warning_serve_rebuilds_it(site: Path) -> None:
    made(site)
    index = site / "state" / "index.sqlite"
    for side in ("-wal", "-shm"):
        Path(f"{index}{side}").unlink(missing_ok=True)
    index.write_bytes(b"not a database " * 1000)
    code, lines = check("--config", str(write_config(site)))
    assert code == 0, lines
    [line] = lines_of(lines, "warn", "index")
    assert "is damaged" in line and "rebuilds it from the job directories" in line


def stopped(site: Path) -> Path:
    """A site a server has served and left: :func:`made`, with its lock files."""
    lock = PrefixLock(made(site) / "jobs", site / "state" / "index.sqlite")
    lock.acquire()
    lock.release()
    return site


def test_checking_a_stopped_servers_index_leaves_no_sqlite_files(site: Path) -> None:
    # A cleanly closed index is one file; a read-only open would make -shm and -wal.
    state = stopped(site) / "state"
    before = sorted(p.name for p in state.iterdir())
    assert not [name for name in before if name.endswith(("-wal", "-shm"))], before
    code, lines = check("--config", str(write_config(site)))
    assert code == 0, lines
    assert lines_of(lines, "ok", "index"), lines
    assert sorted(p.name for p in state.iterdir()) == before


def test_checking_the_index_of_a_running_server_leaves_its_wal_and_shm(site: Path) -> None:
    made(site)
    index = site / "state" / "index.sqlite"
    server = PrefixLock(site / "jobs", index)
    server.acquire()
    store = JobStore(index).open()  # as a running server holds it: -wal and -shm exist
    try:
        sidecars = [Path(f"{index}{side}") for side in ("-wal", "-shm")]
        assert all(p.exists() for p in sidecars)
        inodes = [p.stat().st_ino for p in sidecars]
        code, lines = check("--config", str(write_config(site)))
        assert code == 1 and lines_of(lines, "FAIL", "locks"), lines
        assert lines_of(lines, "ok", "index"), lines
        assert [p.stat().st_ino for p in sidecars] == inodes  # the server's own, not removed
    finally:
        store.close()
        server.release()


def test_checking_an_index_a_crashed_server_left_keeps_its_wal(site: Path) -> None:
    # Killed, a server leaves -wal (rows not yet in the main file) and -shm: the next
    # server recovers them, so check keeps -wal as it is, and leaves nothing of its own.
    index = stopped(site) / "state" / "index.sqlite"
    crash = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA wal_autocheckpoint=0')\n"
        "db.execute('CREATE TABLE left_in_the_wal (x)')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(index)], check=True)
    wal = Path(f"{index}-wal")
    Path(f"{index}-shm").unlink()  # without -shm, a read-only open makes one
    left = wal.read_bytes()
    assert left
    before = sorted(p.name for p in index.parent.iterdir())
    code, lines = check("--config", str(write_config(site)))
    assert code == 0, lines
    assert lines_of(lines, "ok", "index"), lines
    assert sorted(p.name for p in index.parent.iterdir()) == before
    assert wal.read_bytes() == left


def test_a_running_server_holding_the_prefix_fails(site: Path) -> None:
    made(site)
    held = PrefixLock(site / "jobs", site / "state" / "index.sqlite")
    held.acquire()
    try:
        code, lines = check("--config", str(write_config(site)))
    finally:
        held.release()
    assert code == 1
    [line] = lines_of(lines, "FAIL", "locks")
    assert f"another psik-api server (pid {os.getpid()}" in line and "stop it first" in line


def test_an_unknown_backend_type_fails(site: Path) -> None:
    code, lines = check("--config", str(write_config(site, backends={"x": {"type": "nosuch"}})))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "backend x (nosuch)")
    assert "psik cannot load backend type 'nosuch'" in line


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (mode 0700), unmounted after the test. Where one cannot be mounted
    (not root), the test skips saying why, except under CI=true, where that fails."""
    mnt = tmp_path / "small"
    mnt.mkdir(mode=0o700)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        why = f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; under CI=true this test must run", pytrace=False)
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_a_full_filesystem_fails_and_says_what_is_full(small_tmpfs: Path) -> None:
    config = write_config(small_tmpfs)
    code, lines = check("--config", str(config), "--min-free", "1")
    assert code == 0, lines  # 4 MiB, empty: enough for a threshold of 1 MiB
    (small_tmpfs / "jobs").mkdir(mode=0o700)
    # Unbuffered: the write that finds the disk full raises inside pytest.raises.
    with open(small_tmpfs / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"\0" * (64 << 10))
    code, lines = check("--config", str(config), "--min-free", "0")
    assert code == 1, lines
    [line] = lines_of(lines, "FAIL", "free space (prefix)")
    assert f"the filesystem of {small_tmpfs / 'jobs'} is full" in line
    assert "free some space" in line
    # The threshold fails a filesystem short of it before anything is written.
    (small_tmpfs / "filler").unlink()
    code, lines = check("--config", str(config), "--min-free", "64")
    assert code == 1, lines
    assert "below 64 MiB" in lines_of(lines, "FAIL", "free space (prefix)")[0]


def test_token_mode_with_a_certified_directory_is_ok(site: Path, tls_identities: Identities) -> None:
    config = write_config(site, authz="token", certified_config=str(tls_identities.server))
    code, lines = check("--config", str(config))
    assert code == 0, lines
    assert lines_of(lines, "ok", "certified"), lines
    assert any("valid until" in line for line in lines_of(lines, "ok", "certificate id.crt")), lines
    assert lines_of(lines, "ok", "known_clients"), lines
    assert lines_of(lines, "ok", "token key"), lines
    assert any("certified serve" in line for line in lines_of(lines, "warn", "token mode")), lines


def expired_certificate() -> bytes:
    """A self-signed certificate that ended yesterday (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_token_mode_says_which_client_ca_has_expired(
    site: Path, tls_identities: Identities, tmp_path: Path
) -> None:
    server = tmp_path / "SRV"
    shutil.copytree(tls_identities.server, server)
    (server / "known_clients" / "old.crt").write_bytes(expired_certificate())
    code, lines = check("--config", str(write_config(site, authz="token", certified_config=str(server))))
    assert code == 0, lines  # the other CAs still let their users in
    [line] = lines_of(lines, "warn", "known_clients")
    assert f"{server / 'known_clients' / 'old.crt'} expired on" in line and "renew it" in line


def test_token_mode_without_a_certified_directory_fails(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTIFIED_CONFIG", raising=False)
    monkeypatch.setenv("VIRTUAL_ENV", str(site))  # no etc/certified there
    if Path("/etc/certified/known_clients").is_dir():
        pytest.skip("this machine has /etc/certified")
    code, lines = check("--config", str(write_config(site, authz="token")))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "certified")
    assert "every client would be refused" in line and "set certified_config" in line


def test_token_mode_with_a_key_others_can_read_fails(site: Path, tls_identities: Identities) -> None:
    made(site)
    key = site / "state" / "token-key.pem"
    key.write_text("x")
    key.chmod(0o644)
    config = write_config(site, authz="token", certified_config=str(tls_identities.server))
    code, lines = check("--config", str(config))
    assert code == 1
    [line] = lines_of(lines, "FAIL", "token key")
    assert "chmod 600" in line
