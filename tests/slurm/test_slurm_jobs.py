"""A `slurm` backend on a real single-node cluster, through the real client: jobs run,
are listed, logged and cancelled as with the local backend; the JobSpec's resources reach
Slurm; psik's own attributes never reach sbatch; a job Slurm ends outside psik is failed
with the reason; a refused submission says why, and a controller that cannot be reached is
a 503 whose job can be started once it is back."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from leaks import MARKER
from psik_api_client import (
    AsyncClient,
    ConflictError,
    JobState,
    ServiceUnavailableError,
    SubmitFailedError,
    UnprocessableEntityError,
)
from psik_api_core import OVERRULED_INFO
from psik_api_server.app import create_app
from psik_api_server.backends.slurm.options import SBATCH_OPTIONS, sbatch_options
from psik_api_server.settings import BackendSettings, Settings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("slurm_cluster")]

#: The liveness interval these tests run with; a job ended outside psik must be failed
#: within 2 intervals and a squeue call (see backends/slurm/liveness.py), plus a margin for the checks.
LIVENESS = 0.5
LIVENESS_BOUND = 2 * LIVENESS + 3.0


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def scontrol_job(native_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (keys as Slurm spells them)."""
    out = slurm("scontrol", "show", "job", "-o", native_id)
    fields: dict[str, str] = {}
    for word in out.split():
        key, _, value = word.partition("=")
        fields.setdefault(key, value)
    return fields


def squeue_state(native_id: str) -> str | None:
    """The job's state as squeue shows it (None: not shown at all)."""
    r = subprocess.run(
        ["squeue", "--states=all", "-h", "-j", native_id, "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return r.stdout.strip() or None


async def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.1)


def slurm_settings(tmp_path: Path, **backend: Any) -> Settings:
    return Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends={
            "slurm": BackendSettings(
                type="slurm",
                queue_name="debug",
                attributes={"psik_python": sys.executable},
                **backend,
            ),
            "nopart": BackendSettings(
                type="slurm", queue_name="nosuchpartition", attributes={"psik_python": sys.executable}
            ),
        },
        watch_interval=0.05,
        liveness_interval=LIVENESS,
    )


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[AsyncClient]:
    app = create_app(slurm_settings(tmp_path, project_name="physics"))
    async with (
        LifespanManager(app),
        AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app), timeout=120) as client,
    ):
        yield client


async def test_submit_list_state_logs_files(api: AsyncClient) -> None:
    job = await api.submit(
        {
            "name": "hello-slurm",
            "backend": "slurm",
            "script": "#!/bin/bash\necho hello from $SLURM_JOB_ID; echo result > out.txt",
            "resources": {"duration": 2},
        }
    )
    assert job.state in (JobState.queued, JobState.active, JobState.completed)
    assert job.native_id is not None and job.native_id.isdigit()
    done = await api.wait(job.jobid, timeout=60)
    assert done.state is JobState.completed, done.history
    assert done.exit_code == 0
    assert (await api.state(job.jobid)).state is JobState.completed
    assert job.jobid in [j.jobid async for j in api.list(backend="slurm")]
    assert [j.jobid async for j in api.list(state="completed", name="hello-slurm")] == [job.jobid]
    logs = await api.logs(job.jobid)
    assert logs["stdout.1"] == f"hello from {job.native_id}\n"
    listing = await api.list_files(job.jobid)
    assert "out.txt" in [f.name for f in listing.entries]
    # psik records `completed` just before its batch script exits: Slurm follows.
    await until(lambda: scontrol_job(job.native_id or "")["JobState"] == "COMPLETED", 10, "Slurm's COMPLETED")


async def test_a_failing_script_is_failed_with_its_exit_code(api: AsyncClient) -> None:
    job = await api.submit({"backend": "slurm", "script": "#!/bin/bash\nexit 3"})
    done = await api.wait(job.jobid, timeout=60)
    assert done.state is JobState.failed
    assert done.exit_code == 3


def ensure_account(account: str) -> None:
    """With accounting, Slurm gives a job its user's default account unless the account
    asked for is one of the user's: make ``account`` one of ours."""
    user = pwd.getpwuid(os.getuid()).pw_name
    for argv in (("account", account), ("user", user, f"account={account}")):
        # Exit 1 with "Nothing new added" when it is there already.
        subprocess.run(["sacctmgr", "-i", "add", *argv], capture_output=True, text=True, timeout=30)
    assoc = slurm(
        "sacctmgr", "-n", "-P", "list", "assoc", f"user={user}", f"account={account}", "format=Account"
    )
    assert assoc.split() == [account], assoc


