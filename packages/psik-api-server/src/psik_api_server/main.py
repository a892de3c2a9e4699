"""``psik_api_server.main:app`` for ``uvicorn psik_api_server.main:app`` and
``certified serve psik_api_server.main:app``.

The app is built on first access, from the config file (``$PSIK_API_CONFIG``,
``$VIRTUAL_ENV/etc/psik_api.json``) or the embedded default, so importing this module
does no I/O and a broken config is reported when the server starts. Building it also
hooks uvicorn's protocols (``peer.install_uvicorn_hook``), so that each connection uvicorn
accepts carries its socket (``authz: local`` checks the caller's uid on it), and puts
the connection limits of the settings on them (``limits``: a request-head timeout, a
connection cap, the open-file limit raised; uvicorn's ``--timeout-keep-alive`` applies).
"""

from __future__ import annotations

import logging
from functools import cache

from starlette.applications import Starlette


@cache
def build() -> Starlette:
    from . import limits
    from .app import create_app
    from .peer import install_uvicorn_hook
    from .settings import load_settings

    settings = load_settings()
    install_uvicorn_hook()
    # uvicorn has configured its logging by now; its backlog (--backlog) is not known
    # here: its default is assumed when fitting the connection cap under the file limit.
    limits.start(settings, backlog=2048, keep_alive=False, logger=logging.getLogger("uvicorn.error"))
    limits.quiet_repeats()
    return create_app(settings)


def __getattr__(name: str) -> Starlette:
    if name == "app":
        return build()
    raise AttributeError(name)
