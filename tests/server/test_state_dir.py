"""The server's own files (index and its lock, launcher log, token key) live in its
private state directory, never beside the prefix: with the README's ``/tmp/psik_jobs``
they landed in /tmp itself, where a second user's server collided with the first's and
anyone could make those names first. A link or another user's file where one of them
goes stops start-up with a clear message; an older install's files are moved, and its
jobs and tokens still work."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from psik_api_server.app import create_app
from psik_api_server.auth.tokens import TokenAuthority
from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.errors import StartupError
from psik_api_server.settings import BackendSettings, Settings, default_state_dir

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent


def _settings(prefix: Path, **extra: object) -> Settings:
    return Settings(
        prefix=prefix, backends={"default": BackendSettings(type="local")}, watch_interval=0.02, **extra
    )


def _app(settings: Settings) -> Starlette:
    return create_app(settings, launcher=LocalLauncher(settings.launcher_log_path, eager=False))


def _client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")


@pytest.fixture
def sticky_tmp(tmp_path: Path) -> Path:
    """A /tmp of our own: mode 1777, where the README's example prefix would be."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


async def test_two_servers_with_prefixes_in_one_shared_dir_share_no_file(sticky_tmp: Path) -> None:
    """Before: both servers put index.sqlite (and its lock, and launcher.log) in the
    shared directory, and the second one refused to start (the index was locked)."""
    a, b = _settings(sticky_tmp / "psik_jobs"), _settings(sticky_tmp / "other_jobs")
    app_a, app_b = create_app(a), create_app(b)  # their own launcher logs, as serve makes them
    async with LifespanManager(app_a), LifespanManager(app_b):
        for app in (app_a, app_b):
            async with _client(app) as c:
                r = await c.post("/v1/jobs/new", json={"script": "true"})
                assert r.status_code == 201, r.text
    assert sorted(os.listdir(sticky_tmp)) == ["other_jobs", "psik_jobs"]
    assert a.state_directory != b.state_directory
    for s in (a, b):
        assert s.database_path.parent == s.state_directory
        assert {"index.sqlite", "index.sqlite.lock", "launcher.log"} <= set(os.listdir(s.state_directory))
        assert s.state_directory.stat().st_mode & 0o777 == 0o700
        assert ".psik-api.lock" in os.listdir(s.prefix)  # the prefix's lock: in it, not beside it


def test_the_state_directory_is_one_per_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    one = default_state_dir(tmp_path / "real" / "jobs")
    assert one.parent == tmp_path / "state" / "psik_api" and one.name.startswith("jobs-")
    assert default_state_dir(tmp_path / "link" / "jobs") == one  # one prefix, however spelled
    assert default_state_dir(tmp_path / "real" / "jobs2") != one
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    assert (
        default_state_dir(tmp_path / "real" / "jobs").parent == Path.home() / ".local" / "state" / "psik_api"
    )
    explicit = _settings(tmp_path / "jobs", state_dir=tmp_path / "mine")
    assert explicit.database_path == tmp_path / "mine" / "index.sqlite"
    assert explicit.token_key_path == tmp_path / "mine" / "token-key.pem"
    assert explicit.launcher_log_path == tmp_path / "mine" / "launcher.log"


# ---- what someone else put where the server's files go ----


