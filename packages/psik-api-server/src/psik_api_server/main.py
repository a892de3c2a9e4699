"""``psik_api_server.main:app`` for ``uvicorn psik_api_server.main:app`` and
``certified serve psik_api_server.main:app``.

The app is built on first access, from the config file (``$PSIK_API_CONFIG``,
``$VIRTUAL_ENV/etc/psik_api.json``) or the embedded default, so importing this module
does no I/O and a broken config is reported when the server starts. Building it also
hooks uvicorn's protocols (``peer.install_uvicorn_hook``), so that each connection uvicorn
accepts carries its socket: ``authz: local`` checks the caller's uid on it.
"""

from __future__ import annotations

from functools import cache

from starlette.applications import Starlette


@cache
def build() -> Starlette:
    from .app import create_app
    from .peer import install_uvicorn_hook
    from .settings import load_settings

    install_uvicorn_hook()
    return create_app(load_settings())


def __getattr__(name: str) -> Starlette:
    if name == "app":
        return build()
    raise AttributeError(name)
