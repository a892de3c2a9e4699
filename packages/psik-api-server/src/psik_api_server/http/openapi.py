"""The OpenAPI 3.1 document of psik-api, built from the table of operations.

The wire contract is ``docs/http-api.md``. Each route is one :class:`Operation` row in
:data:`OPERATIONS`; its schemas are core's pydantic models and its limits core's
:data:`~psik_api_core.LIMITS`, so the document describes exactly what the server
validates and serialises. :func:`build_openapi` turns the table into the document
served at ``/openapi.json`` (and rendered at ``/``); ``routes.build_routes`` turns the
same table into the router, so no route exists without its entry here, nor an entry
without its route.

This module needs no web framework (pydantic and core only): the table is data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from psik_api_core import (
    GROUP_ID_PATTERN,
    JOBID_PATTERN,
    LIMITS,
    BackendInfo,
    Event,
    FileInfo,
    FileListing,
    Group,
    GroupRequest,
    Job,
    JobSpec,
    JobState,
    JobStatus,
    JobSummary,
    Page,
    Problem,
    ProblemCode,
)
from psik_api_core.limits import byte_size
from psik_api_core.models import LABEL_KEY_PATTERN, MAX_COUNT

from .._version import __version__
from ..jobs.logs import LOG_NAME_REGEX, VALID_NAMES
from ..serving.request_log import REQUEST_ID_PATTERN

OPENAPI_VERSION = "3.1.0"
PROBLEM_JSON = "application/problem+json"
OCTET_STREAM = "application/octet-stream"
#: Anchored for JSON Schema (ECMA-262, where ``$`` does not match before a final newline).
JOBID_REGEX = f"^{JOBID_PATTERN}$"
#: ``?label=key=value``: a label's key, ``=``, a value of no control characters.
LABEL_FILTER_REGEX = f"^{LABEL_KEY_PATTERN}=[^\\x00-\\x1f\\x7f]{{0,{LIMITS.max_label_value}}}$"
_REF_TEMPLATE = "#/components/schemas/{model}"

_INTRO = """\
A REST job API over psik's HPC batch backends (local, Slurm, PBS, LSF, ...).

Submit a `JobSpec` to `POST /v1/jobs`, follow it with `GET /v1/jobs/{jobid}/state`,
cancel it with `DELETE /v1/jobs/{jobid}`. Job ids are psik's stamps, e.g. `1693992878.203`.

All bodies are JSON and times are RFC 3339 UTC datetimes. Every error is an RFC 9457
`application/problem+json` document whose `code` is stable: match on it, not on `title`.
Unknown routes are 404 `not_found`, wrong methods 405 `method_not_allowed`, unknown
query parameters and body fields 422 `validation_error` naming them. When the server's disk
is full, requests that must write are 507 `insufficient_storage`; reads keep working.

Every response carries `X-Request-ID`, and every problem its `request_id`: the id the
server logged the request under (the client's own `X-Request-ID` when it is 1 to 64 of
`A-Z a-z 0-9 . _ -`, else a new one). Quote it when reporting a problem."""

_TAGS = (
    {"name": "jobs", "description": "Submit, list, follow and cancel jobs."},
    {"name": "files", "description": "A job's working directory: stage inputs, fetch outputs."},
    {"name": "groups", "description": "Many jobs in one request: batches, sweeps, workflows."},
    {"name": "events", "description": "Every state change of the caller's jobs, as it happens."},
    {"name": "backends", "description": "The batch systems jobs can run on."},
    {"name": "tokens", "description": "Bearer tokens for `authz: token` (TLS) servers."},
    {"name": "callbacks", "description": "State reports from jobs, signed with a per-job secret."},
    {"name": "service", "description": "Health and self-description of the server."},
)


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter. Its ``schema`` is both what the document says
    and what the router checks before the handler runs (``http.params.read_params``): a
    boolean, an integer within ``minimum``..``maximum``, one of an ``enum``, a job id
    (``pattern`` :data:`JOBID_REGEX`), at most ``maxItems`` values, a header's
    ``minLength``..``maxLength`` printable ASCII characters; ``default`` when absent."""

    name: str
    location: Literal["path", "query", "header"]
    description: str
    schema: Mapping[str, Any]
    required: bool = False
    #: Repeatable query parameter (``?state=queued&state=active``).
    repeatable: bool = False
    #: Gets the configured backend names as examples.
    names_backend: bool = False
    #: A path parameter whose value may hold ``/`` (a file path): routed as ``{name:path}``.
    slashes: bool = False


@dataclass(frozen=True)
class Reply:
    """A success response. ``body`` is a model, ``list[Model]``, an inline schema or None."""

    description: str
    body: object = None
    media_type: str = "application/json"
    headers: tuple[str, ...] = ()
    #: Other media types the same reply comes in (by ``Accept``), each with its body.
    also: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Failure:
    """An error response an operation can give, and when."""

    code: ProblemCode
    when: str


