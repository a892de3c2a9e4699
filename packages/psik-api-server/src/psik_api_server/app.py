"""The app factory: ``create_app(settings, *, backend=None, store=None, clock=None)``.

Everything the app needs is built here (or passed in by tests) and kept in one typed
:class:`~.context.ServerContext` (``context(app)``); nothing lives in module globals.
Building does no I/O. The lifespan checks that the prefix and the state directory are
the server's own, takes the prefix lock (one server per prefix), and opens the job
service (:meth:`~.jobs.service.JobService.open`: the index reconciled with the job
directories, the watcher, the liveness loop, the launcher), then stops it all again in
reverse. An ASGI server runs the lifespan; tests wrap the app in
``asgi_lifespan.LifespanManager``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import Scope

from psik_api_core import LOCAL_USER, OwnerPolicy, Policy, Principal

from . import __version__
from .aio import in_thread
from .auth.authenticator import PRINCIPAL_KEY, auth_middleware
from .auth.certnames import ClientNames, find_config
from .auth.local_secret import LocalSecrets
from .auth.peer import PeerLookup
from .auth.policy import load_policy
from .auth.private_dir import check_private_dir, check_private_file
from .auth.tokens import TokenAuthority
from .backends import driver_class
from .backends.local.launcher import LocalLauncher
from .backends.psik_backend import PsikBackend
from .context import ServerContext, context
from .errors import StartupError
from .files.service import FileService
from .http.docs import docs_html
from .http.headers import NoSniff
from .http.metrics import ServerMetrics
from .http.openapi import build_openapi
from .http.problems import EXCEPTION_HANDLERS, CatchAll
from .http.routes import build_routes
from .jobs import statedir
from .jobs.build import build_job_service
from .jobs.events import EventHub
from .jobs.groups import GroupService
from .jobs.prefix_lock import PrefixLock
from .jobs.speclimits import SpecLimits
from .jobs.store import JobStore
from .serving.limits import flush_repeats
from .serving.rate_limit import rate_limit_middleware
from .serving.request_log import RequestLog
from .settings import Settings

_logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    backend: PsikBackend | None = None,
    store: JobStore | None = None,
    launcher: LocalLauncher | None = None,
    clock: Callable[[], float] | None = None,
    policy: Policy | None = None,
) -> Starlette:
    """Build the psik-api ASGI app (no I/O: the lifespan starts it).

    ``launcher`` submits local jobs (default: one started with the server; pass
    ``LocalLauncher(eager=False)`` to start it only at the first local submit).
    """
    settings = settings or Settings()
    if policy is None and settings.policy is not None:
        policy = load_policy(settings.policy)
    backend = backend or PsikBackend(
        settings.prefix, settings.backends, launcher or LocalLauncher(settings.launcher_log_path)
    )
    store = store or JobStore(settings.database_path)
    service = build_job_service(
        store,
        backend,
        policy or OwnerPolicy(),
        directory_roots=settings.directory_roots,
        watch_interval=settings.watch_interval,
        liveness_interval=settings.liveness_interval,
        events=EventHub(
            buffer=settings.event_buffer,
            max_streams=settings.max_event_streams or max(1, settings.max_connections * 9 // 10),
        ),
        clock=clock or time.time,
        # Jobs found without an index row (a lost index) were the local user's; in token
        # mode that name is nobody's certificate, so no caller gets them.
        import_owner=LOCAL_USER,
        callback_url=settings.callback_url,
        spec_limits=SpecLimits(
            token_mode=settings.authz != "local",
            callback_hosts=tuple(settings.callback_hosts),
            allow_inherit_environment=settings.allow_inherit_environment,
        ),
    )
    tokens = None
    client_names = None
    if settings.authz == "token":
        tokens = TokenAuthority(settings.token_key_path, settings.token_lifetime, clock or time.time)
        client_names = ClientNames(find_config(settings.certified_config))
    openapi = build_openapi(
        version=__version__,
        backends=sorted(settings.backends),
        rate_limited=settings.rate_limits is not None and settings.rate_limits.enabled,
    )
    metrics = ServerMetrics(service)  # this app's own registry: tests build many apps

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """Start in order, stop in reverse (one exit stack): the start-up checks, the
        prefix lock, the state directory's migration, the token-mode keys, the job
        service; on the way out also the local secrets and the repeated log lines."""
        ctx = context(app)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(ctx.local_secrets.remove_all)
            stack.callback(flush_repeats)  # uvicorn ends on the signal it caught: no atexit
            try:
                await start(stack)
            except StartupError as e:
                ctx.startup_error = e  # for `psik-api-server serve` to say in one line
                raise
            yield

    async def start(stack: contextlib.AsyncExitStack) -> None:
        # First, so that `uvicorn psik_api_server.main:app` refuses a shared prefix too:
        # the prefix, the state directory and the index are the owner's alone.
        await in_thread(check_private_dir, settings.prefix)
        # Before the index's mode is read: a link there is refused as a link.
        await in_thread(statedir.prepare, settings)
        await in_thread(check_private_file, settings.database_path, "index")
        if (notes := settings.notes_line()) is not None:
            _logger.warning("%s", notes)
        lock = PrefixLock(settings.prefix, None if str(store.path) == ":memory:" else Path(store.path))
        # Before anything touches the prefix: start-up clean-up takes every claim it
        # finds for a dead server's, which holds only while no other server runs.
        await in_thread(lock.acquire)

        async def release() -> None:
            with anyio.CancelScope(shield=True):
                await in_thread(lock.release)

        stack.push_async_callback(release)
        await in_thread(statedir.migrate, settings)
        if tokens is not None:
            await in_thread(tokens.load)
        if client_names is not None:
            await in_thread(client_names.load)
            if any(driver_class(b.type).runs_here for b in settings.backends.values()):
                _logger.warning(
                    "authz: token with a local backend: every user's jobs run as this "
                    "server's Unix user and can read its files, the token key included; "
                    "serve only users who may act as each other (README, 'What this "
                    "mode does not do')"
                )
            if client_names.config is None:
                _logger.warning(
                    "authz: token, but no certified config directory was found: every "
                    "client certificate will be refused (set certified_config)"
                )
        began = time.perf_counter()
        await service.open()
        stack.push_async_callback(service.aclose)
        metrics.startup_seconds = time.perf_counter() - began
        await context(app).groups.recover()  # after the jobs' own recovery

    app = Starlette(
        routes=build_routes(openapi=openapi, docs=docs_html(openapi)),
        # CatchAll outside the auth middleware, so that a failing check is a 500 problem too.
        middleware=[
            # Outermost: every answer, refusals and 500s too, carries the request's id, and
            # every log line of the request (the checks' too) names it.
            Middleware(
                RequestLog,
                access_log=settings.log_format == "json",
                identity=_identity,
                observe=metrics.observe_request,
            ),
            Middleware(NoSniff),  # on every response, refusals and 500s too
            Middleware(CatchAll),
            auth_middleware(settings),  # the request-shape guard, then authz's authenticator
            # Per identity: inside auth (the caller is known), before any route's work.
            *rate_limit_middleware(settings.rate_limits),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.context = ServerContext(
        settings=settings,
        service=service,
        files=FileService(service, max_upload_bytes=settings.max_upload_bytes),
        groups=GroupService(service),
        peer_lookup=PeerLookup(),  # who is calling (auth.local)
        local_secrets=LocalSecrets(),  # where no uid can be told
        metrics=metrics,
        tokens=tokens,  # token mode only (auth.token, http.token)
        client_names=client_names,  # who a client certificate names (auth.certnames)
    )
    return app


def _identity(scope: Scope) -> str | None:
    """Who the request acted for, for its access line: the principal's user name (never
    a credential), None when the request was refused before its caller was known."""
    found = scope.get("state", {}).get(PRINCIPAL_KEY)
    return found.user if isinstance(found, Principal) else None
