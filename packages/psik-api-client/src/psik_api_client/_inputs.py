"""What the client refuses to send: input checked before it goes into a request.

A mistake caught here raises :class:`InvalidRequestError` (also a ``ValueError``)
with a message naming what is wrong, and nothing is sent. The limits are core's, the
same the server enforces.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import pydantic

from psik_api_core import GROUP_ID_PATTERN, LIMITS, JobSpec, JobSummary, is_jobid

from ._exceptions import InvalidRequestError


def path_jobid(jobid: str) -> str:
    """``jobid``, checked to be a job id before it goes into a URL path."""
    if not isinstance(jobid, str) or not is_jobid(jobid):
        raise InvalidRequestError(
            f"not a job id: {jobid!r} (a job id is digits with an optional fraction, e.g. 1693992878.203)"
        )
    return jobid


_GROUP_ID = re.compile(GROUP_ID_PATTERN)


def path_group(group: str) -> str:
    """``group``, checked to be a group id before it goes into a URL."""
    if not isinstance(group, str) or _GROUP_ID.fullmatch(group) is None:
        raise InvalidRequestError(f"not a group id: {group!r} (a group id is 32 lower-case hex digits)")
    return group


#: An HTTP header name is a token (RFC 9110 5.1): h11 refuses any other name.
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
#: A header value: visible ASCII, with spaces and tabs between, none at either end.
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[ \t]*[\x21-\x7e])*)?")


def checked_headers(given: Mapping[str, str] | None, *, argument: str) -> dict[str, str]:
    """The headers ``given`` through ``argument`` (e.g. ``extra_headers=``), checked to
    be sendable: each name an HTTP token, each value printable ASCII (tabs allowed)
    without a line break, a control character or whitespace at either end. httpx would
    refuse the rest only as the request goes out, looking like a connection error.
    A message never shows a value: it may be a credential."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        kind = type(given).__name__
        raise InvalidRequestError(f"{argument} is a mapping of header names to values, not {kind}")
    for name, value in given.items():
        if not (isinstance(name, str) and _TOKEN.fullmatch(name)):
            raise InvalidRequestError(
                f"{argument}: not an HTTP header name: {name!r} "
                "(letters, digits and !#$%&'*+-.^_`|~, no spaces or colons)"
            )
        if not isinstance(value, str):
            kind = type(value).__name__
            raise InvalidRequestError(f"{argument}: header {name}'s value is a str, not {kind}")
        if not _FIELD_VALUE.fullmatch(value):
            raise InvalidRequestError(f"{argument}: header {name}'s value {_value_fault(value)}")
    return dict(given)


def _value_fault(value: str) -> str:
    """What makes ``value`` unsendable, without showing it."""
    if "\r" in value or "\n" in value:
        return "holds a line break (CR or LF)"
    if not value.isascii():
        return "holds a non-ASCII character"
    if value != value.strip(" \t"):
        return "begins or ends with whitespace"
    return "holds a control character (NUL, DEL, ...)"