async def test_resources_reach_slurm_and_psik_attributes_do_not(api: AsyncClient) -> None:
    ensure_account("physics")
    ntasks = min(2, os.cpu_count() or 1)
    job = await api.submit(
        {
            "name": "resources",
            "backend": "slurm",
            "script": "#!/bin/bash\nsleep 300",
            "resources": {
                "duration": 7,
                "process_count": ntasks,
                "cpu_cores_per_process": 1,
                "exclusive_node_use": False,
            },
            # psik_python is psik's own (given here, and in the backend's attributes): were
            # it passed to sbatch, sbatch would take the path for its script and refuse.
            "attributes": {"--comment": "from-psik-api", "psik_python": sys.executable},
        }
    )
    try:
        assert job.native_id is not None
        fields = scontrol_job(job.native_id)
        assert fields["JobName"] == "resources"
        assert fields["NumTasks"] == str(ntasks)
        assert fields["CPUs/Task"] == "1"
        assert fields["TimeLimit"] == "00:07:00"
        assert fields["Partition"] == "debug"
        assert fields["Account"] == "physics"
        assert fields["Comment"] == "from-psik-api"
        assert fields["OverSubscribe"] != "NO"  # not --exclusive
    finally:
        await api.cancel(job.jobid)


def test_psik_attributes_are_not_sbatch_options() -> None:
    assert sbatch_options({"psik_python": "/x/python", "--qos": "low", "-J": "n"}) == [
        "--qos=low",
        "--job-name=n",
    ]
    with pytest.raises(ValueError, match="'qos' is not an sbatch option"):
        sbatch_options({"qos": "low"})