def _serve(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`psik-api-server serve` expected to stop at start-up (a timeout fails the test)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV"}}
    argv = [str(BIN / "psik-api-server"), "serve", "--config", str(config), "--port", "0"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: this test must run, but only root can give a file to another uid")
        pytest.skip("needs root, to give a file to another uid")


#: A uid no process of this test runs as (no passwd entry needed: chown takes a number).
OTHER_UID = 54_321


def _plant(kind: str, settings: Settings, tmp_path: Path) -> tuple[Path, str]:
    """Make ``kind`` at a path the server's files go; that path and what the refusal says."""
    state = settings.state_directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("someone's")
    if kind == "state dir is a link":
        state.parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "their-dir").mkdir(mode=0o700)
        state.symlink_to(tmp_path / "their-dir")
        return state, "symbolic link"
    if kind == "another user's state dir":
        state.mkdir(parents=True, mode=0o700)
        os.chown(state, OTHER_UID, OTHER_UID)
        return state, f"uid {OTHER_UID}"
    if kind == "state dir writable by others":
        state.mkdir(parents=True)
        state.chmod(0o777)
        return state, "chmod 700"
    state.mkdir(parents=True, mode=0o700)
    if kind == "index is a link":
        (state / "index.sqlite").symlink_to(elsewhere)
        return state / "index.sqlite", "symbolic link"
    if kind == "index lock is a link":
        (state / "index.sqlite.lock").symlink_to(elsewhere)
        return state / "index.sqlite.lock", "symbolic link"
    if kind == "launcher log is a link":
        (state / "launcher.log").symlink_to(elsewhere)
        return state / "launcher.log", "symbolic link"
    path = state / {"another user's index": "index.sqlite", "another user's log": "launcher.log"}[kind]
    path.write_bytes(b"")
    path.chmod(0o600)
    os.chown(path, OTHER_UID, OTHER_UID)
    return path, f"uid {OTHER_UID}"


@pytest.mark.parametrize(
    "kind",
    [
        "state dir is a link",
        "state dir writable by others",
        "another user's state dir",
        "index is a link",
        "index lock is a link",
        "launcher log is a link",
        "another user's index",
        "another user's log",
    ],
)
def test_a_link_or_another_users_file_where_the_servers_files_go_stops_start_up(
    tmp_path: Path, kind: str
) -> None:
    if "another user" in kind or "writable" in kind:
        _need_root()
    prefix = tmp_path / "psik_jobs"
    config = tmp_path / "psik_api.json"
    config.write_text(json.dumps({"prefix": str(prefix), "backends": {"default": {"type": "local"}}}))
    settings = _settings(prefix)
    path, why = _plant(kind, settings, tmp_path)
    done = _serve(config)
    assert done.returncode == 3, (done.returncode, done.stderr)
    line = [x for x in done.stderr.splitlines() if x.startswith("psik-api-server: cannot start:")]
    assert len(line) == 1, done.stderr
    assert str(path) in line[0] and why in line[0], line[0]
    assert "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "elsewhere").read_text() == "someone's"


def test_a_planted_prefix_lock_stops_start_up(tmp_path: Path) -> None:
    prefix = tmp_path / "psik_jobs"
    prefix.mkdir(mode=0o700)
    (prefix / ".psik-api.lock").symlink_to(tmp_path / "elsewhere")
    config = tmp_path / "psik_api.json"
    config.write_text(json.dumps({"prefix": str(prefix)}))
    done = _serve(config)
    assert done.returncode == 3 and "symbolic link" in done.stderr and ".psik-api.lock" in done.stderr
    assert not (tmp_path / "elsewhere").exists()


# ---- an older install: its files beside the prefix ----


async def test_an_older_layout_is_moved_and_its_jobs_and_tokens_still_work(
    sticky_tmp: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("biscuit_auth")
    prefix = sticky_tmp / "psik_jobs"
    # The older layout: what the server made, where an older version kept it (beside
    # the prefix: index, its lock, the launcher log, the token key, the prefix's lock).
    made = tmp_path / "made"
    app = _app(_settings(prefix, state_dir=made))
    async with LifespanManager(app), _client(app) as c:
        r = await c.post("/v1/jobs/new", json={"script": "true"}, headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 201
        jobid = r.json()["jobid"]
    old_key = TokenAuthority(made / "token-key.pem", 3600, lambda: 1.9e9)
    old_key.load()
    token = old_key.mint("alice").token
    (made / "launcher.log").write_text("the older launcher's log\n")
    for name in ("index.sqlite", "index.sqlite.lock", "launcher.log", "token-key.pem"):
        (made / name).rename(sticky_tmp / name)
    (prefix / ".psik-api.lock").rename(sticky_tmp / "psik_jobs.lock")
    index_bytes = (sticky_tmp / "index.sqlite").read_bytes()

    new = _settings(prefix)  # this version's default: the state directory
    app = _app(new)
    with caplog.at_level(logging.WARNING, logger="psik_api_server.jobs.statedir"):
        async with LifespanManager(app), _client(app) as c:
            assert (await c.get(f"/v1/jobs/{jobid}")).status_code == 200
            # The same index, not one rebuilt from the prefix: the key still replays.
            r = await c.post("/v1/jobs/new", json={"script": "true"}, headers={"Idempotency-Key": "k-1"})
            assert r.status_code == 201 and r.json()["jobid"] == jobid
    moved = [r.getMessage() for r in caplog.records if r.name == "psik_api_server.jobs.statedir"]
    assert len(moved) == 1 and "index.sqlite, launcher.log, token-key.pem" in moved[0], moved
    assert str(new.state_directory) in moved[0]
    assert sorted(os.listdir(sticky_tmp)) == ["psik_jobs"]  # nothing left beside the prefix
    assert (new.state_directory / "launcher.log").read_text().startswith("the older launcher's log\n")
    assert len((new.state_directory / "index.sqlite").read_bytes()) >= len(index_bytes) > 0
    key = TokenAuthority(new.token_key_path, 3600, lambda: 1.9e9)
    key.load()
    assert key.authorize(token, "GET", None) == "alice"  # tokens minted before still work


async def test_an_older_server_still_running_stops_start_up(sticky_tmp: Path) -> None:
    prefix = sticky_tmp / "psik_jobs"
    prefix.mkdir(mode=0o700)
    held = sticky_tmp / "psik_jobs.lock"
    with held.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the older server holds it
        app = _app(_settings(prefix))
        with pytest.raises(StartupError, match="older psik-api server holds"):
            async with LifespanManager(app):
                pass
    assert held.exists()


async def test_what_is_not_ours_beside_the_prefix_is_left_alone(
    sticky_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = sticky_tmp / "psik_jobs"
    (sticky_tmp / "elsewhere").write_text("x")
    (sticky_tmp / "index.sqlite").symlink_to(sticky_tmp / "elsewhere")
    settings = _settings(prefix)
    app = _app(settings)
    with caplog.at_level(logging.WARNING, logger="psik_api_server.jobs.statedir"):
        async with LifespanManager(app):
            pass
    assert (sticky_tmp / "index.sqlite").is_symlink() and not settings.database_path.is_symlink()
    assert any("not this server's own file" in r.getMessage() for r in caplog.records)
