"""The path, query and header parameters of a request, read as its operation's row of the
OpenAPI table declares them (:class:`.openapi.Param`), before the handler runs: the one
place they are checked.

Only the declared query parameters, each once unless it is repeatable; then each
parameter in the table's order, by its schema: a boolean (``true``/``false``/``1``/``0``,
any case), an integer (ASCII digits within ``minimum``..``maximum``), one of an ``enum``
(commas may separate several), a job id, at most ``maxItems`` values, a header of
``minLength``..``maxLength`` printable ASCII characters. A bad one is 422
``validation_error`` naming it. Other strings are taken as given, for the handler to
judge where the answer is not a 422 of this kind: a file path (``invalid_path``), a log
name (404), a token lifetime (bounded by the server's settings).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from psik_api_core import LIMITS, ProblemCode, field_error, is_jobid
from psik_api_core.models import LABEL_KEY_PATTERN

from ..errors import ApiError
from .openapi import JOBID_REGEX, LARGEST_COUNT, Operation, Param

_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


@dataclass(frozen=True)
class Params:
    """The parameters of one request, read and checked: each declared one by name (a
    default where it has one, absent otherwise)."""

    values: Mapping[str, object]

    def path(self, name: str) -> str:
        """A path parameter (always there)."""
        value = self.values[name]
        assert isinstance(value, str), name
        return value

    def text(self, name: str) -> str | None:
        """A string parameter, as given."""
        value = self.values.get(name)
        assert value is None or isinstance(value, str), name
        return value

    def flag(self, name: str) -> bool:
        """A boolean parameter."""
        value = self.values.get(name, False)
        assert isinstance(value, bool), name
        return value

    def integer(self, name: str) -> int | None:
        """An integer parameter."""
        value = self.values.get(name)
        assert value is None or (isinstance(value, int) and not isinstance(value, bool)), name
        return value

    def texts(self, name: str) -> list[str]:
        """A repeatable parameter's values, in order (an enum's comma-separated ones apart)."""
        value = self.values.get(name, [])
        assert isinstance(value, list), name
        return value


def bad_query(name: str, why: str) -> ApiError:
    """422 naming query parameter ``name``, saying ``why``."""
    return ApiError(
        ProblemCode.validation_error,
        f"query parameter {name!r}: {why}",
        errors=[field_error(["query", name], why)],
    )


def read_params(op: Operation, request: Request) -> Params:
    """The parameters ``op`` declares, from ``request``, checked in the table's order;
    :class:`ApiError` (422) for the first one that is wrong, or unknown, or repeated."""
    declared = {p.name: p for p in op.params if p.location == "query"}
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in declared:
            allowed = ", ".join(sorted(declared)) or "none"
            raise bad_query(name, f"unknown parameter; allowed: {allowed}")
        if name in seen and not declared[name].repeatable:
            raise bad_query(name, "given more than once")
        seen.add(name)
    values: dict[str, object] = {}
    for param in op.params:
        if param.location == "path":
            values[param.name] = _path(param, str(request.path_params[param.name]))
        elif param.location == "header":
            header = request.headers.get(param.name)
            if header is not None:
                values[param.name] = _header(param, header)
        elif param.repeatable:
            values[param.name] = _repeated(param, request.query_params.getlist(param.name))
        elif param.name in request.query_params:
            values[param.name] = _query(param, param.schema, request.query_params[param.name])
        elif "default" in param.schema:
            values[param.name] = param.schema["default"]
    return Params(values)


def _path(param: Param, value: str) -> str:
    if param.schema.get("pattern") == JOBID_REGEX and not is_jobid(value):
        raise ApiError(
            ProblemCode.validation_error,
            f"{value[:64]!r} is not a job id (digits with an optional fraction, e.g. 1693992878.203)",
            errors=[field_error(["path", param.name], "not a job id")],
        )
    return value


def _header(param: Param, value: str) -> str:
    least, most = param.schema.get("minLength", 0), param.schema.get("maxLength", len(value))
    if not (least <= len(value) <= most and value.isascii() and value.isprintable()):
        raise ApiError(
            ProblemCode.validation_error,
            f"{param.name} must be {least}..{most} printable ASCII characters",
            errors=[field_error(["header", param.name], "bad length or characters")],
        )
    return value


def _repeated(param: Param, given: list[str]) -> list[str]:
    most = param.schema.get("maxItems")
    if most is not None and len(given) > most:
        raise bad_query(param.name, f"at most {most} {param.name}s per request")
    items = param.schema["items"]
    if "enum" in items:  # ?state=queued,active as well as ?state=queued&state=active
        given = [part for value in given for part in value.split(",")]
    return [_text(param.name, items, value) for value in given]


def _query(param: Param, schema: Mapping[str, Any], raw: str) -> str | int | bool:
    name = param.name
    if schema.get("type") == "boolean":
        if raw.lower() not in _TRUE | _FALSE:
            raise bad_query(name, "must be true or false")
        return raw.lower() in _TRUE
    if schema.get("type") == "integer":
        least, most = schema.get("minimum", 0), schema.get("maximum", LARGEST_COUNT)
        # At most 18 digits: int() of a long string costs, and of a very long one raises.
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18 and least <= int(raw) <= most):
            bounds = f">= {least}" if most == LARGEST_COUNT else f"from {least} to {most}"
            raise bad_query(name, f"{raw[:32]!r} is not an integer {bounds}")
        return int(raw)
    return _text(name, schema, raw)


def _text(name: str, schema: Mapping[str, Any], raw: str) -> str:
    if "enum" in schema and raw not in schema["enum"]:
        raise bad_query(name, f"{raw!r} is not one of {', '.join(schema['enum'])}")
    if schema.get("pattern") == JOBID_REGEX and not is_jobid(raw):
        raise bad_query(name, f"{raw[:64]!r} is not a job id")
    return raw


_LABEL = re.compile(f"({LABEL_KEY_PATTERN})=([^\x00-\x1f\x7f]{{0,{LIMITS.max_label_value}}})")


def label_filters(values: list[str]) -> list[tuple[str, str]]:
    """``key=value`` filters; 422 naming ``label`` for one that is no label."""
    out = []
    for value in values:
        m = _LABEL.fullmatch(value)
        if m is None:
            raise ApiError(
                ProblemCode.validation_error,
                f"query parameter 'label': {value[:80]!r} is not key=value (a label's key, '=', its value)",
                errors=[field_error(["query", "label"], "not key=value")],
            )
        out.append((m[1], m[2]))
    return out
