"""The wire models of psik-api, shared by the server (which validates and serialises
with them) and the client (which parses with them).

Input strictness: the models *ignore* unknown fields by default, so an older client
survives a newer server's answers. The server validates request bodies with
``context=STRICT_INPUT``, which turns every unknown field into an error naming it.
"""

from __future__ import annotations

import html
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .limits import LIMITS
from .states import JobState

#: A psik job id is the stamp of its directory, ``"%.3f" % time.time()``.
#: It names a directory, so it is checked with ``fullmatch`` (anchored at both ends,
#: no trailing newline, ASCII digits only) before it ever touches a path.
JOBID_PATTERN = r"[0-9]{1,20}(?:\.[0-9]{1,9})?"
_JOBID_RE = re.compile(JOBID_PATTERN, re.ASCII)

#: Validation context under which unknown input fields are errors and the input checks
#: apply (what a backend could not run); see :meth:`JobSpec.validate_input`.
STRICT_INPUT: dict[str, Any] = {"strict_input": True}

#: The largest count or duration a JobSpec may ask for (schedulers keep them in 32 bits).
MAX_COUNT = 2**31 - 1


def is_jobid(value: str) -> bool:
    """True if ``value`` is a well-formed job id."""
    return _JOBID_RE.fullmatch(value) is not None


def _check_jobid(value: str) -> str:
    if not is_jobid(value):
        raise PydanticCustomError(
            "jobid_pattern", "a job id is digits with an optional fraction, e.g. 1693992878.203"
        )
    return value


JobID = Annotated[str, AfterValidator(_check_jobid)]

#: A label's key: a letter or digit, then up to 62 of letters, digits and ``. _ / -``
#: (``=`` separates key and value in ``?label=key=value``).
LABEL_KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}"
LabelKey = Annotated[str, StringConstraints(pattern=f"^{LABEL_KEY_PATTERN}$")]
#: A label's value: up to ``max_label_value`` characters, none of them a control character.
LabelValue = Annotated[
    str, StringConstraints(max_length=LIMITS.max_label_value, pattern=r"^[^\x00-\x1f\x7f]*$")
]


