"""Core's wire models: the seed README's bodies validate, strict input names unknown
fields, output parsing ignores them, job ids are anchored at both ends."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from psik_api_core import (
    STRICT_INPUT,
    Action,
    Job,
    JobSpec,
    OwnerPolicy,
    Principal,
    is_jobid,
)

SEED_SUBMIT = {
    "name": "show system info",
    "script": "cat /proc/cpuinfo; cat /proc/meminfo; rocm-smi; echo $nodes; $mpirun hostname",
    "resources": {"process_count": 8, "cpu_cores_per_process": 7, "duration": 2, "gpu_cores_per_process": 1},
}


def test_seed_readme_bodies_validate_strictly() -> None:
    spec = JobSpec.model_validate(SEED_SUBMIT, context=STRICT_INPUT)
    assert spec.resources.process_count == 8 and spec.resources.duration == 2
    assert JobSpec.model_validate({"script": "cat data.txt"}, context=STRICT_INPUT).backend == "default"


def test_strict_input_names_unknown_fields_at_every_level() -> None:
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({"script": "x", "scrpit": "y"}, context=STRICT_INPUT)
    assert "scrpit" in str(err.value)
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({"script": "x", "resources": {"nodes": 2}}, context=STRICT_INPUT)
    assert err.value.errors()[0]["loc"] == ("resources",)
    assert "nodes" in err.value.errors()[0]["msg"]


def test_output_parsing_ignores_fields_a_newer_server_adds() -> None:
    job = Job.model_validate(
        {
            "jobid": "1693992878.203",
            "backend": "default",
            "owner": "u",
            "state": "queued",
            "created": 1693992878.2,
            "updated": 1693992878.3,
            "spec": {"script": "x", "future_field": 1},
            "history": [],
            "another_future_field": {"a": 1},
        }
    )
    assert job.spec.script == "x"


def test_script_is_required() -> None:
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({}, context=STRICT_INPUT)
    assert err.value.errors()[0]["loc"] == ("script",)


@pytest.mark.parametrize("good", ["1693992878.203", "1", "0.5"])
def test_jobid_accepts(good: str) -> None:
    assert is_jobid(good)


@pytest.mark.parametrize(
    "bad", ["", "1.2\n", "\n1.2", "../1", "1.2/..", "1.2.3", "1e5", "-1", "١٢٣", " 1", "1.", ".5", "1" * 21]
)
def test_jobid_refuses(bad: str) -> None:
    assert not is_jobid(bad)


def test_secret_never_serialised_in_json() -> None:
    spec = JobSpec(script="x", cb_secret="hunter2")  # type: ignore[arg-type]
    assert "hunter2" not in spec.model_dump_json()


def test_owner_policy() -> None:
    alice, bob = Principal("alice"), Principal("bob")
    pol = OwnerPolicy()
    assert pol.allows(alice, Action.write, "alice", "1.1")
    assert not pol.allows(bob, Action.read, "alice", "1.1")
    ro = Principal("alice", read_only=True)
    assert pol.allows(ro, Action.read, "alice", "1.1") and not pol.allows(ro, Action.write, "alice", "1.1")
    one = Principal("alice", jobs=frozenset({"1.1"}))
    assert pol.allows(one, Action.read, "alice", "1.1") and not pol.allows(one, Action.read, "alice", "1.2")
    assert not pol.allows(one, Action.create, None, None) and pol.allows(alice, Action.create, None, None)