def test_this_sbatch_knows_every_option_of_the_allow_list() -> None:
    """Each allowed option, as the server passes it (``--name=value``, a flag alone), is
    one this sbatch parses (``--test-only``: nothing is submitted)."""
    example = {"a whole number": "1", "empty or a whole number": "1", "'yes' or 'no'": "no"}
    unknown = []
    for option, kind in SBATCH_OPTIONS.items():
        arg = option if kind.flag else f"{option}={example.get(kind.what, '1')}"
        done = subprocess.run(
            ["sbatch", "--test-only", arg],
            input="#!/bin/sh\ntrue\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        # getopt's own words (a value sbatch then refuses is still an option it knows).
        if any(
            w in done.stderr for w in ("unrecognized option", "allow an argument", "requires an argument")
        ):
            unknown.append(f"{arg}: {done.stderr.strip()}")
    assert not unknown, unknown


def slurm_job_ids() -> set[str]:
    """Every job the controller (squeue) or accounting (sacct) knows."""
    listed = slurm("squeue", "-h", "--states=all", "-o", "%i").split()
    accounted = slurm("sacct", "-a", "-X", "-n", "-P", "-S", "now-1hours", "-o", "JobID").split()
    return set(listed) | set(accounted)


async def test_options_that_slipped_past_the_deny_list_are_422_and_reach_no_slurm(api: AsyncClient) -> None:
    """Issue 14: each of these was submitted and ran (``-Qo`` even as a 502 "not submitted")."""
    before = slurm_job_ids()
    attacks = [{"--wra": "touch /tmp/pwned"}, {"-vo": "/tmp/x"}, {"-Qo": "/tmp/x"}, {"--hold": "x.sh"},
               {"--exclusive": "--wrap=touch /tmp/pwned"}, {"--": "evil.sh"},
               {"--export-f": "/etc/shadow"}]  # fmt: skip
    for attack in attacks:
        with pytest.raises(UnprocessableEntityError, match="attribute") as info:
            await api.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 300", "attributes": attack})
        assert info.value.status_code == 422
    assert [j async for j in api.list()] == []
    await anyio.sleep(1)
    assert slurm_job_ids() - before == set()  # (squeue forgets old jobs meanwhile)


async def test_an_attribute_that_is_no_sbatch_option_is_refused_by_name(api: AsyncClient) -> None:
    with pytest.raises(UnprocessableEntityError, match="'qos' is not an sbatch option"):
        await api.submit({"backend": "slurm", "script": "true", "attributes": {"qos": "low"}})
    assert [j async for j in api.list()] == []  # refused before the job was made


async def test_cancel_a_running_and_a_queued_job(api: AsyncClient) -> None:
    # Each job takes the node exclusively (psik's default): the second one waits.
    running = await api.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 300"})
    await until(lambda: squeue_state(running.native_id or "") == "RUNNING", 30, "the first job to run")
    queued = await api.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 300"})
    assert queued.native_id is not None and running.native_id is not None
    assert squeue_state(queued.native_id) == "PENDING"
    assert (await api.state(queued.jobid)).state is JobState.queued

    for job in (queued, running):
        canceled = await api.cancel(job.jobid)
        assert canceled.state is JobState.canceled
        assert job.native_id is not None
        await until(lambda nid=job.native_id: squeue_state(nid) in (None, "CANCELLED"), 10, "Slurm to end it")
    # Nothing the dying batch script might record changes that.
    await anyio.sleep(2 * LIVENESS + 1)
    for job in (queued, running):
        assert (await api.get(job.jobid)).state is JobState.canceled


async def test_scancel_outside_psik_fails_the_job_with_the_reason(api: AsyncClient) -> None:
    job = await api.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 300"})
    assert job.native_id is not None
    await until(lambda: squeue_state(job.native_id or "") == "RUNNING", 30, "the job to run")

    # psik records `active` from the compute node; wait for it, then cancel behind its back.
    async def active() -> bool:
        return (await api.state(job.jobid)).state is JobState.active

    deadline = time.monotonic() + 30
    while not await active():
        assert time.monotonic() < deadline, "the job never became active"
        await anyio.sleep(0.1)
    slurm("scancel", job.native_id)
    t0 = time.monotonic()
    done = await api.wait(job.jobid, timeout=LIVENESS_BOUND + 30, poll_interval=0.1)
    elapsed = time.monotonic() - t0
    assert done.state is JobState.failed
    assert f"Slurm job {job.native_id} ended CANCELLED" in done.history[-1].info
    assert elapsed < LIVENESS_BOUND, elapsed


async def test_a_job_slurm_no_longer_knows_is_failed(api: AsyncClient, tmp_path: Path) -> None:
    """A controller that lost its state (or a job long gone from squeue, no accounting):
    simulated by pointing the job's queued row at a Slurm job id nobody ever had."""
    job = await api.submit({"backend": "slurm", "script": "true", "attributes": {"--begin": "now+1hour"}})
    assert job.native_id is not None
    status = tmp_path / "jobs" / job.jobid / "status.csv"
    status.write_text(status.read_text().replace(f",queued,{job.native_id}\n", ",queued,4000000\n"))
    slurm("scancel", job.native_id)
    t0 = time.monotonic()
    done = await api.wait(job.jobid, timeout=LIVENESS_BOUND + 30, poll_interval=0.1)
    assert done.state is JobState.failed
    assert "Slurm job 4000000 is no longer known to the controller" in done.history[-1].info
    assert time.monotonic() - t0 < LIVENESS_BOUND


async def test_an_invalid_partition_is_refused_with_sbatch_s_reason(api: AsyncClient) -> None:
    info = await api.backend("nopart")
    assert not info.healthy and "nosuchpartition" in (info.detail or "")
    with pytest.raises(SubmitFailedError, match="Invalid partition name specified") as err:
        await api.submit({"backend": "nopart", "script": "true"})
    assert err.value.jobid is not None
    job = await api.get(err.value.jobid)
    assert job.state is JobState.failed
    assert "Invalid partition name specified" in job.history[-1].info


async def test_backend_health_follows_the_partition(api: AsyncClient) -> None:
    assert (await api.backend("slurm")).healthy
    slurm("scontrol", "update", "PartitionName=debug", "State=DOWN")
    try:
        await anyio.sleep(5.1)  # the health answer is cached 5 s
        info = await api.backend("slurm")
        assert not info.healthy and info.detail == "partition 'debug' is down"
    finally:
        slurm("scontrol", "update", "PartitionName=debug", "State=UP")


async def test_with_the_controller_stopped_submit_is_503_and_the_job_starts_later(
    api: AsyncClient, slurm_cluster: Any
) -> None:
    slurm_cluster.stop("slurmctld")
    try:
        backends = {b.name: b for b in await api.backends()}
        assert not backends["slurm"].healthy
        assert "controller unreachable" in (backends["slurm"].detail or "")
        with pytest.raises(ServiceUnavailableError) as err:
            await api.submit({"name": "later", "backend": "slurm", "script": "echo later"})
        detail = err.value.problem.detail or ""
        assert "'slurm'" in detail and "Unable to contact slurm controller" in detail, detail
        jobid = err.value.jobid
        assert jobid is not None
        job = await api.get(jobid)
        assert job.state is JobState.failed
        assert "Unable to contact slurm controller" in job.history[-1].info
    finally:
        slurm_cluster.start("slurmctld")
    await until(lambda: "idle" in slurm_cluster.node_state(), 30, "the node to be idle again")
    started = await api.start(jobid)
    assert started.jobndx == 2
    done = await api.wait(jobid, timeout=60)
    assert done.state is JobState.completed
    assert (await api.logs(jobid))["stdout.2"] == "later\n"


def test_a_daemon_a_test_restarts_is_the_cluster_s_not_the_test_s(slurm_cluster: Any) -> None:
    """tests/leaks.py ends every process carrying the session's marker after each test:
    a slurmctld a test restarted with the test's environment was killed with it, and
    every later Slurm test failed. The harness starts daemons with the cluster's own."""
    slurm_cluster.stop("slurmctld")
    slurm_cluster.start("slurmctld")
    environ = Path(f"/proc/{slurm_cluster.pid('slurmctld')}/environ").read_bytes().split(b"\0")
    assert MARKER in os.environ
    assert not [v for v in environ if v.startswith(MARKER.encode() + b"=")]


async def test_a_controller_that_cannot_be_asked_fails_no_job(api: AsyncClient, slurm_cluster: Any) -> None:
    """Liveness concludes nothing while squeue cannot be asked: the job runs on and ends
    `completed` (psik records it from the node, controller or not)."""
    job = await api.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 4"})
    assert job.native_id is not None
    await until(lambda: squeue_state(job.native_id or "") == "RUNNING", 30, "the job to run")
    slurm_cluster.stop("slurmctld")
    try:
        await anyio.sleep(6 * LIVENESS)
        assert (await api.state(job.jobid)).state is not JobState.failed
    finally:
        slurm_cluster.start("slurmctld")
    done = await api.wait(job.jobid, timeout=60, poll_interval=0.1)
    assert done.state is JobState.completed, done.history


async def test_a_cancel_the_controller_cannot_take_is_503_and_changes_nothing(
    api: AsyncClient, slurm_cluster: Any
) -> None:
    """psik's cancel records `canceled` and only logs a failed scancel: with the
    controller down the job was said to be canceled, and Slurm ran it all the same once
    the controller was back (hostile test A1)."""
    job = await api.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 60"})
    assert job.native_id is not None
    await until(lambda: squeue_state(job.native_id or "") == "RUNNING", 30, "the job to run")
    slurm_cluster.stop("slurmctld")
    try:
        with pytest.raises(ServiceUnavailableError) as err:
            await api.cancel(job.jobid)
        assert "may still run" in (err.value.problem.detail or "")
        assert (await api.state(job.jobid)).state is JobState.active
    finally:
        slurm_cluster.start("slurmctld")
    canceled = await api.cancel(job.jobid)
    assert canceled.state is JobState.canceled
    await until(lambda: squeue_state(job.native_id or "") in ("CANCELLED", None), 30, "Slurm to end the job")


def _sbatch_unrecorded(base: Path, jobndx: int) -> str:
    """What a server killed during sbatch leaves: psik's batch script for run ``jobndx``
    of the job ``base`` submitted (held, so it waits), and no `queued` row naming it."""
    from psik.backends.slurm import slurm_script

    script = slurm_script % {"psik_python": sys.executable, "base": base, "jobndx": jobndx}
    done = subprocess.run(
        ["sbatch", "--parsable", "--hold", "--partition", "debug"],
        input=script,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip().split(";")[0]


async def test_a_slurm_job_submitted_by_a_server_that_died_is_adopted_at_start_up(tmp_path: Path) -> None:
    """The `queued` row, the only record of a run's Slurm job, is written after sbatch
    returns: a server killed in between left the job `new`, a second start ran it twice,
    and a cancel left the first Slurm job running (hostile test A6). At start-up the
    server now finds Slurm jobs by their console path, gives each job its own back and
    cancels any extra."""
    settings = slurm_settings(tmp_path)
    app = create_app(settings)
    async with (
        LifespanManager(app),
        AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app), timeout=120) as client,
    ):
        job = await client.create({"backend": "slurm", "script": "#!/bin/bash\nsleep 1"})
    base = settings.prefix / job.jobid
    first = _sbatch_unrecorded(base, 1)
    second = _sbatch_unrecorded(base, 1)  # a retry that died as well
    try:
        await _restart_and_check(settings, job.jobid, first, second)
    finally:  # held jobs would wait for ever
        subprocess.run(["scancel", first, second], capture_output=True, timeout=30, check=False)


