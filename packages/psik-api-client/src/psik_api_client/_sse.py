"""A Server-Sent Events parser: bytes in, messages out, no I/O.

It follows the WHATWG "event stream interpretation" (lines end in CRLF, LF or CR; a
blank line dispatches; ``data`` lines join with newlines; ``id`` persists until
replaced; ``:`` starts a comment), fed chunk by chunk as they arrive, so a line or
a UTF-8 character split across chunks is put back together. Small enough to own
rather than depend on httpx-sse, and it keeps the comments (the server's reason for
closing a stream) that httpx-sse drops.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_EOL = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched message: its ``event`` type (``"message"`` unless named), its
    ``data`` and the stream's last event id at that point (None before any)."""

    event: str
    data: str
    id: str | None


class SSEParser:
    """Feed it the body's chunks; it returns the messages each one completes.

    ``retry`` is the reconnection time (ms) the server last asked for, ``comment``
    its last comment line (heartbeats, or why it is about to close the stream), and
    ``last_event_id`` the id in force at the last blank line: a frame with an ``id``
    and no ``data`` moves it (as it does an EventSource's) without a message."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = ""  # the start of a line not ended yet
        self._skip_lf = False  # the last chunk ended in CR: a LF opening the next one is its pair
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self.retry: int | None = None
        self.comment: str | None = None
        self.last_event_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The messages completed by ``chunk``, in order."""
        text = self._decoder.decode(chunk)
        if self._skip_lf and text:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        if not self._started and (self._tail or text):
            self._started = True
            text = (self._tail + text).removeprefix("\ufeff")
            self._tail = ""
        if text.endswith("\r"):
            self._skip_lf = True
        lines = _EOL.split(self._tail + text)
        self._tail = lines.pop()
        out: list[ServerSentEvent] = []
        for line in lines:
            self._line(line, out)
        return out

    def _line(self, line: str, out: list[ServerSentEvent]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line.startswith(":"):
            self.comment = line[1:].strip()
            return
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._last_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        # Any other field is ignored, as the standard says.

    def _dispatch(self, out: list[ServerSentEvent]) -> None:
        self.last_event_id = self._last_id
        if self._data:
            out.append(ServerSentEvent(self._event or "message", "\n".join(self._data), self._last_id))
        self._data = []
        self._event = ""
