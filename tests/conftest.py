"""Shared fixtures: a real server on a real psik prefix, reached by the real client four
ways (sync/async x in-process/live uvicorn). Every test gets its own prefix and index."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

# Every test ends what it starts (tests/leaks.py): the check, and the session's marker.
from leaks import _ends_what_it_starts, pytest_sessionfinish  # noqa: F401
from psik_api_client import AsyncClient, Client
from psik_api_server.app import create_app
from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.settings import BackendSettings, Settings
from support import ASGIThreadTransport, AsyncApi, LiveServer, SyncApi
from tls_support import Identities, TlsServer, make_identities
from tls_support import tls_server as run_tls_server


@pytest.fixture(autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers' state directories (statedir.py) under the test's own temp dir, never
    in the home of whoever runs the tests (subprocesses inherit it too)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psik is asyncio-only


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends={"default": BackendSettings(type="local")},
        watch_interval=0.02,
    )


def lazy_app(settings: Settings) -> Starlette:
    """The app as the server builds it, except that its launcher starts at the first
    local submit rather than with the app: tests that run no job spawn no launcher."""
    return create_app(settings, launcher=LocalLauncher(settings.prefix.parent / "launcher.log", eager=False))


MODES = ["async-inprocess", "sync-inprocess", "async-live", "sync-live"]


@pytest.fixture(params=MODES)
async def api(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Any]:
    """The real client on the real app, in each of the four ways."""
    mode: str = request.param
    app = lazy_app(settings)
    if mode == "async-inprocess":
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app)
            async with AsyncClient("http://testserver", transport=transport) as client:
                yield AsyncApi(client)
    elif mode == "sync-inprocess":
        transport_s = ASGIThreadTransport(app)
        try:
            with Client("http://testserver", transport=transport_s) as sclient:
                yield SyncApi(sclient)
        finally:
            await anyio.to_thread.run_sync(transport_s.close)
    else:
        with LiveServer(app) as live:
            if mode == "async-live":
                async with AsyncClient(live.url) as client:
                    yield AsyncApi(client)
            else:
                with Client(live.url) as sclient:
                    yield SyncApi(sclient)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    """The app alone (with its lifespan), for tests that drive HTTP by hand."""
    application = lazy_app(settings)
    async with LifespanManager(application):
        yield application


@pytest.fixture
async def http(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """Raw httpx on the in-process app: for wire-level checks (status, headers, bodies)."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        yield client


@pytest.fixture
def live_app(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(lazy_app(settings)) as live:
        yield live


# ---- TLS: certified identities and `certified serve` (tests/tls_support.py) ----


@pytest.fixture(scope="session")
def tls_identities(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    """A server identity and the users alice and bob (certified config dirs)."""
    return make_identities(tmp_path_factory.mktemp("certified"))


@pytest.fixture
def tls_server(tls_identities: Identities, tmp_path: Path) -> Iterator[TlsServer]:
    """`certified serve psik_api_server.main:app` with `authz: token` on a fresh state
    directory (tmp_path/state); `.client("alice")` is alice's mTLS httpx client."""
    with run_tls_server(tls_identities, tmp_path / "state", authz="token") as server:
        yield server
