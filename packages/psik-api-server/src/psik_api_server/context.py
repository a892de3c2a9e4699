"""What one app holds, typed: :class:`ServerContext`, built by
:func:`~psik_api_server.app.create_app` and kept as ``app.state.context``.

Every part that needs one of the app's collaborators (a route, a middleware, the
command line) reaches it through :func:`context`, not through untyped ``app.state``
attributes; tests swap a collaborator by assigning to the context's field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .auth.certnames import ClientNames
    from .auth.local_secret import LocalSecrets
    from .auth.peer import PeerLookup
    from .auth.tokens import TokenAuthority
    from .errors import StartupError
    from .files.service import FileService
    from .http.metrics import ServerMetrics
    from .jobs.groups import GroupService
    from .jobs.service import JobService
    from .settings import Settings


@dataclass(eq=False)
class ServerContext:
    """The collaborators of one app."""

    settings: Settings
    service: JobService
    files: FileService
    #: ``/v1/groups`` (see :mod:`.jobs.groups`).
    groups: GroupService
    #: Who is calling over TCP or a UNIX socket (local mode; see :mod:`.auth.peer`).
    peer_lookup: PeerLookup
    #: The local secret, where no uid can be told (local mode).
    local_secrets: LocalSecrets
    #: ``GET /metrics``: this app's registry (see :mod:`.http.metrics`).
    metrics: ServerMetrics
    #: Token mode: the token authority and who a client certificate names; else None.
    tokens: TokenAuthority | None = None
    client_names: ClientNames | None = None
    #: Why start-up failed, for ``psik-api-server serve`` to say in one line.
    startup_error: StartupError | None = None


def context(app: Any) -> ServerContext:
    """The context of ``app`` (a Starlette app, or ``request.app``)."""
    ctx: ServerContext = app.state.context
    return ctx
