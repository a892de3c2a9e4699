"""``psik_api_server.main:app`` for ``uvicorn psik_api_server.main:app`` and
``certified serve psik_api_server.main:app``.

The app is built on first access, from the config file (``$PSIK_API_CONFIG``,
``$VIRTUAL_ENV/etc/psik_api.json``) or the embedded default, so importing this module
does no I/O and a broken config is reported when the server starts.
"""

from __future__ import annotations

from functools import cache

from starlette.applications import Starlette


@cache
def build() -> Starlette:
    from .app import create_app
    from .settings import load_settings

    return create_app(load_settings())


def __getattr__(name: str) -> Starlette:
    if name == "app":
        return build()
    raise AttributeError(name)
