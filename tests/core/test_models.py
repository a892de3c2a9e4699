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
    JobSummary,
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


def _finished_job() -> Job:
    long_script = "echo " + "x" * 2000
    return Job.model_validate(
        {
            "jobid": "1693992878.203",
            "name": "hello " * 40,
            "backend": "default",
            "owner": "local:psik_api",
            "state": "completed",
            "jobndx": 1,
            "native_id": "4242",
            "exit_code": 0,
            "created": 1693992878.203,
            "updated": 1693992880.5,
            "spec": {"script": long_script, "environment": {f"V{i}": "v" * 50 for i in range(20)}},
            "history": [
                {"time": 1693992878.203 + i, "jobndx": 1, "state": s, "info": "i" * 100}
                for i, s in enumerate(["new", "queued", "active", "completed"])
            ],
        }
    )


def test_a_job_repr_is_one_short_readable_line() -> None:
    """A notebook shows a Job by its repr: it was every field, spec and history included
    (1,100 characters here and far more for a real script); now what says which job and
    how it is."""
    job = _finished_job()
    text = repr(job)
    assert "\n" not in text and len(text) <= 150, text
    assert text.startswith("Job(jobid='1693992878.203', name='hello hello")
    for part in ("state=completed", "jobndx=1", "exit_code=0", "backend='default'"):
        assert part in text, text
    assert "x" * 20 not in text and "history" not in text
    assert len(str(job)) <= 150  # str() too (pydantic's is every field as well)
    summary = JobSummary.model_validate(job.model_dump(include=set(JobSummary.model_fields)))
    assert repr(summary).startswith("JobSummary(jobid='1693992878.203'") and len(repr(summary)) <= 150


def test_a_job_pretty_prints_on_a_few_lines() -> None:
    """IPython's pretty printer (what a notebook cell's value uses) gets a few lines:
    the short repr, then owner, native id, times and the last history row."""
    job = _finished_job()

    class Printer:  # IPython.lib.pretty's protocol: text() is all _repr_pretty_ calls
        def __init__(self) -> None:
            self.out = ""

        def text(self, s: str) -> None:
            self.out += s

    p = Printer()
    job._repr_pretty_(p, cycle=False)
    lines = p.out.splitlines()
    assert lines[0] == repr(job) and 3 <= len(lines) <= 8, p.out
    assert all(len(line) <= 150 for line in lines), p.out
    assert "4242" in p.out and "local:psik_api" in p.out and "completed" in lines[-1]
