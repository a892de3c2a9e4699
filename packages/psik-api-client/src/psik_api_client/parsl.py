"""A Parsl execution provider whose blocks are psik-api jobs.

::

    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from psik_api_client.parsl import PsikApiProvider

    config = Config(executors=[HighThroughputExecutor(
        provider=PsikApiProvider(url="https://hpc.example.org:8000", backend="slurm",
                                 spec={"resources": {"duration": 60}},
                                 worker_init="source ~/venv/bin/activate"),
    )])

Each block Parsl asks for is one job (``POST /v1/jobs``) running the launcher's script
on the server's ``backend``; :meth:`PsikApiProvider.status` asks for every block still
running with one request (``GET /v1/jobs?id=...``), and a block's stdout and stderr
are fetched only when Parsl reads them (once a block has ended).

Needs the ``parsl`` extra (``pip install 'psik-api-client[parsl]'``); the rest of the
client imports without Parsl.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

try:
    from parsl.jobs.states import JobState as ParslState
    from parsl.jobs.states import JobStatus as ParslStatus
    from parsl.launchers import SingleNodeLauncher
    from parsl.launchers.base import Launcher
    from parsl.providers.base import ExecutionProvider
    from parsl.providers.errors import SubmitException
    from parsl.utils import RepresentationMixin
except ImportError as e:  # the optional extra: say how to get it, not only what is missing
    raise ImportError(f"psik_api_client.parsl needs Parsl: pip install 'psik-api-client[parsl]' ({e})") from e

from psik_api_core import JobSpec, JobState, JobSummary
from psik_api_core.limits import LIMITS

from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._client import Client
from ._exceptions import NotFoundError, PsikApiError
from ._types import TimeoutArg

__all__ = ["PsikApiProvider"]

logger = logging.getLogger(__name__)

#: Our states as Parsl names them. ``new`` is a job created and not yet submitted.
STATES: Mapping[JobState, ParslState] = {
    JobState.new: ParslState.PENDING,
    JobState.queued: ParslState.PENDING,
    JobState.active: ParslState.RUNNING,
    JobState.completed: ParslState.COMPLETED,
    JobState.failed: ParslState.FAILED,
    JobState.canceled: ParslState.CANCELLED,
}

#: The label every block carries, with the provider instance's own value: the jobs of
#: one Parsl run are found by it (``psik-api ls --label parsl-provider=...``).
LABEL = "parsl-provider"


class _Logs:
    """Where a provider puts the stdout and stderr of ended blocks, fetched on demand."""

    def __init__(self, provider: PsikApiProvider) -> None:
        self._provider = provider
        self._lock = threading.Lock()
        self._fetched: dict[tuple[str, str], str | None] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _directory(self) -> str:
        # Parsl sets script_dir (the run's submit_scripts/) when the executor starts; a
        # provider used on its own keeps them in a directory removed with the provider.
        if self._provider.script_dir is not None:
            return self._provider.script_dir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="psik-api-parsl-")
        return self._tmp.name

    def path(self, jobid: str, stream: str) -> str | None:
        """A local file holding the block's ``stream`` (``stdout`` or ``stderr``), read
        from the server once; None if the job never wrote it."""
        with self._lock:
            if (jobid, stream) not in self._fetched:
                try:
                    data: bytes | None = self._provider.client.read_log(jobid, stream)
                except NotFoundError:
                    data = None
                except PsikApiError as e:
                    logger.warning("psik-api job %s: cannot read its %s: %s", jobid, stream, e)
                    return None  # not remembered: asked again next time
                path = None
                if data is not None:
                    path = os.path.join(self._directory(), f"{jobid}.{stream}")
                    with open(path, "wb") as f:
                        f.write(data)
                self._fetched[jobid, stream] = path
            return self._fetched[jobid, stream]


class _BlockStatus(ParslStatus):
    """A block's status; once it ended, ``stdout_path`` and ``stderr_path`` are local
    copies of its logs, fetched from the server when first read (Parsl reads them only
    for the blocks whose failure it reports)."""

    def __init__(
        self, state: ParslState, *, jobid: str, logs: _Logs, message: str | None = None, exit_code: int | None
    ) -> None:
        self._jobid = jobid
        self._logs: _Logs | None = logs if state in (ParslState.COMPLETED, ParslState.FAILED) else None
        self._paths: dict[str, str | None] = {}
        super().__init__(state, message=message, exit_code=exit_code)

    def _path(self, stream: str) -> str | None:
        if stream in self._paths:
            return self._paths[stream]
        return None if self._logs is None else self._logs.path(self._jobid, stream)

    # Parsl's JobStatus has plain attributes here; these read the log on demand.
    @property
    def stdout_path(self) -> str | None:
        return self._path("stdout")

    @stdout_path.setter
    def stdout_path(self, value: str | None) -> None:
        if value is not None:  # JobStatus.__init__ sets None: leave it to the fetch
            self._paths["stdout"] = value

    @property
    def stderr_path(self) -> str | None:
        return self._path("stderr")

    @stderr_path.setter
    def stderr_path(self, value: str | None) -> None:
        if value is not None:
            self._paths["stderr"] = value


class PsikApiProvider(ExecutionProvider, RepresentationMixin):
    """Parsl blocks as psik-api jobs: ``HighThroughputExecutor(provider=PsikApiProvider(...))``.

    The server is ``url`` (else ``$PSIK_API_UDS``, ``$PSIK_API_URL`` or
    ``http://127.0.0.1:8000``, as for :class:`~psik_api_client.Client`), reached with
    ``uds``, ``cert_dir`` and ``token`` as the client takes them; ``timeout`` and
    ``max_retries`` bound each request.

    ``spec`` is the JobSpec of every block, without its script (a :class:`JobSpec`, whose
    ``script`` is replaced, or a dict of its fields): its ``resources`` (``duration``,
    the walltime in minutes; ``node_count``; ``cpu_cores_per_process``...), ``attributes``
    (the backend's own options: for Slurm, sbatch's, ``{"--partition": "debug",
    "--account": "p1"}``), ``environment``, ``directory``, ``labels``.
    ``backend`` (else the spec's, else ``default``) is the server's backend to run on;
    ``walltime`` (``"HH:MM:SS"``), if given, replaces the spec's duration, rounded up to
    whole minutes; ``nodes_per_block`` (else the spec's ``node_count``, else 1) is written
    to ``node_count``.

    Each block runs ``worker_init`` and then the ``launcher``'s wrapping of Parsl's
    command (``SingleNodeLauncher`` by default, as for Parsl's own providers; an
    ``SrunLauncher`` for blocks of several Slurm nodes) under ``/bin/bash``. Every block
    is labelled ``parsl-provider=<this provider's id>`` (``instance_id``).

    ``status`` costs one request however many blocks are running (none once all ended);
    ``cancel``, one request per block.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        uds: str | None = None,
        cert_dir: str | None = None,
        token: str | None = None,
        backend: str | None = None,
        spec: JobSpec | Mapping[str, Any] | None = None,
        walltime: str | None = None,
        nodes_per_block: int | None = None,
        init_blocks: int = 1,
        min_blocks: int = 0,
        max_blocks: int = 1,
        parallelism: float = 1,
        launcher: Launcher | None = None,
        worker_init: str = "",
        label: str = "psik-api",
        status_polling_interval: int = 5,
        timeout: TimeoutArg = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.uds = uds
        self.cert_dir = cert_dir
        # Not an attribute of its own name: Parsl logs its config's repr, which must not
        # show the token (RepresentationMixin then prints "<unrecorded>").
        self._token = token
        self.timeout = timeout
        self.max_retries = max_retries
        self.transport = transport

        # A dict is checked as the server checks a spec (an unknown field is refused, not
        # dropped); its script, if any, is replaced by each block's.
        template = (
            spec if isinstance(spec, JobSpec) else JobSpec.validate_input({"script": "true", **(spec or {})})
        )
        resources = template.resources.model_copy()
        if walltime is not None:
            resources.duration = _minutes(walltime)
        if nodes_per_block is None:
            nodes_per_block = resources.node_count or 1
        resources.node_count = nodes_per_block
        self.backend = backend if backend is not None else template.backend
        self.spec = template.model_copy(update={"resources": resources, "backend": self.backend})
        self.walltime = walltime

        self.nodes_per_block = nodes_per_block
        self.init_blocks = init_blocks
        self.min_blocks = min_blocks
        self.max_blocks = max_blocks
        self.parallelism = parallelism
        self.launcher = launcher if launcher is not None else SingleNodeLauncher()
        self.worker_init = worker_init
        self._label = label
        self._status_polling_interval = status_polling_interval
        self.script_dir: str | None = None
        self.cores_per_node: int | None = None
        self.mem_per_node: float | None = None
        #: Job id -> its last status; ended ones are never asked for again.
        self.resources: dict[object, Any] = {}
        #: The value of every block's ``parsl-provider`` label.
        self.instance_id = uuid.uuid4().hex
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._logs = _Logs(self)

    @property
    def client(self) -> Client:
        """The provider's client, made on first use (so a provider is cheap to build
        and Parsl may copy its config before any block starts)."""
        with self._client_lock:
            if self._client is None:
                self._client = Client(
                    self.url,
                    uds=self.uds,
                    cert_dir=self.cert_dir,
                    token=self._token,
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                    transport=self.transport,
                )
            return self._client

    def close(self) -> None:
        """Close the client's connections (Parsl never calls it: for direct users)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    @property
    def label(self) -> str:
        return self._label

    @property
    def status_polling_interval(self) -> int:
        return self._status_polling_interval

    def block_spec(self, command: str, tasks_per_node: int, job_name: str) -> JobSpec:
        """The JobSpec :meth:`submit` sends for Parsl's ``command``."""
        launched = self.launcher(command, tasks_per_node, self.nodes_per_block, self.script_dir or "")
        script = f"#!/bin/bash\n{self.worker_init}\nexport JOBNAME={job_name}\n{launched}"
        labels = {**self.spec.labels, LABEL: self.instance_id}
        return self.spec.model_copy(update={"name": job_name, "script": script, "labels": labels})

    def submit(self, command: str, tasks_per_node: int, job_name: str = "parsl.psik-api") -> str:
        """Run ``command`` (Parsl's worker pool, say) as one job; return its job id.
        Raises :class:`parsl.providers.errors.SubmitException` if the server or its
        backend refused it."""
        try:
            job = self.client.submit(self.block_spec(command, tasks_per_node, job_name))
        except PsikApiError as e:
            # parsl declares no types on this exception's __init__.
            raise SubmitException(job_name, f"psik-api refused the block: {e}") from e  # type: ignore[no-untyped-call]
        self.resources[job.jobid] = self._status_of(job.jobid, job)
        return job.jobid

    def status(self, job_ids: Sequence[object]) -> list[ParslStatus]:
        """The status of each of ``job_ids``, asking the server with one request for
        those not known to have ended. Unreachable, the server's last known answer is
        kept (a warning logged); a job it does not know (purged) is reported cancelled."""
        ids = [str(j) for j in job_ids]
        running = list(dict.fromkeys(j for j in ids if not self._known_final(j)))
        # One request for up to LIMITS.max_ids blocks: more than a Parsl run ever holds.
        for start in range(0, len(running), LIMITS.max_ids):
            chunk = running[start : start + LIMITS.max_ids]
            try:
                page = self.client.list_page(ids=chunk, limit=len(chunk))
            except PsikApiError as e:
                logger.warning("psik-api: status of %d block(s) unknown this time: %s", len(chunk), e)
                continue
            found = {job.jobid: job for job in page.items}
            for jobid in chunk:
                self.resources[jobid] = self._status_of(jobid, found.get(jobid))
        return [self.resources.get(j) or ParslStatus(ParslState.UNKNOWN) for j in ids]

    def _known_final(self, jobid: str) -> bool:
        status = self.resources.get(jobid)
        return isinstance(status, ParslStatus) and status.terminal

    def _status_of(self, jobid: str, job: JobSummary | None) -> ParslStatus:
        if job is None:
            return ParslStatus(ParslState.CANCELLED, message=f"psik-api has no job {jobid} (purged?)")
        state = STATES[job.state]
        message = None
        if job.state is JobState.failed:
            message = f"psik-api job {jobid} failed" + (
                f" with exit code {job.exit_code}" if job.exit_code is not None else ""
            )
        return _BlockStatus(state, jobid=jobid, logs=self._logs, message=message, exit_code=job.exit_code)

    def cancel(self, job_ids: Sequence[object]) -> list[bool]:
        """Cancel each job (one request each); True where the server cancelled it or it
        had already ended, False where the request failed (logged)."""
        done = []
        for job_id in job_ids:
            try:
                self.client.cancel(str(job_id))
            except PsikApiError as e:
                logger.warning("psik-api: cannot cancel block %s: %s", job_id, e)
                done.append(False)
            else:
                done.append(True)
        return done


#: A walltime as Parsl's providers take it (``parsl.utils.wtime_to_minutes``): hours,
#: minutes and seconds, each a whole number (hours past 24 included).
WALLTIME = re.compile(r"(\d+):(\d+):(\d+)")


def _minutes(walltime: str) -> int:
    """``"HH:MM:SS"`` as whole minutes, rounded up (at least 1). Raises ``ValueError``
    naming the setting for anything else (``"1:00"``, Slurm's ``"1-00:00:00"``)."""
    match = WALLTIME.fullmatch(walltime) if isinstance(walltime, str) else None
    if match is None:
        raise ValueError(
            f'walltime: give hours, minutes and seconds as "HH:MM:SS" (e.g. "01:30:00"), not {walltime!r}'
        )
    hours, minutes, seconds = (int(part) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    return max(1, -(-total // 60))
