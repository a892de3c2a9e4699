"""Core mirrors psik's JobSpec/ResourceSpec without importing psik; this proves the
mirror matches psik's own models, so any drift (a renamed field, a new default) fails."""

from __future__ import annotations

from typing import Any

import psik
import pytest
from pydantic import BaseModel

from psik_api_core import JobSpec, ResourceSpec


def _fields(model: type[BaseModel]) -> dict[str, tuple[Any, Any]]:
    out = {}
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        out[name] = (field.annotation, default)
    return out


@pytest.mark.parametrize(("ours", "theirs"), [(JobSpec, psik.JobSpec), (ResourceSpec, psik.ResourceSpec)])
def test_fields_types_and_defaults_match_psik(ours: type[BaseModel], theirs: type[BaseModel]) -> None:
    mine, psiks = _fields(ours), _fields(theirs)
    # The API's own fields (labels, after) are the only ones psik lacks; they are kept
    # beside spec.json, never in it (psik's JobSpec forbids unknown fields).
    api_only = getattr(ours, "API_ONLY", frozenset())
    assert api_only <= {"labels", "after"}
    assert [n for n in mine if n not in api_only] == list(psiks)
    ours_props = ours.model_json_schema()["properties"]
    their_props = theirs.model_json_schema()["properties"]
    for name in psiks:
        assert mine[name][1] == psiks[name][1], f"default of {name}"
        assert _shape(ours_props[name]) == _shape(their_props[name]), f"type of {name}"


def _shape(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's JSON schema without its human text and default (defaults are compared by value above)."""
    return {k: v for k, v in schema.items() if k not in {"title", "description", "default"}}


def test_a_core_spec_round_trips_through_psik() -> None:
    spec = JobSpec.model_validate(
        {
            "name": "show system info",
            "script": "hostname",
            "resources": {"process_count": 8, "cpu_cores_per_process": 7, "duration": 2},
            "cb_secret": "s3cret",
        }
    )
    theirs = psik.JobSpec.model_validate(spec.psik_fields())
    assert theirs.resources.process_count == 8
    assert theirs.cb_secret is not None and theirs.cb_secret.get_secret_value() == "s3cret"
    back = JobSpec.model_validate_json(theirs.model_dump_json())
    assert back.model_dump() == spec.model_dump() | {"cb_secret": back.cb_secret}
    # An API-only field never reaches psik (whose spec would refuse it).
    labelled = spec.model_copy(update={"labels": {"run": "r1"}, "after": []})
    assert psik.JobSpec.model_validate(labelled.psik_fields()).model_dump() == theirs.model_dump()
    assert back.cb_secret is not None and back.cb_secret.get_secret_value() == "s3cret"


def test_states_match_psik() -> None:
    from psik_api_core import JobState

    assert [s.value for s in JobState] == [s.value for s in psik.JobState]
    assert {s.value for s in JobState if s.is_final} == {s.value for s in psik.JobState if s.is_final()}