@dataclass(frozen=True)
class Operation:
    """One route of the API: ``operation_id`` also names its handler in the router."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    description: str
    replies: Mapping[int, Reply]
    params: tuple[Param, ...] = ()
    request: type[BaseModel] | None = None
    failures: tuple[Failure, ...] = ()
    #: A request body that is not a model: its schema by media type (file uploads).
    body: Mapping[str, Mapping[str, Any]] | None = None


# ---- the building blocks the table shares ----

_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {
        "description": "The URL of the new job.",
        "schema": {"type": "string", "format": "uri-reference"},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "ETag": {
        "description": "A strong validator of this version of the file (for `If-None-Match`, `If-Range`).",
        "schema": {"type": "string"},
    },
    "Last-Modified": {
        "description": "When the file was last written.",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"description": "Always `bytes`.", "schema": {"const": "bytes"}},
    "Content-Range": {
        "description": "The part sent, `bytes FIRST-LAST/SIZE`.",
        "schema": {"type": "string"},
    },
    "X-Checksum-Sha256": {
        "description": "The SHA-256 (hex) of the whole file, when it is known (cached, or the file"
        " is at most 1 MiB; a download never waits for a large file's hash): check a download"
        " against it; without it, check the size.",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
    "X-Log-Size": {
        "description": "The log's size in bytes when it was read.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-Request-ID": {
        "description": "The id the server logged this request under: the request's own"
        " `X-Request-ID` if it sent a sane one, else a new one.",
        "required": True,
        "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
    },
}

_JOBID = Param(
    "jobid",
    "path",
    "A job id: psik's stamp, digits with an optional fraction.",
    {"type": "string", "pattern": JOBID_REGEX, "examples": ["1693992878.203"]},
    required=True,
)
_IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    "Makes a retried POST safe: the same key with the same body answers with the job the"
    " first request created, instead of creating a second one. Printable ASCII (a header"
    " value's leading and trailing spaces are not part of it).",
    {
        "type": "string",
        "minLength": 1,
        "maxLength": LIMITS.max_idempotency_key,
        "pattern": "^[\\u0021-\\u007e]([\\u0020-\\u007e]*[\\u0021-\\u007e])?$",
    },
)

_BAD_JOBID = Failure(
    ProblemCode.validation_error,
    'the job id in the path is malformed (`errors[0].loc == ["path", "jobid"]`)',
)
_NO_JOB = Failure(ProblemCode.not_found, "no such job, or it is not the caller's")
_GROUP = Param(
    "group",
    "path",
    "A group id: 32 lower-case hex digits.",
    {"type": "string", "pattern": f"^{GROUP_ID_PATTERN}$"},
    True,
)
_BAD_GROUP = Failure(ProblemCode.validation_error, "the group id in the path is malformed")
_NO_GROUP = Failure(ProblemCode.not_found, "no such group, or it is not the caller's")
_BODY_FAILURES = (
    Failure(ProblemCode.bad_request, "the body is not JSON"),
    Failure(ProblemCode.too_large, f"the body is over {byte_size(LIMITS.max_body_bytes)}"),
    Failure(
        ProblemCode.unsupported_media_type,
        "the body's `Content-Type` is not `application/json` (or `*/*+json`), or is missing",
    ),
    Failure(ProblemCode.validation_error, "the body is not a valid JobSpec; `errors` name the fields"),
    Failure(ProblemCode.unknown_backend, "`backend` names no configured backend"),
    Failure(ProblemCode.idempotency_mismatch, "the `Idempotency-Key` was used with another body"),
    Failure(
        ProblemCode.idempotency_in_flight,
        "a request with this `Idempotency-Key` is still running; retry after `Retry-After`",
    ),
)
_FILES_INVALID = Failure(
    ProblemCode.job_files_invalid,
    "the job replaced its own `status.csv` or `spec.json` (a FIFO, a directory, a link) or made it"
    " unwritable: its state cannot be read or recorded; `file` names it. A cancel records the job"
    " `failed` in the index and ends its processes; a purge removes it",
)
_SUBMIT_FAILED = Failure(
    ProblemCode.submit_failed,
    "the backend refused the job; the job exists in state `failed` and the problem has `jobid`",
)
_UNAVAILABLE = Failure(
    ProblemCode.backend_unavailable,
    "the job's backend cannot take jobs: psik cannot load it (nothing was made), or its"
    " scheduler cannot be reached (the detail names the backend and gives the scheduler's"
    " message; the job is kept in state `failed` with that reason in its history, and the"
    " problem has `jobid`: start it again once the backend is back)",
)
_DISK_FULL = Failure(
    ProblemCode.insufficient_storage,
    "the filesystem of the job prefix or of the index is full (the detail says which): nothing"
    " was made or changed and an `Idempotency-Key` is free again; retry once space is freed."
    " Reads keep working",
)

_FILE_PATH = Param(
    "path", "path",
    "A path relative to the job's working directory, `/`-separated; percent-decoded once, so"
    " `inputs%2Fa.csv` is `inputs/a.csv` (and `%252F` the characters `%2F` of a name). Once"
    " decoded: no `.` or `..` segment, no empty segment (one trailing `/` is allowed), not"
    " absolute, no backslash or control character (NUL, newline...); at most 4096 bytes,"
    " 255 a segment.",
    {"type": "string", "pattern": "^[^\\u0000-\\u001f\\u007f\\\\]*$",
     "examples": ["data.txt", "inputs/a.csv"]}, True, slashes=True,
)  # fmt: skip
#: The largest integer a query parameter takes (18 digits): a log's offset or tail. An
#: integer bounded by it alone is refused as "not an integer >= its minimum".
LARGEST_COUNT = 10**18 - 1
_RECURSIVE = Param(
    "recursive", "query", "List subdirectories too (symlinks are listed, not followed).",
    {"type": "boolean", "default": False},
)  # fmt: skip
_BAD_PATH = Failure(
    ProblemCode.invalid_path,
    "the path, once percent-decoded, has a `.` or `..` segment, is absolute, or has a NUL, a"
    " backslash or an empty segment; the detail says which",
)
_LEAVES = Failure(
    ProblemCode.forbidden,
    "the path leads out of the job's directory (through a symlink, also one swapped in while"
    " the request ran), or the job's directory is outside the roots the server allows",
)
_NO_JOB_OR_FILE = Failure(ProblemCode.not_found, "no such job (or it is not the caller's), or no such file")
_UPLOAD_TOO_LARGE = Failure(
    ProblemCode.too_large,
    "the upload is over the server's `max_upload_bytes` (the detail says it); nothing was kept",
)
_EXISTS = Failure(
    ProblemCode.precondition_failed,
    "`If-None-Match: *` and the file exists, `If-None-Match` names its ETag, or `If-Match` names"
    " none of its ETag (or it does not exist); nothing changed",
)
_FILE_BODY = {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}
_FILE_HEADERS = ("ETag", "Last-Modified", "Accept-Ranges", "X-Checksum-Sha256")

_TOKEN: dict[str, Any] = {
    "type": "object",
    "properties": {
        "token": {"type": "string", "description": "The biscuit, base64 (URL-safe)."},
        "user": {"type": "string", "description": "Whom it acts for: `uid:<name>` or `cn:<name>`."},
        "expires": {"type": "string", "format": "date-time"},
    },
    "required": ["token", "user", "expires"],
}
_SHOWN: dict[str, Any] = {
    "type": "object",
    "properties": {
        "user": {"type": "string"},
        "expires": {"type": ["string", "null"], "format": "date-time"},
        "blocks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["user", "expires", "blocks"],
}

# ---- the table ----
# The router matches paths in the order they first appear here, first match wins: a
# literal path (`/v1/jobs/new`) must come before a template it fits (`/v1/jobs/{jobid}`);
# `routes.build_routes` refuses a table where it does not.
# One route per block reads better than one argument per line:
# fmt: off
#: What a raw upload (PUT, or POST to a file path) can fail with.
_UPLOAD_FAILURES = (
    _BAD_JOBID, _NO_JOB, _BAD_PATH, _LEAVES,
    Failure(ProblemCode.conflict, "the path is a directory, or goes through a file"),
    _EXISTS,
    _UPLOAD_TOO_LARGE,
    Failure(ProblemCode.unsupported_media_type, "a body type a browser form can send"),
    _DISK_FULL,
)

_EVENTS_DESCRIPTION = (
    "Every row of the caller's jobs' histories, as an `Event` with a server-wide id that only"
    " grows (across restarts too). As Server-Sent Events (`text/event-stream`, the default):"
    " each event is a frame `id: <id>`, `event: status`, `data: <Event JSON>` (the first frame,"
    " `retry: 1000` and `id: <where the stream starts>`, has no data); first every"
    " event after `Last-Event-ID` (or `after`; without either, from now on), then live ones,"
    " with none lost or repeated. Comment lines are heartbeats, and, before the server ends a"
    " stream (a reader that fell too far behind, a shutdown), the reason: reconnect with"
    " `Last-Event-ID`. With `Accept: application/json`, a long poll: the events after `after`"
    " as a JSON list as soon as there is one, or `[]` after `timeout` seconds."
)
_EVENTS_REPLY = Reply(
    "The event stream (or, for `Accept: application/json`, a list of events).",
    Event,
    media_type="text/event-stream",
    also=(("application/json", list[Event]),),
)
_EVENT_PARAMS = (
    Param("state", "query", "Only events after which the job is in one of these states (`job_state`).",
          {"type": "array", "items": {"type": "string", "enum": [s.value for s in JobState]}},
          repeatable=True),
    Param("after", "query", "Replay the events with a larger id first (0: every one kept).",
          {"type": "integer", "minimum": 0, "maximum": LARGEST_COUNT}),
    Param("Last-Event-ID", "header", "As `after` (wins over it): what an EventSource sends on reconnecting.",
          {"type": "string", "minLength": 1, "maxLength": 19, "pattern": "^[0-9]+$"}),
    Param("timeout", "query", "Long poll only: seconds to wait for an event.",
          {"type": "integer", "minimum": 0, "maximum": 300, "default": 30}),
    Param("limit", "query", "Long poll only: the most events in one answer.",
          {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}),
)
_EVENT_FAILURES = (
    Failure(ProblemCode.validation_error, "a query parameter or `Last-Event-ID` is invalid"),
    Failure(ProblemCode.too_many_streams, "the server keeps as many event streams open as it will"),
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/v1/backends", "listBackends", "backends", "List backends",
        "The configured backends and whether each can take jobs now: a Slurm backend's"
        " controller is asked (`scontrol ping`) and its partition's state (`sinfo`), at most"
        " every 5 s; `detail` says why one cannot.",
        {200: Reply("The configured backends.", list[BackendInfo])},
    ),
    Operation(
        "GET", "/v1/backends/{name}", "getBackend", "backends", "Get a backend",
        "One configured backend.",
        {200: Reply("The backend.", BackendInfo)},
        params=(Param("name", "path", "A backend name.", {"type": "string"}, True, names_backend=True),),
        failures=(Failure(ProblemCode.not_found, "no backend has this name"),),
    ),
    Operation(
        "GET", "/v1/token", "mintToken", "tokens", "Mint a token",
        "A biscuit bearer token for the caller's client certificate (`authz: token`, under"
        " `certified serve`): send it as `Authorization: Bearer <token>`. Anyone holding it acts"
        " as its user until it expires; narrow it before handing it on (read-only, some jobs,"
        " an earlier expiry: `psik_api_client.attenuate`).",
        {200: Reply("The token.", _TOKEN)},
        params=(Param("expires", "query", "Lifetime in seconds (at most the server's `token_lifetime`).",
                      {"type": "number", "exclusiveMinimum": 0}),),
        failures=(
            Failure(ProblemCode.unauthorized, "the server runs without TLS: there is no certificate to"
                    " mint for"),
            Failure(ProblemCode.forbidden, "the request carries a token: mint with the certificate alone"),
            Failure(ProblemCode.not_found, "the server is `authz: local`: it has no tokens"),
            Failure(ProblemCode.validation_error, "a query parameter is invalid or unknown"),
        ),
    ),
    Operation(
        "GET", "/v1/token/key", "getTokenKey", "tokens", "The token public key",
        "The public key tokens are signed with (`ed25519/<hex>`): what attenuating a token needs.",
        {200: Reply("The key.", {"type": "object", "properties": {"public_key": {"type": "string"}},
                                 "required": ["public_key"]})},
        failures=(Failure(ProblemCode.not_found, "the server is `authz: local`: it has no tokens"),),
    ),
    Operation(
        "POST", "/v1/token", "showToken", "tokens", "Verify a token",
        "Checks a token against this server's key and the time, and shows its user, expiry and the"
        " Datalog of each block (the first is the server's; each later one narrows it).",
        {200: Reply("The token is valid here.", _SHOWN)},
        body={"application/json": {"schema": {
            "type": "object", "properties": {"token": {"type": "string"}},
            "required": ["token"], "additionalProperties": False,
        }}},
        failures=(
            Failure(ProblemCode.unauthorized, "the token is damaged, not signed by this server, or expired"),
            Failure(ProblemCode.bad_request, "the body is not JSON"),
            Failure(ProblemCode.validation_error, 'the body is not `{"token": "..."}`'),
            Failure(ProblemCode.not_found, "the server is `authz: local`: it has no tokens"),
        ),
    ),
    Operation(
        "POST", "/v1/jobs", "submitJob", "jobs", "Submit a job",
        "Creates a job from a `JobSpec` and submits it to its backend. The job is `queued`,"
        " or already final if it ended at once. Only `script` is required.",
        {201: Reply("The job, submitted.", Job, headers=("Location",))},
        params=(_IDEMPOTENCY_KEY,), request=JobSpec,
        failures=(*_BODY_FAILURES, _SUBMIT_FAILED, _UNAVAILABLE, _DISK_FULL),
    ),
    Operation(
        "POST", "/v1/groups", "createGroup", "groups", "Submit many jobs at once",
        "Makes one job per spec of `jobs`, or per combination of a sweep's `params` (each value in"
        " that job's environment under its name), and submits them; all or nothing: a bad entry"
        " refuses the whole request (422 naming `jobs[i]...` or `spec...`) and nothing is made."
        " An `after` entry may name the request's `index`-th job, so a whole DAG is one request."
        f" At most {LIMITS.max_group_jobs} jobs. Idempotent with an `Idempotency-Key`, across"
        " restarts too.",
        {201: Reply("The group and its jobs, in the order given.", Group, headers=("Location",))},
        params=(_IDEMPOTENCY_KEY,), request=GroupRequest,
        failures=(*_BODY_FAILURES, _UNAVAILABLE, _DISK_FULL),
    ),
    Operation(
        "GET", "/v1/groups/{group}", "getGroup", "groups", "Get a group",
        "The group's jobs (summaries) and how many are in each state (`states`).",
        {200: Reply("The group.", Group)},
        params=(_GROUP,), failures=(_BAD_GROUP, _NO_GROUP),
    ),
    Operation(
        "DELETE", "/v1/groups/{group}", "cancelGroup", "groups", "Cancel a group",
        "Cancels every job of the group that has not ended; the group as it then is.",
        {200: Reply("The group.", Group)},
        params=(_GROUP,), failures=(_BAD_GROUP, _NO_GROUP, _UNAVAILABLE, _DISK_FULL),
    ),
    Operation(
        "POST", "/v1/jobs/new", "createJob", "jobs", "Create a job without submitting it",
        "Creates a job in state `new`; start it later with `POST /v1/jobs/{jobid}/start`.",
        {201: Reply("The job, in state `new`.", Job, headers=("Location",))},
        params=(_IDEMPOTENCY_KEY,), request=JobSpec, failures=(*_BODY_FAILURES, _UNAVAILABLE, _DISK_FULL),
    ),
    Operation(
        "POST", "/v1/jobs/{jobid}/start", "startJob", "jobs", "Start a job",
        "Submits a `new` job, or a final one again (its next run gets the next `jobndx`).",
        {200: Reply("The job, submitted.", Job)},
        params=(_JOBID,),
        failures=(
            _BAD_JOBID, _NO_JOB,
            Failure(ProblemCode.conflict, "the job is queued or active; the problem has `jobid` and `state`"),
            _FILES_INVALID, _SUBMIT_FAILED, _UNAVAILABLE, _DISK_FULL,
        ),
    ),
    Operation(
        "GET", "/v1/jobs", "listJobs", "jobs", "List jobs",
        "The caller's jobs, newest first, one page at a time. Filters combine with AND;"
        " a repeated filter matches any of its values.",
        {200: Reply("One page of jobs (with `view=full`, of jobs with spec and history).",
                    Page[Job | JobSummary])},
        params=(
            Param("state", "query", "Only jobs in one of these states.",
                  {"type": "array", "items": {"type": "string", "enum": [s.value for s in JobState]}},
                  repeatable=True),
            Param("backend", "query", "Only jobs on this backend.", {"type": "string"}, names_backend=True),
            Param("name", "query", "Only jobs with this name.", {"type": "string"}),
            Param("id", "query", f"Only these jobs (up to {LIMITS.max_ids} ids).",
                  {"type": "array", "items": {"type": "string", "pattern": JOBID_REGEX},
                   "maxItems": LIMITS.max_ids},
                  repeatable=True),
            Param("limit", "query", "Page size.",
                  {"type": "integer", "minimum": 1, "maximum": LIMITS.max_page_size,
                   "default": LIMITS.default_page_size}),
            Param("cursor", "query", "Opaque: a page's `next_cursor`, for the page after it.",
                  {"type": "string"}),
            Param("label", "query", "Only jobs with this label (`key=value`; repeated: with every one).",
                  {"type": "array", "items": {"type": "string", "pattern": LABEL_FILTER_REGEX},
                   "maxItems": LIMITS.max_labels},
                  repeatable=True),
            Param("group", "query", "Only the jobs of this group (`POST /v1/groups`).",
                  {"type": "string", "pattern": f"^{GROUP_ID_PATTERN}$"}),
            Param("view", "query", "`full`: each job as `GET /v1/jobs/{jobid}` has it, with its spec and"
                  " history (a job whose directory cannot be read stays a summary), so that a"
                  " client needs no request per job.",
                  {"type": "string", "enum": ["summary", "full"], "default": "summary"}),
        ),
        failures=(Failure(ProblemCode.validation_error, "a query parameter is invalid or unknown"),),
    ),
    Operation(
        "GET", "/v1/jobs/{jobid}", "getJob", "jobs", "Get a job",
        "The job with its spec (`cb_secret` is write-only: never returned) and full history.",
        {200: Reply("The job.", Job)},
        params=(_JOBID,), failures=(_BAD_JOBID, _NO_JOB, _FILES_INVALID),
    ),
    Operation(
        "DELETE", "/v1/jobs/{jobid}", "cancelJob", "jobs", "Cancel or purge a job",
        "Cancels the job; idempotent, and a final job stays as it was. With `purge=true`,"
        " removes a final job and its directory instead.",
        {
            200: Reply("The job, canceled (or final already).", Job),
            204: Reply("`purge=true`: the job and its directory are gone."),
        },
        params=(
            _JOBID,
            Param("purge", "query", "Remove a final job instead of canceling it.",
                  {"type": "boolean", "default": False}),
        ),
        failures=(
            _BAD_JOBID, _NO_JOB,
            Failure(ProblemCode.conflict, "`purge=true` on a job that is not final; cancel it first"),
            _FILES_INVALID,
            Failure(
                ProblemCode.backend_unavailable,
                "the job's scheduler cannot be reached to cancel it (a Slurm controller down): nothing"
                " was recorded and the job may still run; cancel again once the backend is back",
            ),
            _DISK_FULL,
        ),
    ),
    Operation(
        "GET", "/v1/jobs/{jobid}/state", "getJobState", "jobs", "Get a job's state",
        "The state alone: cheap to poll.",
        {200: Reply("The job's state.", JobStatus)},
        params=(_JOBID,), failures=(_BAD_JOBID, _NO_JOB),
    ),
    Operation(
        "GET", "/v1/jobs/{jobid}/logs", "getJobLogs", "jobs", "Get a job's logs",
        "Every log of the job (`console`, `stdout.N`, `stderr.N`; N is the run), decoded as"
        " UTF-8 with replacement characters. A log over"
        f" {byte_size(LIMITS.max_log_bytes_in_logs)} keeps its last bytes, after a line saying"
        " how many were left out; `GET /v1/jobs/{jobid}/logs/{name}` has them all.",
        {200: Reply("Each log's text, by name.",
                    {"type": "object", "additionalProperties": {"type": "string"}})},
        params=(_JOBID,), failures=(_BAD_JOBID, _NO_JOB),
    ),
    Operation(
        "GET", "/v1/jobs/{jobid}/logs/{name}", "getJobLog", "jobs", "Get or follow one log",
        "The log's bytes as the job wrote them. `offset` or `tail` pick where to start;"
        " `follow=true` streams on as the job writes, until the job is final and the log is"
        " read to its end (a log not written yet is waited for while the job runs).",
        {200: Reply("The log's bytes.", {"type": "string"}, media_type="text/plain",
                    headers=("X-Log-Size",))},
        params=(
            _JOBID,
            Param("name", "path", f"The log: {VALID_NAMES}.",
                  {"type": "string", "pattern": LOG_NAME_REGEX}, True),
            Param("offset", "query", "Start this many bytes into the log.",
                  {"type": "integer", "minimum": 0, "maximum": LARGEST_COUNT, "default": 0}),
            Param("tail", "query", "Only the last this many lines (not with an `offset` other than 0).",
                  {"type": "integer", "minimum": 1, "maximum": LARGEST_COUNT}),
            Param("follow", "query", "Stream new output until the job is final.",
                  {"type": "boolean", "default": False}),
        ),
        failures=(
            _BAD_JOBID,
            Failure(ProblemCode.not_found,
                    "no such job, or it is not the caller's; no log of this name (the detail names"
                    " the valid ones); without `follow`, a log not written yet"),
            Failure(ProblemCode.validation_error, "a query parameter is invalid or unknown, or"
                    " `offset` and `tail` are both given"),
        ),
    ),
    Operation(
        "GET", "/v1/events", "getEvents", "events", "Stream the caller's job events",
        _EVENTS_DESCRIPTION,
        {200: _EVENTS_REPLY},
        params=(
            Param("jobs", "query", f"Only these jobs' events (up to {LIMITS.max_ids} ids).",
                  {"type": "array", "items": {"type": "string", "pattern": JOBID_REGEX},
                   "maxItems": LIMITS.max_ids},
                  repeatable=True),
            Param("label", "query", "Only events of jobs with this label (`key=value`; repeated: every one).",
                  {"type": "array", "items": {"type": "string", "pattern": LABEL_FILTER_REGEX},
                   "maxItems": LIMITS.max_labels},
                  repeatable=True),
            *_EVENT_PARAMS,
        ),
        failures=_EVENT_FAILURES,
    ),
    Operation(
        "GET", "/v1/jobs/{jobid}/events", "getJobEvents", "events", "Stream one job's events",
        "As `GET /v1/events?jobs={jobid}`, and 404 for a job that is not the caller's.",
        {200: _EVENTS_REPLY},
        params=(_JOBID, *_EVENT_PARAMS),
        failures=(_BAD_JOBID, _NO_JOB, *_EVENT_FAILURES),
    ),
    Operation(
        "GET", "/v1/jobs/{jobid}/files", "listJobFiles", "files", "List a job's files",
        "The job's working directory (its `spec.directory`, or the job's own `work`): name, type,"
        " size and time of each entry, sorted by path. A listing stops at"
        f" {LIMITS.max_list_entries} entries and then says `truncated`.",
        {200: Reply("The listing.", FileListing)},
        params=(_JOBID, _RECURSIVE),
        failures=(_BAD_JOBID, _NO_JOB, _LEAVES,
                  Failure(ProblemCode.validation_error, "a query parameter is invalid or unknown")),
    ),
    Operation(
        "POST", "/v1/jobs/{jobid}/files", "uploadJobFiles", "files", "Upload files (multipart)",
        "Writes every part named `files` at its filename (a relative path; under `dir` if given),"
        f" each atomically; at most {LIMITS.max_upload_files} parts. All or nothing: when one part"
        " is refused, nothing of the request is kept. Refused from a web page of another origin.",
        {201: Reply("The files written.", list[FileInfo])},
        params=(
            _JOBID,
            Param("dir", "query", "A relative directory to write the files into (made if missing).",
                  {"type": "string", "default": "", "pattern": "^[^\\u0000-\\u001f\\u007f\\\\]*$"}),
        ),
        body={"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            "required": ["files"],
        }}},
        failures=(
            _BAD_JOBID, _NO_JOB, _BAD_PATH, _LEAVES,
            Failure(ProblemCode.bad_request, "the body is not a complete multipart form, a `files` part"
                    " has no filename or a filename comes twice"),
            Failure(ProblemCode.conflict, "a file's path is a directory, or goes through a file"),
            Failure(ProblemCode.too_large, "the upload is over the server's `max_upload_bytes`, or has"
                    f" more than {LIMITS.max_upload_files} parts; nothing was kept"),
            Failure(ProblemCode.unsupported_media_type, "the body is not `multipart/form-data`"),
            Failure(ProblemCode.validation_error, "a query parameter is invalid or unknown"),
            _DISK_FULL,
        ),
    ),
    Operation(
        "GET", "/v1/jobs/{jobid}/files/{path}", "getJobFile", "files", "Download a file, or list a directory",
        "A directory answers its listing (as `GET /v1/jobs/{jobid}/files`). A file answers its"
        " bytes, streamed, with `ETag`, `Last-Modified` and `X-Checksum-Sha256`; one `Range`"
        " (`bytes=A-B`, `A-`, `-N`) answers 206 with just those bytes (several ranges: the whole"
        " file), `If-Range` sends the whole file instead when it changed, `If-None-Match` with"
        " the current ETag answers 304. A symlink that stays inside the job's directory is followed.",
        {
            200: Reply("The file's bytes, or the directory's listing (`application/json`).",
                       {"type": "string", "format": "binary"}, media_type=OCTET_STREAM,
                       headers=_FILE_HEADERS),
            206: Reply("The bytes of the range asked for.", {"type": "string", "format": "binary"},
                       media_type=OCTET_STREAM, headers=(*_FILE_HEADERS, "Content-Range")),
            304: Reply("The file has the ETag given in `If-None-Match`.", headers=("ETag", "Last-Modified")),
        },
        params=(_JOBID, _FILE_PATH, _RECURSIVE),
        failures=(
            _BAD_JOBID, _NO_JOB_OR_FILE, _BAD_PATH, _LEAVES,
            Failure(ProblemCode.range_not_satisfiable,
                    "the `Range` starts past the file's end; `Content-Range: bytes */SIZE` says its size"),
            Failure(ProblemCode.validation_error, "a query parameter is invalid or unknown"),
        ),
    ),
    Operation(
        "PUT", "/v1/jobs/{jobid}/files/{path}", "putJobFile", "files", "Upload a file",
        "Writes the raw body to the file, atomically (a half-sent upload leaves nothing), making"
        " missing directories; files are the owner's alone (0600). `If-None-Match: *` refuses to"
        " overwrite. Any body type but those a browser form can send (`text/plain`,"
        " `application/x-www-form-urlencoded`, `multipart/form-data`).",
        {201: Reply("The file, created.", FileInfo), 200: Reply("The file, replaced.", FileInfo)},
        params=(_JOBID, _FILE_PATH), body=_FILE_BODY,
        failures=_UPLOAD_FAILURES,
    ),
    Operation(
        "POST", "/v1/jobs/{jobid}/files/{path}", "postJobFile", "files", "Upload a file (as PUT)",
        "As `PUT`: what `curl --upload-file data.txt -X POST .../files/` sends.",
        {201: Reply("The file, created.", FileInfo), 200: Reply("The file, replaced.", FileInfo)},
        params=(_JOBID, _FILE_PATH), body=_FILE_BODY,
        failures=_UPLOAD_FAILURES,
    ),
    Operation(
        "DELETE", "/v1/jobs/{jobid}/files/{path}", "deleteJobFile", "files", "Delete a file",
        "Removes the file (a symlink itself, not its target); a directory only with `recursive=true`.",
        {204: Reply("Removed.")},
        params=(_JOBID, _FILE_PATH,
                Param("recursive", "query", "Remove a directory and everything in it.",
                      {"type": "boolean", "default": False})),
        failures=(
            _BAD_JOBID, _NO_JOB_OR_FILE, _BAD_PATH, _LEAVES,
            Failure(ProblemCode.conflict,
                    "a directory without `recursive=true`, or the job's directory itself"),
            Failure(ProblemCode.validation_error, "a query parameter is invalid or unknown"),
        ),
    ),
    Operation(
        "POST", "/v1/callback", "postCallback", "callbacks", "Report a job's state (psik callback)",
        "Where psik reports the states of jobs of a server configured with `callback_url`. Needs"
        " no token: the body must be signed, `x-hub-signature-256: sha256=<hex HMAC-SHA256 of the"
        " raw body>`, with the secret the server made for the job it names. An accepted report is"
        " recorded and relayed to the job's own `callback`, if it has one.",
        {204: Reply("The report was recorded.")},
        params=(Param(
            "x-hub-signature-256", "header", "`sha256=` and the hex HMAC-SHA256 of the raw body.",
            {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"}, True,
        ),),
        body={"application/json": {"schema": {
            "type": "object",
            "properties": {
                "jobid": {"type": "string", "pattern": JOBID_REGEX},
                "jobndx": {"type": "integer", "minimum": 0},
                "state": {"type": "string", "enum": [s.value for s in JobState if s is not JobState.new]},
                "info": {"type": "string"},
            },
            "required": ["jobid", "jobndx", "state"],
            "additionalProperties": False,
        }}},
        failures=(
            Failure(ProblemCode.unauthorized, "unsigned, not signed with the job's secret, no such"
                    " job, or not a report; nothing was recorded"),
            Failure(ProblemCode.too_large, "the body is over 16 KiB"),
        ),
    ),
    Operation(
        "GET", "/healthz", "healthz", "service", "Health check", "Answers while the server runs.",
        {200: Reply("The server is up.",
                    {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]})},
    ),
    Operation(
        "GET", "/metrics", "getMetrics", "service", "Metrics, for Prometheus",
        "What the server is doing, in Prometheus' text format 0.0.4: requests by route template,"
        " method and status, with their latency; jobs by backend and state; job slots in use;"
        " the watcher's lag; event subscribers and events sent; liveness rounds and the jobs"
        " they failed; the launcher's queue; whether a disk is full; start-up time. Local mode:"
        " the owner may read it, as every route; token mode: only the callers the config's"
        " `metrics_readers` names (none by default), and never with a token narrowed to jobs.",
        {200: Reply("The metrics.", {"type": "string"}, media_type="text/plain; version=0.0.4")},
        failures=(
            Failure(ProblemCode.unauthorized, "no caller this server can name: token mode without a"
                    " valid TLS client certificate or with a token that is not valid; local mode"
                    " without the local secret where no uid can be told"),
            Failure(ProblemCode.forbidden, "token mode: the caller is not in `metrics_readers`, or"
                    " its token is narrowed to some jobs; local mode: another user"),
        ),
    ),
    Operation(
        "GET", "/openapi.json", "getOpenAPI", "service", "This OpenAPI document",
        "The OpenAPI 3.1 description of the API.",
        {200: Reply("The OpenAPI document.", {"type": "object"})},
    ),
    Operation(
        "GET", "/", "getDocs", "service", "API documentation",
        "This document rendered as HTML; it needs no internet access.",
        {200: Reply("The documentation page.", {"type": "string"}, media_type="text/html")},
    ),
)
# fmt: on


# ---- building the document ----

Refs = Mapping[tuple[object, JsonSchemaMode], str]


def build_openapi(
    *,
    title: str = "psik-api",
    version: str = __version__,
    backends: list[str] | None = None,
    rate_limited: bool = False,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every route of psik-api.

    ``backends`` (the configured backend names) become examples of backend parameters;
    ``rate_limited`` (the server has ``rate_limits``) declares the 429 of every operation
    not in :data:`RATE_LIMIT_EXEMPT`. A new document each call, so callers may change it.
    """
    refs, schemas = _component_schemas(backends or [])
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        out = _operation(op, refs, backends or [])
        if rate_limited and op.operation_id not in RATE_LIMIT_EXEMPT:
            out["responses"] = dict(sorted({**out["responses"], "429": _rate_limited(refs)}.items()))
        paths.setdefault(op.path, {})[op.method.lower()] = out
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": _INTRO},
        "tags": [dict(tag) for tag in _TAGS],
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _models(op: Operation) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    found: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    if op.request is not None:
        found.append((op.request, "validation"))
    for reply in op.replies.values():
        body = reply.body
        if get_origin(body) is list:
            body = get_args(body)[0]
        if isinstance(body, type) and issubclass(body, BaseModel):
            found.append((body, "serialization"))
    return found


