"""What the client refuses to send: input checked before it goes into a request.

A mistake caught here raises :class:`InvalidRequestError` (also a ``ValueError``)
with a message naming what is wrong, and nothing is sent. The limits are core's, the
same the server enforces.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pydantic

from psik_api_core import LIMITS, STRICT_INPUT, JobSpec, is_jobid

from ._exceptions import InvalidRequestError


def path_jobid(jobid: str) -> str:
    """``jobid``, checked to be a job id before it goes into a URL path."""
    if not isinstance(jobid, str) or not is_jobid(jobid):
        raise InvalidRequestError(
            f"not a job id: {jobid!r} (a job id is digits with an optional fraction, e.g. 1693992878.203)"
        )
    return jobid


def validate_spec(data: Mapping[str, Any]) -> JobSpec:
    """``data`` as a job spec, validated as strictly as the server will (unknown fields
    are errors). Raises :class:`InvalidRequestError` naming every field at fault, with
    pydantic's details in ``.errors``."""
    try:
        return JobSpec.model_validate(dict(data), context=STRICT_INPUT)
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


def idempotency_key(key: str | None) -> str:
    """``key``, or a fresh random one: every submission carries a key, so that
    retrying it after a lost response cannot create a second job."""
    if key is None:
        return str(uuid.uuid4())
    longest = LIMITS.max_idempotency_key
    if not (isinstance(key, str) and 0 < len(key) <= longest and key.isascii() and key.isprintable()):
        raise InvalidRequestError(f"an Idempotency-Key is 1 to {longest} printable ASCII characters")
    return key
