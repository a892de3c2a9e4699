"""Validators of a job's files and the preconditions of a write: the ETag and
Last-Modified a download carries, and ``If-Match`` / ``If-None-Match`` on an upload
(RFC 9110 13.1.1, 13.1.2)."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from email.utils import formatdate

from psik_api_core import ProblemCode

from ..errors import ApiError


def exists_already(text: str) -> ApiError:
    return ApiError(
        ProblemCode.precondition_failed,
        f"{text[:200]!r} exists and If-None-Match: * forbids overwriting it; nothing changed",
    )


def precondition_failed(text: str, why: str) -> ApiError:
    return ApiError(ProblemCode.precondition_failed, f"{text[:200]!r}: {why}; nothing changed")


def etag(st: os.stat_result) -> str:
    """A strong validator: changes whenever the file is replaced or written."""
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
    return '"' + hashlib.sha256(key).hexdigest()[:32] + '"'


def last_modified(st: os.stat_result) -> str:
    return formatdate(st.st_mtime, usegmt=True)


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


@dataclass(frozen=True)
class Preconditions:
    """A write's ``If-Match`` and ``If-None-Match`` headers (RFC 9110 13.1.1, 13.1.2),
    checked against the file as it is (its :func:`etag`) before the body is read and
    again just before the rename."""

    if_match: str | None = None
    if_none_match: str | None = None

    @property
    def exclusive(self) -> bool:
        """``If-None-Match: *``: the file must not exist, whatever appears meanwhile."""
        return self.if_none_match is not None and self.if_none_match.strip() == "*"

    def check(self, current: os.stat_result | None, shown: str) -> None:
        """412 unless the file now at the target (None: nothing there) meets them."""
        tag = etag(current) if current is not None and not stat.S_ISDIR(current.st_mode) else None
        if self.if_match is not None:
            wanted = _tags(self.if_match)
            if tag is None:
                raise precondition_failed(shown, "does not exist, and If-Match asks for a version of it")
            if wanted != ["*"] and tag not in wanted:  # strong comparison: a W/ tag never matches
                raise precondition_failed(
                    shown, f"is at ETag {tag}, not one If-Match names (changed since it was read)"
                )
        if self.if_none_match is not None and current is not None:
            if self.exclusive:
                raise exists_already(shown)
            if tag is not None and tag in {t.removeprefix("W/") for t in _tags(self.if_none_match)}:
                raise precondition_failed(shown, f"is at ETag {tag}, which If-None-Match excludes")