def _component_schemas(backends: list[str]) -> tuple[Refs, dict[str, Any]]:
    wanted = [pair for op in OPERATIONS for pair in _models(op)] + [(Problem, "serialization")]
    keys, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template=_REF_TEMPLATE)
    # Every model lands in the top-level $defs (pydantic never nests them), and the refs
    # already point at components/schemas: hoisting is moving that one dict.
    schemas: dict[str, Any] = top.pop("$defs", {})
    assert not top, f"unexpected top-level keys: {sorted(top)}"
    refs: Refs = {pair: ref["$ref"] for pair, ref in keys.items()}
    # What the models enforce in validators, JSON Schema can only say:
    for schema in schemas.values():
        jobid = schema.get("properties", {}).get("jobid")
        if jobid is not None and jobid.get("type") == "string":
            jobid["pattern"] = JOBID_REGEX
    # The server validates request bodies with STRICT_INPUT: unknown fields are refused,
    # at every level of a JobSpec (and it never sends any either).
    for name in ("JobSpec", "ResourceSpec", "Dependency", "GroupRequest"):
        if name in schemas:
            schemas[name]["additionalProperties"] = False
    # ... and what JobSpec's and ResourceSpec's validators refuse: counts a backend could
    # not run, NULs, control characters where a value becomes one line (a header, a
    # scheduler argument), environment names no shell can reach, a callback that is no
    # http(s) URL (the rest of what makes one valid is in its description).
    schemas["ResourceSpec"]["description"] = (
        "Counts are JSON integers written without a fraction (`10`, not `10.0`, which is refused)."
    )
    resources = schemas["ResourceSpec"]["properties"]
    for name, least in _COUNTS.items():
        _constrain(resources[name], minimum=least, maximum=MAX_COUNT)
    spec = schemas["JobSpec"]["properties"]
    _constrain(spec["script"], pattern=_NO_NUL)
    _constrain(spec["directory"], pattern=_ABSOLUTE)
    _constrain(spec["name"], pattern=_ONE_LINE, maxLength=LIMITS.max_job_name)
    _constrain(spec["callback"], pattern=_HTTP_URL)
    spec["callback"]["description"] = (
        "An absolute http(s) URL with a host (in token mode, one of the server's `callback_hosts`)."
    )
    _constrain(spec["environment"], propertyNames={"pattern": _SHELL_NAME})
    _constrain(spec["environment"], additionalProperties={"type": "string", "pattern": _NO_NUL})
    for pairs in ("attributes", "cb_headers"):
        _constrain(spec[pairs], propertyNames={"minLength": 1, "pattern": _ONE_LINE})
        _constrain(spec[pairs], additionalProperties={"type": "string", "pattern": _ONE_LINE})
    codes = ", ".join(f"`{code.value}`" for code in ProblemCode)
    schemas["Problem"]["properties"]["code"]["description"] = f"Stable error code: one of {codes}."
    request_id = schemas["Problem"]["properties"]["request_id"]
    _constrain(request_id, pattern=REQUEST_ID_PATTERN)
    request_id["description"] = "The id of the request answered, as its `X-Request-ID` header says."
    for schema in schemas.values():
        backend = schema.get("properties", {}).get("backend")
        if backends and backend is not None:
            backend["examples"] = list(backends)
    return refs, schemas