async def _restart_and_check(settings: Settings, jobid: str, first: str, second: str) -> None:
    assert squeue_state(first) == squeue_state(second) == "PENDING"

    app = create_app(settings)  # the restart
    async with (
        LifespanManager(app),
        AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app), timeout=120) as client,
    ):
        adopted = await client.get(jobid)
        assert (adopted.state, adopted.jobndx, adopted.native_id) == (JobState.queued, 1, first)
        await until(lambda: squeue_state(second) in (None, "CANCELLED"), 30, "the extra Slurm job to end")
        with pytest.raises(ConflictError, match="is queued"):
            await client.start(jobid)  # not a second run of run 1
        canceled = await client.cancel(jobid)
        assert canceled.state is JobState.canceled
        await until(lambda: squeue_state(first) in (None, "CANCELLED"), 30, "the adopted Slurm job to end")


# ---- accounting (slurmdbd): the harness runs it; MinJobAge is 5 s ----


def sacct(native_id: str) -> str:
    """``State|ExitCode`` per sacct ("" while accounting has no record of the job)."""
    return slurm("sacct", "-n", "-X", "-P", "-j", native_id, "-o", "State,ExitCode").strip()


def kill_batch_step(native_id: str) -> None:
    """SIGKILL every process of the job's batch step (this machine is its node)."""
    out = slurm("scontrol", "listpids", native_id)
    rows = [line.split() for line in out.splitlines()[1:]]
    pids = [int(r[0]) for r in rows if len(r) >= 3 and r[2] == "batch"]
    assert pids, out
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_sacct_answers_for_a_finished_job(api: AsyncClient) -> None:
    job = await api.submit({"backend": "slurm", "script": "#!/bin/bash\necho accounted"})
    assert job.native_id is not None
    done = await api.wait(job.jobid, timeout=60)
    assert done.state is JobState.completed, done.history
    await until(lambda: sacct(job.native_id or "") == "COMPLETED|0:0", 30, "sacct to say COMPLETED")
    # ... also once squeue has forgotten it (MinJobAge after its end).
    await until(lambda: squeue_state(job.native_id or "") is None, 60, "squeue to forget the job")
    assert sacct(job.native_id) == "COMPLETED|0:0"