def validate_spec(data: Mapping[str, Any]) -> JobSpec:
    """``data`` as a job spec, validated as strictly as the server will (unknown fields
    are errors). Raises :class:`InvalidRequestError` naming every field at fault, with
    pydantic's details in ``.errors``."""
    try:
        return JobSpec.validate_input(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequestError(f"invalid job spec: {problems}", errors=exc.errors()) from exc


def spec_body(spec: JobSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body for a job spec. A mapping is validated first (see
    :func:`validate_spec`), so mistakes fail here, before anything is sent. Only the
    fields that were set are sent: the server fills the defaults."""
    if not isinstance(spec, JobSpec):
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(f"a job spec is a JobSpec or a mapping, not {type(spec).__name__}")
        spec = validate_spec(spec)
    body = spec.model_dump(mode="json", exclude_unset=True)
    if spec.cb_secret is not None:
        # model_dump masks secrets; the server needs the real one to sign callbacks.
        body["cb_secret"] = spec.cb_secret.get_secret_value()
    return body


#: A job that another waits for: its id, or the Job (JobSummary) itself.
Parent = str | JobSummary
#: ``after=``: parents, each alone (``"ok"``: it must complete) or as ``(parent, condition)``.
AfterArg = Iterable[Parent | tuple[Parent, str]] | None
CONDITIONS = ("ok", "failed", "any")


def dependencies(after: AfterArg) -> list[dict[str, str]]:
    """``after=`` as the spec's ``after`` entries: ``{"jobid": ..., "condition": ...}``."""
    if after is None:
        return []
    if isinstance(after, str | JobSummary | tuple):
        # One parent is not a list of its characters (or of its fields).
        raise InvalidRequestError(f"after= takes a list of jobs, not {after!r}: after=[job]")
    entries = []
    for entry in after:
        if isinstance(entry, tuple) and len(entry) != 2:
            raise InvalidRequestError(f"after=: an entry is a job or (job, condition), not {entry!r}")
        parent, condition = entry if isinstance(entry, tuple) else (entry, "ok")
        jobid = parent.jobid if isinstance(parent, JobSummary) else parent
        if condition not in CONDITIONS:
            raise InvalidRequestError(
                f"after=: the condition on job {jobid} is one of {', '.join(CONDITIONS)}, not {condition!r}"
            )
        entries.append({"jobid": path_jobid(jobid), "condition": condition})
    return entries


def with_extras(
    spec: JobSpec | Mapping[str, Any], *, after: AfterArg, labels: Mapping[str, str] | None
) -> JobSpec | Mapping[str, Any]:
    """``spec`` with ``after`` appended to its own dependencies and ``labels`` over its
    own labels, validated again (so the limits on both are checked here)."""
    if after is None and labels is None:
        return spec
    body = spec_body(spec)
    if labels is not None:
        if not isinstance(labels, Mapping):
            raise InvalidRequestError(f"labels= is a mapping of keys to values, not {type(labels).__name__}")
        body["labels"] = {**body.get("labels", {}), **labels}
    if after is not None:
        body["after"] = [*body.get("after", []), *dependencies(after)]
    return validate_spec(body)


def idempotency_key(key: str | None) -> str:
    """``key``, or a fresh random one: every submission carries a key, so that
    retrying it after a lost response cannot create a second job."""
    if key is None:
        return str(uuid.uuid4())
    longest = LIMITS.max_idempotency_key
    if not (isinstance(key, str) and 0 < len(key) <= longest and key.isascii() and key.isprintable()):
        raise InvalidRequestError(f"an Idempotency-Key is 1 to {longest} printable ASCII characters")
    if key != key.strip(" "):
        # HTTP drops the spaces around a header value: the server would see another key.
        raise InvalidRequestError("an Idempotency-Key cannot begin or end with a space")
    return key


#: The longest job file path, and path segment, the server accepts (in UTF-8 bytes).
MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255


def file_path(path: str, *, directory: bool = False) -> str:
    """``path`` (a job file, relative to the job's file root, ``/``-separated), checked
    as the server checks it and percent-encoded for the URL; ``""`` is the root.

    It is checked here, not only by the server, because httpx resolves ``.`` and
    ``..`` segments before sending: ``files/../start`` would silently become another
    route. A ``directory`` (listed or deleted) may be ``""`` or end with one ``/``; a
    file may not."""
    if not isinstance(path, str):
        raise InvalidRequestError(f"a job file path is a str, not {type(path).__name__}")
    if path == "":
        if directory:
            return ""
        raise InvalidRequestError("a job file path is needed (e.g. 'data.txt' or 'out/result.csv')")
    fault = _path_fault(path, directory=directory)
    if fault:
        raise InvalidRequestError(f"not a job file path: {path[:80]!r}: {fault}")
    return quote(path, safe="/")


def _path_fault(path: str, *, directory: bool) -> str | None:
    if path.startswith("/"):
        return "it is absolute; job file paths are relative to the job's directory"
    if "\\" in path:
        return "it holds a backslash; separate directories with '/'"
    if "\x00" in path:
        return "it holds a NUL byte"
    if not _is_utf8(path):
        # A local name in another encoding (surrogate-escaped by the OS): the server's
        # paths are UTF-8, and quoting it for the URL would fail.
        return "it is not valid UTF-8 (a name in another encoding: rename it)"
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        return f"it is longer than {MAX_PATH_BYTES} bytes"
    segments = path.split("/")
    if segments[-1] == "" and len(segments) > 1:
        if not directory:
            return "it ends with '/'; a file's path names the file"
        segments.pop()
    for segment in segments:
        if segment == "":
            return "it has an empty segment ('//')"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment; a path stays inside the job's directory"
        if len(segment.encode("utf-8", "surrogateescape")) > MAX_SEGMENT_BYTES:
            return f"a segment is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: psik's log names; ``stdout``/``stderr`` alone are the current run's.
LOG_NAME = re.compile(r"console|(?:stdout|stderr)(?:\.[0-9]{1,9})?", re.ASCII)


def log_name(name: str) -> str:
    """``name``, checked to be a log's name before it goes into a URL path."""
    if not isinstance(name, str) or LOG_NAME.fullmatch(name) is None:
        raise InvalidRequestError(
            f"not a log name: {name!r} (logs are console, stdout, stderr, or stdout.N/stderr.N for run N)"
        )
    return name


def count(value: int | None, argument: str, least: int) -> int | None:
    """``value`` of ``argument`` (e.g. ``tail=``), checked to be None or an int >= ``least``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidRequestError(f"{argument} is an integer >= {least}, not {value!r}")
    return value
