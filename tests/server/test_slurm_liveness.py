"""Slurm liveness decisions without a cluster: what squeue says (faked) decides which
jobs are failed, after two looks, and nothing is concluded while it cannot be asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from psik_api_core import OVERRULED_INFO, JobState
from psik_api_server.backends.slurm import commands
from psik_api_server.backends.slurm.liveness import Claimed, SlurmLiveness, claimed_ends, still_runs

pytestmark = pytest.mark.anyio


class FakeSlurm:
    def __init__(self) -> None:
        self.ping = (0, "Slurmctld(primary) at x is UP\n", "")
        self.squeue = (0, "", "")
        self.sacct = (1, "", "Slurm accounting storage is disabled\n")
        self.calls: list[str] = []

    async def __call__(self, *argv: str, **_: Any) -> tuple[int, str, str]:
        self.calls.append(argv[0])
        if argv[0] == "scontrol":
            return self.ping
        if argv[0] == "squeue":
            return self.squeue
        assert argv[0] == "sacct", argv
        return self.sacct


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    f = FakeSlurm()
    monkeypatch.setattr(commands, "run", f)
    return f


async def test_an_ended_or_unknown_job_is_failed_at_the_second_look(fake: FakeSlurm) -> None:
    live = SlurmLiveness()
    jobs = {"a": "10", "b": "11", "c": "12"}
    fake.squeue = (0, "10|RUNNING|None\n11|CANCELLED|None\n", "")
    assert await live.check(jobs) == []  # first look: psik's own end row may be on its way
    ended = {e.jobid: e.reason for e in await live.check(jobs)}
    assert set(ended) == {"b", "c"}
    assert ended["b"].startswith("Slurm job 11 ended CANCELLED (cancelled outside psik-api")
    assert ended["c"].startswith("Slurm job 12 is no longer known to the controller")
    assert ended["c"].endswith("psik recorded no end state")


async def test_a_job_seen_ended_once_then_running_again_is_not_failed(fake: FakeSlurm) -> None:
    live = SlurmLiveness()
    fake.squeue = (0, "10|CANCELLED|None\n", "")
    assert await live.check({"a": "10"}) == []
    fake.squeue = (0, "10|RUNNING|None\n", "")  # requeued
    assert await live.check({"a": "10"}) == []
    assert await live.check({"a": "10"}) == []


async def test_nothing_is_concluded_while_the_controller_cannot_be_asked(fake: FakeSlurm) -> None:
    live = SlurmLiveness()
    fake.ping = (1, "Slurmctld(primary) at x is DOWN\n", "")
    for _ in range(3):
        assert await live.check({"a": "10"}) == []
    assert "squeue" not in fake.calls  # squeue would spend ~18 s retrying
    fake.ping = (0, "Slurmctld(primary) at x is UP\n", "")
    fake.squeue = (1, "", "slurm_load_jobs error: Socket timed out on send/recv operation")
    assert await live.check({"a": "10"}) == []
    assert await live.check({"a": "10"}) == []


async def test_squeue_s_invalid_job_id_means_none_is_known(fake: FakeSlurm) -> None:
    live = SlurmLiveness()
    fake.squeue = (1, "", "slurm_load_jobs error: Invalid job id specified")
    await live.check({"a": "10"})
    assert [e.jobid for e in await live.check({"a": "10"})] == ["a"]


async def test_a_job_squeue_forgot_ends_as_accounting_says(fake: FakeSlurm) -> None:
    """squeue forgets a job MinJobAge after its end: sacct then tells how it ended (the
    latest of several jobs with that id); a job accounting still thinks runs is lost."""
    live = SlurmLiveness()
    jobs = {"a": "10", "b": "11"}
    fake.squeue = (1, "", "slurm_load_jobs error: Invalid job id specified")
    fake.sacct = (0, "COMPLETED|0:0\nFAILED|0:9\n", "")
    assert await live.check(jobs) == []
    ended = {e.jobid: e.reason for e in await live.check(jobs)}
    assert ended["a"] == (
        "Slurm job 10 ended FAILED, exit code 0:9 (from accounting: squeue no longer shows it)"
        " and psik recorded no end state"
    )
    fake.sacct = (0, "CANCELLED by 0|0:15\n", "")
    assert "ended CANCELLED by 0, exit code 0:15 (from accounting" in (await live.check(jobs))[0].reason
    fake.sacct = (0, "RUNNING|0:0\n", "")
    reason = (await live.check(jobs))[0].reason
    assert reason.startswith("Slurm job 10 is no longer known to the controller (lost)")
    assert "accounting last saw it RUNNING" in reason


async def test_without_accounting_a_job_squeue_forgot_is_lost(fake: FakeSlurm) -> None:
    live = SlurmLiveness()
    fake.squeue = (0, "", "")
    await live.check({"a": "10"})
    [ended] = await live.check({"a": "10"})
    assert ended.reason == (
        "Slurm job 10 is no longer known to the controller (lost) and psik recorded no end state"
    )
    assert fake.calls.count("sacct") == 1


async def test_health_says_why(fake: FakeSlurm) -> None:
    health = commands.SlurmHealth("debug", ttl=0)
    fake.squeue = (0, "", "")
    fake.ping = (1, "Slurmctld(primary) at x is DOWN\n", "")
    assert (await health.check() or "").startswith("Slurm controller unreachable")


def test_unreachable_messages() -> None:
    assert commands.unreachable(
        "sbatch: error: Batch job submission failed: Unable to contact slurm controller"
    )
    assert commands.unreachable("sbatch: error: fetch_config: DNS SRV lookup failed")
    assert not commands.unreachable(
        "sbatch: error: Batch job submission failed: Invalid partition name specified"
    )


# ---- an end row the job wrote itself while Slurm still ran it (issue 14) ----


async def test_a_job_s_own_completed_that_slurm_contradicts_is_overruled(fake: FakeSlurm) -> None:
    """The job wrote ``completed`` and went on; Slurm's view is trusted over that row:
    followed while squeue shows it running, failed with Slurm's word once it ends
    otherwise (here TIMEOUT); an end Slurm agrees with, or a ``failed`` of the job's own,
    stands."""
    live = SlurmLiveness()
    fake.squeue = (0, "10|RUNNING|None\n11|RUNNING|None\n12|RUNNING|None\n", "")
    assert await live.check({"a": "10", "b": "11", "c": "12"}) == []  # seen live
    assert sorted(live.left({})) == ["a", "b", "c"]
    claimed = {
        "a": Claimed("10", JobState.completed),
        "b": Claimed("11", JobState.completed),
        "c": Claimed("12", JobState.failed),
    }
    assert await live.check({}, claimed) == []  # still running: followed, nothing recorded
    assert sorted(live.left({})) == ["a", "b", "c"]
    fake.squeue = (0, "10|TIMEOUT|TimeLimit\n11|COMPLETED|None\n12|FAILED|NonZeroExitCode\n", "")
    [ended] = await live.check({}, claimed)
    assert ended.jobid == "a" and ended.overrules
    assert ended.reason == (
        f"{OVERRULED_INFO}: the job recorded completed, but Slurm job 10 ended TIMEOUT, reason TimeLimit"
    )
    assert live.left({}) == []  # all ended: followed no more


async def test_a_job_s_own_end_is_not_overruled_while_slurm_cannot_be_asked(fake: FakeSlurm) -> None:
    live = SlurmLiveness()
    fake.squeue = (0, "10|RUNNING|None\n", "")
    await live.check({"a": "10"})
    fake.ping = (1, "Slurmctld(primary) at x is DOWN\n", "")
    assert await live.check({}, {"a": Claimed("10", JobState.completed)}) == []
    assert live.left({}) == ["a"]  # asked again next time
    fake.ping = (0, "Slurmctld(primary) at x is UP\n", "")
    fake.squeue = (1, "", "slurm_load_jobs error: Invalid job id specified")
    assert await live.check({}, {"a": Claimed("10", JobState.completed)}) == []  # forgotten: it stands
    assert live.left({}) == []


def test_only_a_job_s_own_end_is_claimed(tmp_path: Path) -> None:
    """What :func:`claimed_ends` follows: a run ended ``completed``/``failed`` (rows the job
    can write), not one the server ended (``canceled``, or a row it marked overruling)."""
    prefix = tmp_path / "jobs"
    rows = {
        "1.1": "1,0,new,\n2,1,queued,10\n3,1,completed,\n",
        "1.2": "1,0,new,\n2,1,queued,11\n3,1,failed,3\n",
        "1.3": "1,0,new,\n2,1,queued,12\n3,0,canceled,\n",
        "1.4": f"1,0,new,\n2,1,queued,13\n3,1,completed,\n4,1,failed,{OVERRULED_INFO}: x\n",
        "1.5": "1,0,new,\n2,1,queued,14\n3,1,active,\n",
    }
    for jobid, status in rows.items():
        (prefix / jobid).mkdir(parents=True)
        (prefix / jobid / "status.csv").write_text(status)
        (prefix / jobid / "spec.json").write_text(json.dumps({"script": "true", "backend": "slurm"}))
    assert claimed_ends(prefix, [*rows, "1.6"]) == {
        "1.1": Claimed("10", JobState.completed),
        "1.2": Claimed("11", JobState.failed),
    }


async def test_cancel_asks_slurm_whether_a_job_s_own_end_still_runs_only_while_it_answers(
    fake: FakeSlurm,
) -> None:
    fake.squeue = (0, "10|RUNNING|None\n11|COMPLETING|None\n", "")
    assert await still_runs("10")
    assert not await still_runs("11")  # its batch script has exited
    assert not await still_runs("12")  # unknown
    fake.calls.clear()
    fake.ping = (1, "Slurmctld(primary) at x is DOWN\n", "")
    assert not await still_runs("10")  # the row stands; no ~18 s of squeue retries
    assert "squeue" not in fake.calls
