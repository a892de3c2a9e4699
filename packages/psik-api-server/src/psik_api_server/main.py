"""``psik_api_server.main:app`` for ``uvicorn psik_api_server.main:app``, ``hypercorn
psik_api_server.main:app`` and ``certified serve psik_api_server.main:app``.

``app`` is a real attribute (hypercorn evaluates the name in the module's namespace,
``eval("app", vars(module))``, which a module ``__getattr__`` never answers) whose app is
built on its first ASGI call (the
server's lifespan start-up, before it accepts a connection), from the config file
(``$PSIK_API_CONFIG``, ``$VIRTUAL_ENV/etc/psik_api.json``) or the embedded default, so
importing this module does no I/O and a broken config is reported when the server
starts.

Whoever launches this app picks uvicorn's protocol class, so building it is where the
run-time patch path is taken (``psik-api-server serve`` passes its own class instead):
uvicorn's protocols get the server's :class:`~psik_api_server.serving.uvicorn_seam.ConnectionHooks` (each
connection carries its socket, the peer's uid looked up at accept, for ``authz:
local``; the connection limits of the settings: a request-head timeout, a body-rate
floor, a connection cap, the open-file limit raised; uvicorn's ``--timeout-keep-alive``
applies), hypercorn's connections their socket (``hypercorn_hook``), and failed TLS
handshakes are logged (``tls_refusals``, for ``certified serve``).
"""

from __future__ import annotations

import logging
import threading

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send


def build() -> Starlette:
    """The app of this process, built once (the first caller builds it)."""
    return app.built()


class LazyApp:
    """An ASGI app that builds the real one (:func:`_build`) on its first call."""

    def __init__(self) -> None:
        self._app: Starlette | None = None
        self._lock = threading.Lock()  # two servers' threads must not build two apps

    def built(self) -> Starlette:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = _build()
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.built()(scope, receive, send)


def _build() -> Starlette:
    from .app import create_app
    from .auth import tls_refusals
    from .serving import limits
    from .serving import uvicorn_seam as uvicorn_protocol
    from .serving.hypercorn_seam import install_hypercorn_hook
    from .settings import load_settings

    settings = load_settings()
    install_hypercorn_hook()
    tls_refusals.install()  # certified serve's TLS refuses a client unknown: say so, once
    # uvicorn has configured its logging by now; its backlog (--backlog) is not known
    # here: its default is assumed when fitting the connection cap under the file limit.
    connection_limits, _backlog = limits.start(
        settings, backlog=2048, keep_alive=False, logger=logging.getLogger("uvicorn.error")
    )
    uvicorn_protocol.install(uvicorn_protocol.ConnectionHooks(connection_limits))
    limits.quiet_repeats()
    return create_app(settings)


app = LazyApp()