async def test_a_job_that_ended_unrecorded_while_the_server_was_down_is_failed_from_accounting(
    tmp_path: Path,
) -> None:
    """The job's processes SIGKILLed on the compute node (as the OOM killer does: psik's
    batch script records no end row) while no server runs; by the time one starts again
    squeue has forgotten the job. Its end is not lost: the server asks sacct, and fails
    the job with Slurm's state and exit code."""
    settings = slurm_settings(tmp_path)
    app = create_app(settings)
    async with (
        LifespanManager(app),
        AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app), timeout=120) as client,
    ):
        job = await client.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 300"})
        assert job.native_id is not None
        nid = job.native_id

        async def active() -> bool:
            return (await client.state(job.jobid)).state is JobState.active

        deadline = time.monotonic() + 30
        while not await active():
            assert time.monotonic() < deadline, "the job never became active"
            await anyio.sleep(0.1)
    # The server is down.
    # (scancel --signal=KILL would be a cancel: CANCELLED, as in the scancel test above)
    kill_batch_step(nid)
    await until(lambda: squeue_state(nid) is None, 60, "squeue to forget the job")
    await until(lambda: sacct(nid).startswith("FAILED|"), 30, "sacct to record the job's end")
    history = (settings.prefix / job.jobid / "status.csv").read_text()
    assert ",completed," not in history and ",failed," not in history  # psik recorded no end

    app = create_app(settings)  # the server is back
    async with (
        LifespanManager(app),
        AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app), timeout=120) as client,
    ):
        done = await client.wait(job.jobid, timeout=LIVENESS_BOUND + 30, poll_interval=0.1)
    assert done.state is JobState.failed, done.history
    reason = done.history[-1].info
    assert f"Slurm job {nid} ended FAILED, exit code 0:9 (from accounting" in reason, reason