def _strict(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("strict_input"))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: What a shell can name: a job's environment variables must be reachable from its script.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def _refuse(why: str) -> PydanticCustomError:
    return PydanticCustomError("value_error", why)


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an absolute http(s) URL a client could send to, or None if it
    is one. Never raises: urlsplit raises ValueError on bad brackets (``http://[::1``),
    a bad port, or a netloc that NFKC normalisation turns into another URL
    (``http://\u2100.com/``, "a/c"); the IDNA codec on a host no DNS name can be."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
        if host:
            host.encode("idna")  # UnicodeError (a ValueError): an empty or overlong label
    except ValueError as e:
        return f"is not a valid URL ({str(e)[:100]})"
    if parts.scheme not in {"http", "https"} or not host:
        return "must be an absolute http(s) URL"
    return None


#: Half of a UTF-16 pair: JSON's ``"\\ud800"`` escape can name one alone, but it is no
#: character — no UTF-8 file (the job's spec.json), command line or header can hold it.
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidJSON(ValueError):
    """Input that is not JSON text as RFC 8259 has it (a 400, where a valid document
    with wrong values is a 422); the message says why, for a person."""


class _TooLarge:
    """An integer literal past Python's digit limit for ``int()`` (4300 by default)."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))


class _Duplicated(dict[str, Any]):
    """A JSON object that had a key more than once (the last one is kept)."""

    def __init__(self, pairs: list[tuple[str, Any]], twice: str) -> None:
        super().__init__(pairs)
        self.twice = twice


def _constant(name: str) -> None:
    raise InvalidJSON(f"{name} is not a JSON number")


def _loads(text: str, big_ints: bool) -> tuple[Any, bool]:
    """``text`` parsed, and whether it holds a :class:`_Duplicated` or :class:`_TooLarge`
    (the hooks are per call: a parse in another thread has its own)."""
    odd = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal odd
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        odd = True
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                break
            seen.add(key)
        return _Duplicated(pairs, key)

    def int_hook(digits: str) -> int | _TooLarge:
        nonlocal odd
        limit = sys.get_int_max_str_digits()
        if limit and len(digits.lstrip("-")) > limit:
            odd = True
            return _TooLarge(digits)
        return int(digits)

    hooks: dict[str, Any] = {"parse_int": int_hook} if big_ints else {}
    parsed = json.loads(text, object_pairs_hook=pairs_hook, parse_constant=_constant, **hooks)
    return parsed, odd


#: Where a value is, innermost last: ``(parent, key)``, ``None`` for the top.
_Path = tuple[Any, str | int] | None


def _loc(path: _Path) -> list[str | int]:
    loc: list[str | int] = []
    while path is not None:
        path, key = path
        loc.append(key)
    return loc[::-1]


def _input_error(loc: list[str | int], why: str, data: Any) -> ValidationError:
    return ValidationError.from_exception_data(
        "JobSpec", [{"type": PydanticCustomError("value_error", why), "loc": tuple(loc), "input": data}]
    )


def loads_input(data: bytes | str) -> Any:
    """A request body parsed as JSON text strictly (RFC 8259): UTF-8 without a byte order
    mark, no ``NaN``/``Infinity``; raises :class:`InvalidJSON` saying why otherwise.

    What is valid JSON but no input for a job raises pydantic's ``ValidationError``
    naming where it is: a key given twice in one object (parsers disagree on which one
    counts), an integer of more digits than Python converts (an out-of-range number, not
    a crash). Lone surrogates are left to :meth:`JobSpec.validate_input`, which names
    the field."""
    if isinstance(data, bytes | bytearray):
        if data.startswith(b"\xef\xbb\xbf"):
            raise InvalidJSON("it starts with a byte order mark (BOM), which JSON text must not have")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidJSON(f"it is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    else:
        text = data
    if text.startswith("\ufeff"):
        raise InvalidJSON("it starts with a byte order mark (BOM), which JSON text must not have")
    if not text.strip(" \t\r\n"):
        raise InvalidJSON("it is empty")
    try:
        try:
            parsed, odd = _loads(text, big_ints=False)
        except InvalidJSON:
            raise
        except ValueError as e:
            if isinstance(e, json.JSONDecodeError):
                raise
            # An integer past int()'s digit limit: parse again, keeping such numbers apart
            # (only then: a Python hook per number is slow).
            parsed, odd = _loads(text, big_ints=True)
    except json.JSONDecodeError as e:
        raise InvalidJSON(str(e)) from None
    except RecursionError:  # [[[[...]]]] nested deeper than Python's parser goes
        raise InvalidJSON("it is nested too deeply") from None
    if not odd:
        return parsed
    # Find what JSON allows and a job cannot take, in document order, without recursion
    # and without copying paths (a body can be a million values, nested a thousand deep).
    if isinstance(parsed, _TooLarge):
        raise _input_error([], f"a number too large ({parsed.digits} digits)", parsed.digits)
    stack: list[tuple[_Path, Any]] = [(None, parsed)]
    while stack:  # only containers are pushed: a million numbers cost no tuples
        path, value = stack.pop()
        if isinstance(value, _Duplicated):
            raise _input_error([*_loc(path), value.twice], "this key is given more than once", value.twice)
        inner: list[tuple[_Path, Any]] = []
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(item, _TooLarge):
                raise _input_error(
                    [*_loc(path), key], f"a number too large ({item.digits} digits)", item.digits
                )
            if isinstance(item, dict | list):
                inner.append(((path, key), item))
        stack.extend(reversed(inner))
    return parsed


def utc(ts: float) -> datetime:
    """An aware UTC datetime from a UNIX time (psik's timestamps)."""
    return datetime.fromtimestamp(ts, tz=UTC)


class _Model(BaseModel):
    """Base: unknown fields are ignored, unless validated with ``STRICT_INPUT``."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _forbid_unknown_in_strict_input(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get("strict_input"):
            known = set(cls.model_fields)
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                raise PydanticCustomError(
                    "extra_forbidden",
                    "unknown field(s) {fields}; allowed: {allowed}",
                    {"fields": ", ".join(unknown), "allowed": ", ".join(sorted(known))},
                )
        return data


# ---- psik's job description (mirrored field for field; a server test checks it) ----


class ResourceSpec(_Model):
    """Resources a job asks of its backend (psik 3.1's ``ResourceSpec``)."""

    duration: int = Field(default=10, title="Max walltime of the job in minutes")
    node_count: int | None = Field(default=None, title="Number of compute nodes allocated to job.")
    process_count: int | None = Field(
        default=None,
        title="Instruct the backend to start this many process instances.",
    )
    processes_per_node: int | None = None
    cpu_cores_per_process: int = Field(default=1, title="CPU cores for each process instance.")
    gpu_cores_per_process: int = 0
    exclusive_node_use: bool = True

    # What a backend could not run is refused on input (the server's STRICT_INPUT and the
    # client's check before sending); answers are read as psik wrote them.
    @field_validator("duration", "node_count", "process_count", "processes_per_node", "cpu_cores_per_process")
    @classmethod
    def _at_least_one(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and _strict(info) and not 1 <= value <= MAX_COUNT:
            raise _refuse(f"must be from 1 to {MAX_COUNT}")
        return value

    @field_validator("gpu_cores_per_process")
    @classmethod
    def _not_negative(cls, value: int, info: ValidationInfo) -> int:
        if _strict(info) and not 0 <= value <= MAX_COUNT:
            raise _refuse(f"must be from 0 to {MAX_COUNT}")
        return value


def _no_nulls(model: BaseModel, names: tuple[str, ...]) -> None:
    """Refuse a field of ``names`` given as null (left out, it is None by default)."""
    given = [n for n in names if n in model.model_fields_set and getattr(model, n) is None]
    if given:
        raise _refuse(f"{', '.join(given)}: leave out, not null")


def _given_not_null(names: tuple[str, ...], extra: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A model's ``json_schema_extra``: the fields ``names`` (None when left out, which
    the model's own check judges) are never null when given, as the schema then says."""

    def edit(schema: dict[str, Any]) -> None:
        for name in names:
            prop = schema["properties"][name]
            branches = [b for b in prop.pop("anyOf", []) if b != {"type": "null"}]
            if len(branches) == 1:
                prop.update(branches[0])
            prop.pop("default", None)
        schema.update(extra)

    return edit


class Dependency(_Model):
    """One entry of ``JobSpec.after``: the job starts only once the job ``jobid`` (or,
    inside ``POST /v1/groups``, the request's ``index``-th job) ended as ``condition``
    says: ``ok``, it completed; ``failed``, it failed; ``any``, any final state. When the
    condition can no longer be met, the job ends ``canceled``, saying why."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra=_given_not_null(
            ("jobid", "index"), {"oneOf": [{"required": ["jobid"]}, {"required": ["index"]}]}
        ),
    )

    jobid: JobID | None = None
    index: int | None = Field(default=None, ge=0, le=LIMITS.max_group_jobs - 1)
    condition: Literal["ok", "failed", "any"] = "ok"

    @model_validator(mode="after")
    def _one_parent(self, info: ValidationInfo) -> Dependency:
        if _strict(info):  # a request; an answer (the server's dump) has nulls
            _no_nulls(self, ("jobid", "index"))
        if (self.jobid is None) == (self.index is None):
            raise _refuse("names its job by exactly one of jobid and index")
        return self


class JobSpec(_Model):
    """What to run and where (psik 3.1's ``JobSpec``). Only ``script`` is required."""

    name: str | None = Field(default=None, title="Job name")
    directory: str | None = Field(default=None, title="Job run directory")
    script: str = Field(title="Shell / shebang script to execute")
    environment: dict[str, str] = Field(default_factory=dict, title="custom environment variables")
    inherit_environment: bool = Field(
        default=True, title="If False, the job starts with an empty environment."
    )
    resources: ResourceSpec = Field(default_factory=ResourceSpec, title="Job resource requirements")
    backend: str = Field(default="default", title="Configured backend name")
    attributes: dict[str, str] = Field(default_factory=dict, title="Backend attribute values.")
    callback: str | None = Field(default=None, title="URL to send event notifications.")
    cb_headers: dict[str, str] = Field(default_factory=dict, title="Headers to include in callback.")
    cb_secret: SecretStr | None = Field(
        default=None, title="hmac256 secret to sign updates sent to 'callback'"
    )
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=LIMITS.max_labels,
        # Keys the pattern refuses are refused, as the schema then says.
        json_schema_extra={"additionalProperties": False},
        title="Labels: key-value pairs to find the job by (`GET /v1/jobs?label=key=value`).",
    )
    after: list[Dependency] = Field(
        default_factory=list,
        max_length=LIMITS.max_after,
        title="Start only once these jobs ended as each entry says (see Dependency).",
    )

    #: The API's own fields, which psik's JobSpec (extra="forbid") has no place for: the
    #: server keeps them beside the job's spec.json.
    API_ONLY: ClassVar[frozenset[str]] = frozenset({"labels", "after"})

    def psik_fields(self) -> dict[str, Any]:
        """The fields psik's JobSpec has (what goes into the job's spec.json)."""
        return self.model_dump(exclude=set(self.API_ONLY))

    @classmethod
    def validate_input(cls, data: bytes | str | Mapping[str, Any]) -> JobSpec:
        """A spec as a request gives it (JSON text, or a mapping), checked as the server
        checks it: unknown fields, the input checks below, and no coercion (``"3"`` is
        not an integer, ``0`` not a boolean), as the published schema says. JSON text is
        parsed by :func:`loads_input`, the server's parser. Raises pydantic's
        ``ValidationError`` (of type ``json_invalid`` for text that is not JSON)."""
        if isinstance(data, bytes | str):
            try:
                parsed = loads_input(data)
            except InvalidJSON as e:
                raise ValidationError.from_exception_data(
                    cls.__name__,
                    [{"type": "json_invalid", "loc": (), "input": data, "ctx": {"error": str(e)}}],
                ) from None
            if not isinstance(parsed, dict):
                raise _input_error([], "must be a JSON object (a JobSpec)", parsed)
            data = parsed
        return cls.model_validate(dict(data), strict=True, context=STRICT_INPUT)

    # Input checks (see ResourceSpec): each names what a backend, a shell or an HTTP
    # header would choke on, instead of a job that "fails" without running.
    @field_validator("*")
    @classmethod
    def _no_lone_surrogates(cls, value: Any, info: ValidationInfo) -> Any:
        if _strict(info):
            if isinstance(value, SecretStr):
                texts: list[Any] = [value.get_secret_value()]
            elif isinstance(value, dict):
                texts = [*value, *value.values()]
            else:
                texts = [value]
            if any(isinstance(t, str) and _SURROGATE.search(t) for t in texts):
                raise _refuse("holds a lone surrogate (\\ud800-\\udfff), which is not a character")
        return value

    @field_validator("directory")
    @classmethod
    def _check_directory(cls, value: str | None, info: ValidationInfo) -> str | None:
        # No file name can hold NUL: every filesystem call refuses it.
        if value is not None and "\x00" in value and _strict(info):
            raise _refuse("must not contain NUL characters")
        return value

    @field_validator("callback")
    @classmethod
    def _check_callback(cls, value: str | None, info: ValidationInfo) -> str | None:
        # It becomes an HTTP request line: one line.
        if value is not None and _strict(info):
            if _CONTROL.search(value):
                raise _refuse("must not contain control characters (newlines, NUL, ...)")
            if (why := http_url_problem(value)) is not None:
                raise _refuse(why)
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _strict(info):
            if len(value) > LIMITS.max_job_name:
                raise _refuse(f"is longer than {LIMITS.max_job_name} characters")
            if _CONTROL.search(value):
                raise _refuse("must not contain control characters (newlines, NUL, ...)")
        return value

    @field_validator("script")
    @classmethod
    def _check_script(cls, value: str, info: ValidationInfo) -> str:
        if "\x00" in value and _strict(info):
            raise _refuse("must not contain NUL characters")
        return value

    @field_validator("environment")
    @classmethod
    def _check_environment(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if _strict(info):
            for key, val in value.items():
                if not _ENV_NAME.fullmatch(key):
                    raise _refuse(f"variable name {key[:64]!r} is not a shell name ([A-Za-z_][A-Za-z0-9_]*)")
                if "\x00" in val:
                    raise _refuse(f"value of {key[:64]!r} must not contain NUL")
        return value

    @field_validator("attributes", "cb_headers")
    @classmethod
    def _check_one_line_pairs(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        # Attributes become scheduler arguments, cb_headers HTTP headers: one line each.
        if _strict(info):
            for key, val in value.items():
                if not key or _CONTROL.search(key) or _CONTROL.search(val):
                    raise _refuse(f"{key[:64]!r}: names must be non-empty, and no control characters")
        return value


# ---- jobs as the API shows them ----


class Transition(_Model):
    """One row of a job's history: at ``time``, run ``jobndx`` reached ``state``."""

    time: datetime
    jobndx: int
    state: JobState
    info: str = ""


class JobSummary(_Model):
    """A job as lists show it (no spec, no history). ``exit_code`` is the script's exit
    status once the current run ended, else None (also from a server older than it)."""

    jobid: JobID
    name: str | None = None
    backend: str
    owner: str
    state: JobState
    jobndx: int = 0
    created: datetime
    updated: datetime
    exit_code: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    #: The group (``POST /v1/groups``) that made the job, if one did.
    group: str | None = None

    # A notebook shows a job by its repr: pydantic's is every field (a Job's spec and
    # history: thousands of characters on one line). These say which job and how it is.
    def __repr_args__(self) -> Iterator[tuple[str, Any]]:
        name = self.name if self.name is None or len(self.name) <= 24 else self.name[:23] + "…"
        yield "jobid", self.jobid
        yield "name", name
        yield "state", _Bare(self.state.value)
        yield "jobndx", self.jobndx
        if self.exit_code is not None:
            yield "exit_code", self.exit_code
        yield "backend", self.backend

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.__repr_args__())
        return f"{type(self).__name__}({args})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython's pretty printer: the repr, then who, when and the last history row."""
        lines = [repr(self), f"  owner={self.owner}"]
        if (native_id := getattr(self, "native_id", None)) is not None:
            lines.append(f"  native_id={native_id}")
        lines.append(f"  created={self.created.isoformat()} updated={self.updated.isoformat()}")
        history: list[Transition] = getattr(self, "history", [])
        if history:
            last = history[-1]
            info = last.info if len(last.info) <= 60 else last.info[:59] + "…"
            when = last.time.isoformat()
            lines.append(f"  last of {len(history)}: {when} run {last.jobndx} {last.state.value} {info!r}")
        p.text("\n".join(lines))

    def _repr_html_(self) -> str:
        """A notebook's display: a one-row table (see :func:`jobs_table`)."""
        return _html_table([self])


# ---- jobs as a notebook shows them ----

#: A state's colour in a notebook's table: final states say how they ended.
_STATE_COLOURS = {
    JobState.new: "#6b7280",
    JobState.queued: "#2563eb",
    JobState.active: "#d97706",
    JobState.completed: "#16a34a",
    JobState.failed: "#dc2626",
    JobState.canceled: "#7c3aed",
}
_COLUMNS = ("jobid", "name", "state", "exit", "created", "updated", "last history row")

J = TypeVar("J", bound="JobSummary")


class JobsTable(list[J]):
    """A list of jobs that a notebook displays as one table (``_repr_html_``); it is
    otherwise the list it was made from."""

    def _repr_html_(self) -> str:
        return _html_table(self)


def jobs_table(jobs: Iterable[J]) -> JobsTable[J]:
    """``jobs`` (Job or JobSummary objects) as a list that a notebook shows as one
    table: name, state in colour, exit code, times and each job's last history row."""
    return JobsTable(jobs)


def _html_table(jobs: Iterable[JobSummary]) -> str:
    head = "".join(f"<th style='text-align:left'>{c}</th>" for c in _COLUMNS)
    rows = "".join(_html_row(job) for job in jobs)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_row(job: JobSummary) -> str:
    colour = _STATE_COLOURS.get(job.state, "inherit")
    state = f"<span style='color:{colour};font-weight:bold'>{job.state.value}</span>"
    if job.jobndx > 1:
        state += f" (run {job.jobndx})"
    history: list[Transition] = getattr(job, "history", [])
    last = ""
    if history:
        row = history[-1]
        info = row.info if len(row.info) <= 60 else row.info[:59] + "…"
        last = f"{_when(row.time)} run {row.jobndx} {row.state.value}" + (f": {info}" if info else "")
    cells = (
        job.jobid,
        job.name or "",
        None,
        "" if job.exit_code is None else str(job.exit_code),
        _when(job.created),
        _when(job.updated),
        last,
    )
    tds = "".join(f"<td>{state if c is None else html.escape(c)}</td>" for c in cells)
    return f"<tr>{tds}</tr>"


def _when(time: datetime) -> str:
    return time.isoformat(sep=" ", timespec="seconds")


class _Bare(str):
    """A text shown without quotes in a repr (a job's state)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


class Job(JobSummary):
    """A job with its spec (the server never returns `cb_secret`) and full history.

    ``native_id`` is the backend's own id of the current run (the local process id, the
    Slurm job id), None before it is submitted; ``exit_code`` (as in the summary) is the
    script's exit status once the run ended, else None.
    """

    native_id: str | None = None
    spec: JobSpec
    history: list[Transition] = Field(default_factory=list)


class JobStatus(_Model):
    """``GET /v1/jobs/{id}/state``: the state alone, with what it refers to."""

    jobid: JobID
    state: JobState
    jobndx: int
    updated: datetime


class Event(_Model):
    """One row of a job's history as the event stream (``GET /v1/events``) tells it.

    ``id`` is server-wide and only ever grows, across restarts too: pass the last one
    seen back (``Last-Event-ID`` or ``after``) and nothing is missed or repeated.
    ``state``, ``jobndx``, ``info`` and ``time`` are the row's own; ``job_state`` is the
    job's state once the row is counted (what ``GET /v1/jobs/{id}`` would then say: a
    row can be overruled, see :func:`~psik_api_core.derive_state`), with that run's
    ``native_id`` and, once it ended, its ``exit_code``."""

    id: int
    jobid: JobID
    jobndx: int
    state: JobState
    info: str = ""
    time: datetime
    job_state: JobState
    native_id: str | None = None
    exit_code: int | None = None


#: A group's id: 32 lower-case hex digits.
GROUP_ID_PATTERN = "[0-9a-f]{32}"
GroupID = Annotated[str, StringConstraints(pattern=f"^{GROUP_ID_PATTERN}$")]

#: A sweep's parameter: a shell name (each job gets its value in its environment).
ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]


class GroupRequest(_Model):
    """``POST /v1/groups``: ``jobs``, the specs of the jobs to make, in order; or one
    ``spec`` and a sweep, ``params``: one job per combination of the values (the last
    parameter varying fastest), each value in that job's environment under its name.
    Inside it, an ``after`` entry may name the request's ``index``-th job."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra=_given_not_null(
            ("jobs", "spec", "params"),
            {
                "oneOf": [
                    {
                        "required": ["jobs"],
                        "not": {"anyOf": [{"required": ["spec"]}, {"required": ["params"]}]},
                    },
                    {"required": ["spec", "params"], "not": {"required": ["jobs"]}},
                ]
            },
        ),
    )

    jobs: list[JobSpec] | None = Field(default=None, min_length=1, max_length=LIMITS.max_group_jobs)
    spec: JobSpec | None = None
    params: dict[ParamName, Annotated[list[str], Field(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=16, json_schema_extra={"additionalProperties": False}
    )

    @model_validator(mode="after")
    def _one_form(self, info: ValidationInfo) -> GroupRequest:
        if _strict(info):  # a request; an answer (the server's dump) has nulls
            _no_nulls(self, ("jobs", "spec", "params"))
        if (self.jobs is None) == (self.spec is None) or (self.spec is None) != (self.params is None):
            raise _refuse("give either jobs, or spec and params")
        return self

    @field_validator("params")
    @classmethod
    def _bounded_sweep(cls, params: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        """A sweep makes at most ``max_group_jobs`` jobs (refused naming ``params``)."""
        if params is not None:
            count = 1
            for values in params.values():  # each has a value (min_length)
                count *= len(values)
            if count > LIMITS.max_group_jobs:
                raise _refuse(f"params make {count} jobs; at most {LIMITS.max_group_jobs} at once")
        return params

    def specs(self) -> list[JobSpec]:
        """The jobs' specs, in order (a sweep's combinations expanded)."""
        if self.jobs is not None:
            return list(self.jobs)
        assert self.spec is not None and self.params is not None
        combos: list[dict[str, str]] = [{}]
        for name, values in self.params.items():
            combos = [{**c, name: v} for c in combos for v in values]
        spec = self.spec
        return [spec.model_copy(update={"environment": {**spec.environment, **c}}, deep=True) for c in combos]


class Group(_Model):
    """A group of jobs made by one ``POST /v1/groups``: ``jobs`` in the order given
    (the answer to the POST); ``GET /v1/groups/{group}`` has ``states`` too (how many
    members are in each state)."""

    group: GroupID
    jobs: list[Job | JobSummary]
    states: dict[JobState, int] = Field(default_factory=dict)


T = TypeVar("T")


class Page(_Model, Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[T]
    next_cursor: str | None = None


class BackendInfo(_Model):
    """A configured backend and whether it can take jobs now."""

    name: str
    type: str
    queue_name: str | None = None
    project_name: str | None = None
    healthy: bool = True
    detail: str | None = None


class FileInfo(_Model):
    """One entry of a job's files: ``path`` is relative to the job's file root
    (``/``-separated, no leading ``/``), ``name`` its last component. A symlink is
    reported as one (listings never follow them); ``size`` is 0 for a directory."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mtime: datetime


class FileListing(_Model):
    """A directory of a job's files (``path`` relative, ``""`` for the root), its
    entries sorted by path. ``truncated``: there were more entries than the server
    lists at once (``LIMITS.max_list_entries``); the rest are left out. ``unlisted``:
    entries whose names no path can carry (bytes that are not UTF-8, control
    characters, a backslash), which a job's program may make, left out (and, in a
    recursive listing, not walked into)."""

    path: str
    entries: list[FileInfo]
    truncated: bool = False
    unlisted: int = 0


class FieldError(_Model):
    """One reason a request was refused: where (``loc``) and why (``msg``)."""

    loc: list[str | int]
    msg: str
    type: str = "value_error"


class Problem(BaseModel):
    """An RFC 9457 problem document, with psik-api's stable ``code``."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str
    errors: list[FieldError] | None = None
    #: The id of the request answered (its ``X-Request-ID``), to quote in a report.
    request_id: str | None = None
