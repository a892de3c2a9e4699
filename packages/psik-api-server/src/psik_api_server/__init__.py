"""psik-api server: a REST-HTTP job API over psik backends. Build it with
:func:`psik_api_server.app.create_app`, or run ``psik-api-server serve``."""

from ._version import __version__

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> object:
    # Lazy, so `python -m psik_api_server.backends.local.launcher` does not import starlette.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
