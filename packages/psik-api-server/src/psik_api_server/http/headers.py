"""Headers of every response, and of a download.

A job's files are whatever the job wrote (HTML, SVG, scripts): a browser given one must
never render it as a page of this server's origin. So every response says
``X-Content-Type-Options: nosniff`` (:class:`NoSniff`: a ``Content-Type`` is taken as
said, never guessed from the bytes), and a download is an attachment named for its file
(:func:`attachment`), served as ``application/octet-stream``.
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_NOSNIFF = (b"x-content-type-options", b"nosniff")
_STARTS = ("http.response.start", "websocket.http.response.start")


class NoSniff:
    """Pure ASGI middleware, outermost: ``X-Content-Type-Options: nosniff`` on every
    response the app sends, errors and websocket denials included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def with_header(message: Message) -> None:
            if message["type"] in _STARTS:
                headers = [h for h in message.get("headers", ()) if h[0].lower() != _NOSNIFF[0]]
                message = {**message, "headers": [*headers, _NOSNIFF]}
            await send(message)

        await self.app(scope, receive, with_header)


#: RFC 8187 ``attr-char`` besides letters and digits: what ``filename*`` keeps as is.
_ATTR_CHARS = "!#$&+-.^_`|~"


def attachment(name: str) -> str:
    """The ``Content-Disposition`` of a download of the file ``name`` (RFC 6266): its
    UTF-8 name in ``filename*``, and an ASCII one in ``filename`` for clients without
    RFC 8187 (``curl -OJ``), with every character it cannot carry as ``_``."""
    raw = name.encode("utf-8", "surrogateescape")  # a name that is not UTF-8 stays its bytes
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(raw, safe=_ATTR_CHARS)}"
