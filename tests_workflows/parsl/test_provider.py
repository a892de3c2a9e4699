"""PsikApiProvider as Parsl checks its own providers (parsl/tests/test_providers/
test_local_provider.py: ``/bin/true``, ``/bin/false``, ``echo -n magic`` to a final state,
with exit codes, stdout and stderr), and what it promises beyond: ``status`` of many
blocks is one request, none once they ended; a cancelled block is CANCELLED; a refused
spec is Parsl's SubmitException, a bad walltime refused naming it; the client imports
without Parsl, and the provider says which extra to install."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from parsl.jobs.states import JobState, JobStatus
from parsl.launchers import SingleNodeLauncher
from parsl.providers.base import ExecutionProvider
from parsl.providers.errors import SubmitException

from psik_api_client import Client
from psik_api_client.parsl import LABEL, PsikApiProvider


def provider(url: str, **kwargs: object) -> PsikApiProvider:
    return PsikApiProvider(url, launcher=SingleNodeLauncher(debug=False), **kwargs)  # type: ignore[arg-type]


def run(p: PsikApiProvider, command: str, np: int = 1) -> JobStatus:
    return wait(p, p.submit(command, np))


def wait(p: ExecutionProvider, job_id: object, timeout: float = 60) -> JobStatus:
    deadline = time.monotonic() + timeout
    status = p.status([job_id])[0]
    while not status.terminal:
        assert time.monotonic() < deadline, f"block {job_id} still {status} after {timeout} s"
        time.sleep(0.1)
        status = p.status([job_id])[0]
    return status


def test_parsl_provider_checks(local_url: str, tmp_path: Path) -> None:
    """The body of Parsl's own _run_tests, on this provider."""
    p = provider(local_url)
    p.script_dir = str(tmp_path)  # as Parsl's test sets it (Parsl's DFK sets it too)
    assert isinstance(p, ExecutionProvider)

    status = run(p, "/bin/true")
    assert status.message is None
    assert status.state == JobState.COMPLETED
    assert status.exit_code == 0
    assert status.stdout == ""
    assert status.stderr == ""

    status = run(p, "/bin/true", np=2)
    assert status.message is None
    assert status.state == JobState.COMPLETED
    assert status.exit_code == 0
    assert status.stdout == ""
    assert status.stderr == ""

    status = run(p, "/bin/false")
    assert status.state == JobState.FAILED
    assert status.exit_code != 0
    assert status.stdout == ""
    assert status.stderr == ""

    status = run(p, "/bin/false", np=2)
    assert status.state == JobState.FAILED
    assert status.exit_code != 0
    assert status.stdout == ""
    assert status.stderr == ""

    status = run(p, "/bin/echo -n magic")
    assert status.state == JobState.COMPLETED
    assert status.exit_code == 0
    assert status.stdout == "magic"
    assert status.stderr == ""

    status = run(p, "/bin/echo -n magic 1>&2")
    assert status.state == JobState.COMPLETED
    assert status.exit_code == 0
    assert status.stdout == ""
    assert status.stderr == "magic"
    # The logs were fetched into the script directory, where Parsl keeps a run's.
    assert status.stderr_path is not None and Path(status.stderr_path).parent == tmp_path


def test_exit_code_and_logs_without_script_dir(local_url: str) -> None:
    """Used on its own (no DFK to set script_dir), the logs land in a directory of the
    provider's own; a failure carries its exit code and says which job."""
    p = provider(local_url)
    status = run(p, "echo out; echo err >&2; exit 3")
    assert status.state == JobState.FAILED
    assert status.exit_code == 3
    assert status.stdout == "out\n"
    assert status.stderr == "err\n"
    assert status.stderr_summary == "err\n"
    assert status.message is not None and "exit code 3" in status.message
    p.close()


