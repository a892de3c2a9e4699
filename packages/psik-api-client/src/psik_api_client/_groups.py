"""Workflows (issue 18), written once as flows (see ``_base``): a job's dependencies
and labels merged into its spec, many jobs made by one request (a list, or a sweep of
parameters), and a group read or cancelled as a whole.

Everything is checked here before it is sent, with core's own models and limits, so a
mistake raises :class:`InvalidRequestError` naming the entry (``jobs[3]: ...``) and
nothing is made; the server refuses the rest with 422 and makes nothing either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pydantic

from psik_api_core import LIMITS, Group, GroupRequest, JobSpec

from ._base import BaseClient, Flow, parse
from ._exceptions import InvalidRequestError
from ._inputs import idempotency_key, path_group, spec_body
from ._types import DEFAULT_OPTIONS, RequestOptions

#: A sweep's parameters: each name's values (numbers are sent as their text).
ParamsArg = Mapping[str, Iterable[str | int | float]]

_GROUP = pydantic.TypeAdapter(Group)


def _entry_body(spec: JobSpec | Mapping[str, Any], where: str) -> dict[str, Any]:
    """One spec's body, its errors named as the server names them (``jobs[3]``)."""
    try:
        return spec_body(spec)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{where}: {exc}", errors=exc.errors) from exc


def group_body(specs: Iterable[JobSpec | Mapping[str, Any]]) -> dict[str, Any]:
    """The body of ``POST /v1/groups`` making ``specs``, in order."""
    if isinstance(specs, JobSpec | Mapping | str | bytes):
        raise InvalidRequestError("submit_many takes a list of job specs (one spec: submit)")
    jobs = [_entry_body(spec, f"jobs[{i}]") for i, spec in enumerate(specs)]
    if not 1 <= len(jobs) <= LIMITS.max_group_jobs:
        raise InvalidRequestError(f"a group makes 1 to {LIMITS.max_group_jobs} jobs, not {len(jobs)}")
    return {"jobs": jobs}


def sweep_request(spec: JobSpec | Mapping[str, Any], params: ParamsArg) -> GroupRequest:
    """The sweep of ``spec`` over ``params`` (one job per combination), checked."""
    if not isinstance(params, Mapping):
        raise InvalidRequestError(f"params is a mapping of names to lists of values, not {params!r}")
    values: dict[str, list[str]] = {}
    for name, given in params.items():
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise InvalidRequestError(f"params {name!r} is a list of values, not {given!r}")
        texts = []
        for value in given:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise InvalidRequestError(f"params {name!r}: a value is a str or a number, not {value!r}")
            texts.append(value if isinstance(value, str) else str(value))
        values[name] = texts
    body = _entry_body(spec, "spec")
    try:
        return GroupRequest.model_validate({"spec": body, "params": values})
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'sweep'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequestError(f"invalid sweep: {problems}", errors=exc.errors()) from exc


def sweep_body(request: GroupRequest) -> dict[str, Any]:
    """The body of ``POST /v1/groups`` for a sweep: the spec as given, and its params."""
    assert request.spec is not None and request.params is not None
    return {"spec": spec_body(request.spec), "params": request.params}


def make_group_flow(
    api: BaseClient, body: dict[str, Any], key: str | None, options: RequestOptions = DEFAULT_OPTIONS
) -> Flow[Group]:
    """POST ``/v1/groups``: all the jobs, or none. It carries an ``Idempotency-Key`` (a
    random one unless given), so a retry returns the group the first attempt made."""
    headers = {"Idempotency-Key": idempotency_key(key)}
    request = api._build_request("POST", "/v1/groups", json=body, headers=headers, options=options)
    response = yield from api._send_flow(request)
    return parse(response, _GROUP)


def group_flow(api: BaseClient, group: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[Group]:
    """GET ``/v1/groups/{group}``: its members (summaries) and how many are in each state."""
    request = api._build_request("GET", f"/v1/groups/{path_group(group)}", options=options)
    return api._fetch_flow(_GROUP, request)


def cancel_group_flow(api: BaseClient, group: str, options: RequestOptions = DEFAULT_OPTIONS) -> Flow[Group]:
    """DELETE ``/v1/groups/{group}``: cancel every member that has not ended."""
    request = api._build_request("DELETE", f"/v1/groups/{path_group(group)}", options=options)
    return api._fetch_flow(_GROUP, request)