# ---- what a job or sbatch could make the server lose track of (issue 14) ----


async def test_an_sbatch_answer_that_is_no_job_id_leaves_no_slurm_job_running(
    api: AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-Qo`` once silenced ``--parsable``: the API answered 502 "not submitted" while
    Slurm ran a job nobody tracked. An sbatch that submits yet answers no job id (here a
    wrapper first on PATH) now has that Slurm job, found by its console, cancelled."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True, check=True).stdout.strip()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\n{real} --quiet "$@" >/dev/null || exit $?\necho all went fine\n'
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(SubmitFailedError, match="not a job id") as info:
        await api.submit({"backend": "slurm", "script": "#!/bin/bash\nsleep 300"})
    assert "was cancelled" in str(info.value)
    assert info.value.jobid is not None
    console = str(tmp_path / "jobs" / info.value.jobid / "log" / "console")
    listed = slurm("squeue", "-h", "--states=all", "-O", "JobID:40,State:20,StdOut:4096").splitlines()
    mine = [line.split() for line in listed if line.split()[-1:] == [console]]
    assert mine, listed  # it was submitted...
    for nid, _, _ in mine:  # ...and is ended
        await until(lambda nid=nid: squeue_state(nid) in (None, "CANCELLED"), 10, f"Slurm to end {nid}")


async def test_a_job_that_records_its_own_completed_row_is_still_cancelled(
    api: AsyncClient, tmp_path: Path
) -> None:
    """A Slurm job can append ``completed`` to its own status.csv and go on running: cancel
    answered 200 ``completed`` without scancel and the allocation stayed held. Slurm's view
    (still RUNNING) is trusted over that row: cancel scancels it and records ``canceled``."""
    job = await api.submit(
        {
            "backend": "slurm",
            "script": '#!/bin/bash\necho "$(date +%s.%N),1,completed," >> ../status.csv\nsleep 300',
        }
    )
    assert job.native_id is not None
    try:

        async def says_completed() -> bool:
            return (await api.state(job.jobid)).state is JobState.completed

        deadline = time.monotonic() + 30
        while not await says_completed():
            assert time.monotonic() < deadline, "the job never wrote its row"
            await anyio.sleep(0.1)
        assert squeue_state(job.native_id) == "RUNNING"
        canceled = await api.cancel(job.jobid)
        assert canceled.state is JobState.canceled
        assert "still ran after the job recorded completed" in canceled.history[-1].info
        await until(lambda: squeue_state(job.native_id or "") in (None, "CANCELLED"), 10, "Slurm to end it")
        assert (await api.cancel(job.jobid)).state is JobState.canceled  # idempotent
    finally:
        subprocess.run(["scancel", job.native_id], capture_output=True, timeout=30, check=False)


async def test_slurm_s_end_overrules_a_completed_the_job_wrote_while_it_still_ran(api: AsyncClient) -> None:
    """Liveness follows a job whose own row says ``completed`` while Slurm still runs it,
    and once Slurm ends it otherwise (here: ``scancel`` outside psik-api) records what
    Slurm said, overruling the job's row (see backends/slurm/liveness.py)."""
    script = '#!/bin/bash\nsleep 2\necho "$(date +%s.%N),1,completed," >> ../status.csv\nsleep 300'
    job = await api.submit({"backend": "slurm", "script": script})
    assert job.native_id is not None
    try:
        said = await api.wait(job.jobid, timeout=30, poll_interval=0.1)
        assert said.state is JobState.completed  # the index mirrors the row the job wrote
        assert squeue_state(job.native_id) == "RUNNING"
        await anyio.sleep(2 * LIVENESS)
        assert (await api.get(job.jobid)).state is JobState.completed  # still running: followed
        slurm("scancel", job.native_id)
        t0 = time.monotonic()

        async def failed() -> bool:
            return (await api.state(job.jobid)).state is JobState.failed

        while not await failed():
            assert time.monotonic() - t0 < LIVENESS_BOUND, "Slurm's end was not recorded"
            await anyio.sleep(0.1)
        info = (await api.get(job.jobid)).history[-1].info
        assert info.startswith(f"{OVERRULED_INFO}: the job recorded completed, but Slurm job {job.native_id}")
        assert "ended CANCELLED" in info
    finally:
        subprocess.run(["scancel", job.native_id], capture_output=True, timeout=30, check=False)