def test_status_of_many_blocks_is_one_request(local_url: str, counting_transport: Any) -> None:
    counter = counting_transport
    p = provider(local_url, transport=counter)
    blocks = [p.submit("sleep 60", 1, f"parsl.test.block-{i}") for i in range(5)]
    assert counter.requests == [("POST", "/v1/jobs")] * 5

    counter.requests.clear()
    statuses = p.status(blocks)
    assert counter.requests == [("GET", "/v1/jobs")]
    assert [s.state in {JobState.PENDING, JobState.RUNNING} for s in statuses] == [True] * 5

    # The blocks carry the provider's label: a run's jobs are found by it.
    with Client(local_url) as api:
        labelled = {j.jobid for j in api.list(label={LABEL: p.instance_id})}
    assert labelled == set(blocks)

    counter.requests.clear()
    assert p.cancel(blocks) == [True] * 5
    assert len(counter.requests) == 5  # one per block
    assert [wait(p, b).state for b in blocks] == [JobState.CANCELLED] * 5

    # Ended blocks are never asked for again.
    counter.requests.clear()
    assert [s.state for s in p.status(blocks)] == [JobState.CANCELLED] * 5
    assert counter.requests == []
    p.close()


def test_spec_template_reaches_the_job(local_url: str) -> None:
    """The JobSpec template's fields reach each block's job; walltime and
    nodes_per_block are written into its resources."""
    p = provider(
        local_url,
        spec={"environment": {"GREETING": "hello"}, "labels": {"run": "r1"}},
        walltime="00:02:30",
        nodes_per_block=1,
    )
    status = run(p, 'echo -n "$GREETING $JOBNAME"')
    assert status.stdout == "hello parsl.psik-api"
    with Client(local_url) as api:
        (job,) = api.list(label={"run": "r1"})
        full = api.get(job.jobid)
    assert full.spec.resources.duration == 3
    assert full.spec.resources.node_count == 1
    assert full.labels == {"run": "r1", LABEL: p.instance_id}
    p.close()


def test_refusals(local_url: str) -> None:
    """A spec the server refuses is Parsl's SubmitException, saying why; a field no
    JobSpec has is refused when the provider is built, not dropped."""
    p = provider(local_url, backend="nosuchbackend")
    with pytest.raises(SubmitException) as caught:
        p.submit("/bin/true", 1, "parsl.test.refused")
    assert caught.value.job_name == "parsl.test.refused"
    assert "nosuchbackend" in caught.value.message
    with pytest.raises(Exception, match="walltime"):
        provider(local_url, spec={"walltime": "01:00:00"})
    p.close()


@pytest.mark.parametrize("walltime", ["1:00", "1-00:00:00", "abc", "01:00", ":10:00", "1:-1:00"])
def test_a_walltime_not_hh_mm_ss_is_refused_naming_it(walltime: str) -> None:
    """As Parsl's providers take it; Slurm's other forms ("1-00:00:00") are refused when
    the provider is built, saying which setting and what form, not deep in a submit."""
    with pytest.raises(ValueError, match=r'walltime: give hours, minutes and seconds as "HH:MM:SS"'):
        PsikApiProvider("http://127.0.0.1:9", walltime=walltime)


@pytest.mark.parametrize(("walltime", "minutes"), [("00:00:00", 1), ("0:01:01", 2), ("48:00:00", 2880)])
def test_a_walltime_is_whole_minutes_rounded_up(walltime: str, minutes: int) -> None:
    p = PsikApiProvider("http://127.0.0.1:9", walltime=walltime)
    assert p.spec.resources.duration == minutes


def test_unreachable_server_keeps_the_last_status(local_url: str) -> None:
    p = provider(local_url)
    job_id = p.submit("sleep 60", 1)
    before = p.status([job_id])[0].state
    p.url = "http://127.0.0.1:9"  # nothing listens on the discard port
    p.max_retries = 0
    p.close()  # the next request makes a client for the new url
    assert p.status([job_id])[0].state == before
    p.url = local_url
    p.close()
    assert p.cancel([job_id]) == [True]
    assert wait(p, job_id).state == JobState.CANCELLED
    p.close()


def test_client_imports_without_parsl() -> None:
    """parsl is an optional extra: the client and its command line import without it."""
    code = (
        "import sys; sys.modules['parsl'] = None\n"
        "import psik_api_client, psik_api_client.cli\n"
        "try:\n    import psik_api_client.parsl\nexcept ImportError as e:\n    print('refused:', e)\n"
    )
    code += "    print('because:', repr(e.__cause__))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("refused:")
    # What to do, and the original error chained.
    assert "pip install 'psik-api-client[parsl]'" in out, out
    assert "because: ModuleNotFoundError(" in out and "'parsl'" in out, out