#: ResourceSpec's counts and the least each may be (the most is MAX_COUNT).
_COUNTS = {
    "duration": 1,
    "node_count": 1,
    "process_count": 1,
    "processes_per_node": 1,
    "cpu_cores_per_process": 1,
    "gpu_cores_per_process": 0,
}
#: Regular expressions both JSON Schema (ECMA 262) and Python read alike.
_NO_NUL = "^[^\\u0000]*$"
_ONE_LINE = "^[^\\u0000-\\u001f\\u007f]*$"
_ABSOLUTE = "^/[^\\u0000]*$"
_SHELL_NAME = "^[A-Za-z_][A-Za-z0-9_]*$"
_HTTP_URL = "^[Hh][Tt][Tt][Pp][Ss]?://[^\\u0000-\\u001f\\u007f]*$"


def _constrain(prop: dict[str, Any], **constraints: object) -> None:
    """Add ``constraints`` to a property's schema, or to its non-null branch."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(constraints)


def _schema_of(body: object, refs: Refs) -> dict[str, Any]:
    if get_origin(body) is list:
        return {"type": "array", "items": _schema_of(get_args(body)[0], refs)}
    if isinstance(body, type) and issubclass(body, BaseModel):
        return {"$ref": refs[(body, "serialization")]}
    if isinstance(body, Mapping):
        return dict(body)
    raise TypeError(f"not a response body: {body!r}")


def _parameter(param: Param, backends: list[str]) -> dict[str, Any]:
    schema = dict(param.schema)
    if param.names_backend and backends:
        schema["examples"] = list(backends)
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "description": param.description,
        "required": param.required,
        "schema": schema,
    }
    if param.repeatable:
        out |= {"style": "form", "explode": True}
    return out


def _failures(op: Operation, refs: Refs) -> dict[str, Any]:
    by_status: dict[int, list[Failure]] = {}
    for failure in op.failures:
        by_status.setdefault(failure.code.status, []).append(failure)
    responses: dict[str, Any] = {}
    for status, failures in sorted(by_status.items()):
        examples = {
            f.code.value: {
                "summary": f.code.problem_title,
                "value": {
                    "type": "about:blank",
                    "title": f.code.problem_title,
                    "status": status,
                    "code": f.code.value,
                },
            }
            for f in failures
        }
        response: dict[str, Any] = {
            "description": "; ".join(f"`{f.code.value}`: {f.when}" for f in failures),
            "content": {
                PROBLEM_JSON: {"schema": {"$ref": refs[(Problem, "serialization")]}, "examples": examples}
            },
        }
        response["headers"] = _headers(("X-Request-ID",))
        if any(f.code is ProblemCode.idempotency_in_flight for f in failures):
            response["headers"] |= _headers(("Retry-After",))
        responses[str(status)] = response
    return responses


def _headers(names: tuple[str, ...]) -> dict[str, Any]:
    """The response headers ``names`` as the document declares them."""
    return {name: dict(_HEADERS[name]) for name in names}


#: The operations rate limits never refuse (``serving.rate_limit`` takes their paths from
#: here): the health check, the document itself, and the jobs' own signed state reports.
RATE_LIMIT_EXEMPT = frozenset({"healthz", "getOpenAPI", "getDocs", "postCallback"})


def _rate_limited(refs: Refs) -> dict[str, Any]:
    """The 429 every other operation can answer where the server has ``rate_limits``."""
    code = ProblemCode.rate_limited
    example = {"type": "about:blank", "title": code.problem_title, "status": 429, "code": code.value}
    retry_after = {**_HEADERS["Retry-After"], "required": True}
    return {
        "description": f"`{code.value}`: the caller (the user its certificate or token names) made"
        " more requests, or submitted more jobs, than the server's `rate_limits` allow (a group"
        " counts as its jobs); nothing was done: send it again after `Retry-After` seconds",
        "content": {
            PROBLEM_JSON: {
                "schema": {"$ref": refs[(Problem, "serialization")]},
                "examples": {code.value: {"summary": code.problem_title, "value": example}},
            }
        },
        "headers": _headers(("X-Request-ID",)) | {"Retry-After": retry_after},
    }


def _operation(op: Operation, refs: Refs, backends: list[str]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, reply in sorted(op.replies.items()):
        response: dict[str, Any] = {"description": reply.description}
        if reply.body is not None:
            response["content"] = {reply.media_type: {"schema": _schema_of(reply.body, refs)}}
            for media_type, body in reply.also:
                response["content"][media_type] = {"schema": _schema_of(body, refs)}
        response["headers"] = _headers((*reply.headers, "X-Request-ID"))
        responses[str(status)] = response
    responses |= _failures(op, refs)
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "tags": [op.tag],
        "summary": op.summary,
        "description": op.description,
    }
    if op.params:
        out["parameters"] = [_parameter(p, backends) for p in op.params]
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {k: dict(v) for k, v in op.body.items()}}
    if op.request is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": refs[(op.request, "validation")]}}},
        }
    out["responses"] = responses
    return out
