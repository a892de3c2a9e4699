"""The ``Range`` header of a download (RFC 9110 14.2): one byte range, or the whole file."""

from __future__ import annotations


class Unsatisfiable(Exception):
    """A ``Range`` no byte of the file is in."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``(first, last)`` (inclusive) a ``Range`` header asks for;
    None to answer the whole file (no header, a malformed one, or several ranges);
    :class:`Unsatisfiable` if it asks for none of the file's bytes."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not all(s.isascii() and (s.isdigit() or not s) for s in (first, last)):
        return None
    if not first:  # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size - 1)
