"""The executor: each Snakemake job becomes a psik-api job running the job's own
``snakemake`` command in the workflow's directory.

Requests, per run: one to learn the backend's type at start; one per batch of jobs
Snakemake hands over at once (``POST /v1/groups``; a lone job ``POST /v1/jobs``); one
per status cycle for the whole run (``GET /v1/jobs?label=snakemake-run=<id>&id=...``,
for up to 1,000 active jobs); one per failed job (its logs), and on Ctrl-C one list of
the run's unfinished jobs and one cancel for each.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from snakemake_interface_common.exceptions import WorkflowError

# The executor interface ships no py.typed: its names are Any to mypy.
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo  # type: ignore[import-untyped]
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor  # type: ignore[import-untyped]
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface  # type: ignore[import-untyped]

from psik_api_client import (
    APIConnectionError,
    Client,
    JobSpec,
    JobState,
    JobSummary,
    NotFoundError,
    PsikApiError,
    SubmitFailedError,
    UnprocessableEntityError,
)
from psik_api_core import LIMITS

from .failures import failure_message
from .resources import ResourceMapper
from .settings import ExecutorSettings

#: The label every job of one run carries: its status is one filtered list.
RUN_LABEL = "snakemake-run"

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive pieces of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def make_client(settings: ExecutorSettings) -> Client:
    """A client of the server the settings name (the client's own defaults for what
    they leave out). A setting the client cannot use is a :class:`WorkflowError`
    naming it (the client's ``ValueError`` would end the run in a traceback)."""
    if settings.url is not None:
        try:
            parts = urlsplit(settings.url)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # e.g. an unclosed [IPv6 address
            usable = False
        if not usable:
            raise WorkflowError(
                f"--psik-api-url: the server's URL is http:// or https:// with a host, not {settings.url!r}"
            )
    cert_dir = None if settings.cert_dir is None else Path(settings.cert_dir).expanduser()
    if cert_dir is not None and not cert_dir.is_dir():
        raise WorkflowError(
            f"--psik-api-cert-dir: no such directory: {cert_dir} "
            "(a certified identity: `certified init --config DIR`)"
        )
    token = os.environ.get(settings.token_env) or None
    try:
        return Client(
            settings.url,
            uds=None if settings.uds is None else Path(settings.uds).expanduser(),
            cert_dir=cert_dir,
            token=token,
        )
    except ValueError as e:
        # The client names its arguments; the user gave settings and variables.
        why = str(e).replace("token=", f"${settings.token_env}").replace("cert_dir=", "--psik-api-cert-dir")
        raise WorkflowError(f"psik-api: {why} (check {', '.join(settings_in_play(settings))})") from None


def settings_in_play(settings: ExecutorSettings) -> list[str]:
    """The settings (and environment variables in their place) that choose the server
    and how the client reaches it: where a client's complaint comes from."""
    named = [
        flag
        for flag, value in (
            ("--psik-api-url", settings.url),
            ("--psik-api-uds", settings.uds),
            ("--psik-api-cert-dir", settings.cert_dir),
        )
        if value is not None
    ]
    if settings.url is None and settings.uds is None:
        named += ["$PSIK_API_UDS", "$PSIK_API_URL"]
    if settings.cert_dir is None:
        named.append("$PSIK_API_CERTIFIED")
    if os.environ.get(settings.token_env):
        named.append(f"${settings.token_env} (--psik-api-token-env)")
    return named


def where(api: Client) -> str:
    """The server as the user named it: its URL, or its UNIX socket."""
    return f"unix socket {api.uds}" if api.uds else api.base_url


def directory_refused(error: UnprocessableEntityError) -> bool:
    """Whether the server refused the job's ``directory`` (its ``directory_roots``)."""
    return any("directory" in e.get("loc", ()) for e in _errors(error)) or "directory " in str(error)


def _errors(error: UnprocessableEntityError) -> list[dict[str, Any]]:
    problem = error.problem
    if problem is None or problem.errors is None:
        return []
    return [e.model_dump() for e in problem.errors]


class Executor(RemoteExecutor):  # type: ignore[misc]
    """Runs a workflow's jobs through a psik-api server (``--executor psik-api``)."""

    def __post_init__(self) -> None:
        settings: ExecutorSettings = self.workflow.executor_settings
        self.settings = settings
        self.run_id = uuid.uuid4().hex
        self.labels = {RUN_LABEL: self.run_id}
        self.directory = str(Path(self.workflow.workdir_init).resolve())
        # One client per thread that talks: Snakemake submits from its scheduler's
        # thread and checks status from its own; a cancel gets a fresh one.
        self.api = make_client(settings)
        self.status_api = make_client(settings)
        try:
            backend = self.api.backend(settings.backend)
        except NotFoundError:
            names = ", ".join(b.name for b in self.api.backends()) or "none"
            raise WorkflowError(
                f"the psik-api server at {where(self.api)} has no backend {settings.backend!r} "
                f"(it has: {names}); choose one with --psik-api-backend"
            ) from None
        except APIConnectionError as e:
            raise WorkflowError(
                f"cannot reach the psik-api server at {where(self.api)}: {e} "
                "(start it, or say where it is with --psik-api-url or --psik-api-uds)"
            ) from None
        except PsikApiError as e:
            raise WorkflowError(f"psik-api server at {where(self.api)}: {e}") from None
        self.mapper = ResourceMapper(backend.type)
        self._reported_unmapped: set[str] = set()
        self.logger.info(
            f"psik-api: jobs go to backend {backend.name!r} ({backend.type}) of {where(self.api)}, "
            f"each labelled {RUN_LABEL}={self.run_id}, running in {self.directory}"
        )
        self._report_unmapped(self._declared_resources(), at_start=True)
        self.attributes = dict(settings.attributes or {})
        if self.attributes and not self.mapper.takes_attributes:
            self.logger.warning(
                f"psik-api: a {backend.type} backend takes no attributes: those of "
                f"--psik-api-attributes ({', '.join(sorted(self.attributes))}) are not passed on."
            )
            self.attributes = {}

    # ---- resources ----

    def _declared_resources(self) -> set[str]:
        """The resource names the workflow's rules give (with the defaults), to say
        at start which of them this backend type cannot take."""
        names: set[str] = set()
        for rule in getattr(self.workflow, "rules", ()):
            names.update(getattr(rule, "resources", None) or ())
        return names

    def _report_unmapped(self, names: Iterable[str], at_start: bool = False) -> None:
        """Say once per run which resources are not passed on (not once per job)."""
        new = [n for n in self.mapper.unmapped(names) if n not in self._reported_unmapped]
        if not new:
            return
        self._reported_unmapped.update(new)
        when = "" if at_start else " (first given by a job now running)"
        self.logger.warning(
            f"psik-api: a {self.mapper.backend_type} backend has no place for the resource(s) "
            f"{', '.join(new)}{when}: they are not passed on. It takes threads, "
            f"{', '.join(self.mapper.mapped_names())}."
        )

    def job_spec(self, job: JobExecutorInterface) -> JobSpec:
        """The JobSpec that runs ``job``: its ``snakemake`` command in the workflow's
        directory, its resources mapped, labelled with the run, the rule and its id."""
        mapped = self.mapper.map(job.threads, dict(job.resources.items()))
        self._report_unmapped(mapped.unmapped)
        return JobSpec(
            name=f"smk-{job.name}-{job.jobid}"[: LIMITS.max_job_name],
            directory=self.directory,
            script="#!/bin/sh\n" + self.format_job_exec(job) + "\n",
            environment=dict(self.envvars()),
            resources=mapped.resources,
            backend=self.settings.backend,
            attributes={**self.attributes, **mapped.attributes},
            labels={
                **self.labels,
                "snakemake-rule": str(job.name)[: LIMITS.max_label_value],
                "snakemake-jobid": str(job.jobid),
            },
        )

    # ---- submission ----

    def run_jobs(self, jobs: list[JobExecutorInterface]) -> None:
        """Submit the jobs Snakemake has ready with one request per 1,000 (a group)."""
        for job in jobs:
            self.run_job_pre(job)
        for batch in chunks(jobs, LIMITS.max_group_jobs):
            self._submit(batch)

    def run_job(self, job: JobExecutorInterface) -> None:
        """Submit one job (Snakemake calls :meth:`run_jobs`; this is the interface's)."""
        self._submit([job])

    def _submit(self, jobs: Sequence[JobExecutorInterface]) -> None:
        try:
            specs = [self.job_spec(job) for job in jobs]
            if len(specs) == 1:
                made: Sequence[JobSummary] = [self.api.submit(specs[0])]
            else:
                made = self.api.submit_many(specs).jobs
        except UnprocessableEntityError as e:
            if directory_refused(e):
                raise WorkflowError(self._directory_refused_message(e)) from None
            self._fail_all(jobs, f"psik-api refused the job: {e}")
            return
        except SubmitFailedError as e:
            # The job exists, failed: its backend did not take it.
            self._fail_all(jobs, f"psik-api job {e.jobid} was not submitted to its backend: {e}")
            return
        except PsikApiError as e:
            self._fail_all(jobs, f"psik-api could not submit the job: {e}")
            return
        for job, created in zip(jobs, made, strict=True):
            self.logger.info(f"Job {job.jobid} submitted as psik-api job {created.jobid}.")
            self.report_job_submission(SubmittedJobInfo(job, external_jobid=created.jobid))

    def _fail_all(self, jobs: Iterable[JobExecutorInterface], msg: str) -> None:
        for job in jobs:
            self.report_job_error(SubmittedJobInfo(job), msg=msg)

    def _directory_refused_message(self, error: UnprocessableEntityError) -> str:
        return (
            f"the psik-api server at {where(self.api)} does not run jobs in the workflow's "
            f"directory {self.directory}: {error}\n"
            "The plugin runs every job in the workflow's directory, which the server must "
            "allow: add it (or a directory above it) to the server's config file, e.g.\n"
            f'    "directory_roots": ["{self.directory}"]\n'
            "and restart the server (psik-api-server serve --config FILE)."
        )

    # ---- status ----

    async def check_active_jobs(
        self, active_jobs: list[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        """One request per cycle for the whole run (per 1,000 active jobs): the run's
        jobs among the active ones, in their current states."""
        if not active_jobs:
            return
        ids = [j.external_jobid for j in active_jobs if j.external_jobid is not None]
        states: dict[str, JobSummary] = {}
        try:
            for batch in chunks(ids, LIMITS.max_ids):
                async with self.status_rate_limiter:
                    page = self.status_api.list_page(label=self.labels, ids=batch, limit=len(batch))
                states.update((s.jobid, s) for s in page.items)
        except PsikApiError as e:
            self.logger.warning(f"psik-api: status check failed, trying again next cycle: {e}")
            for info in active_jobs:
                yield info
            return
        for info in active_jobs:
            summary = states.get(info.external_jobid or "")
            if summary is None:
                self.report_job_error(
                    info, msg=f"psik-api job {info.external_jobid} is gone from the server (purged?)."
                )
            elif summary.state == JobState.completed:
                self.report_job_success(info)
            elif summary.state.is_final:
                self.report_job_error(info, msg=self._failure(summary))
            else:
                yield info

    def _failure(self, summary: JobSummary) -> str:
        """The error message of a job that failed or was canceled, with its log tails."""
        reason = ""
        try:
            logs: dict[str, str] | None = self.status_api.logs(summary.jobid)
            if summary.state == JobState.canceled:  # who or what canceled it
                history = self.status_api.get(summary.jobid).history
                reason = history[-1].info if history else ""
        except PsikApiError:
            logs = None
        return failure_message(summary, logs, reason)

    # ---- cancel ----

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        """Cancel every unfinished job of the run (Ctrl-C): those Snakemake holds, and
        any the server lists under the run's label (a status cycle may hold some)."""
        ids = {j.external_jobid for j in active_jobs if j.external_jobid is not None}
        with make_client(self.settings) as api:
            try:
                pending = (JobState.new, JobState.queued, JobState.active)
                ids.update(s.jobid for s in api.list(label=self.labels, state=pending))
            except PsikApiError as e:
                self.logger.warning(f"psik-api: could not list the run's jobs to cancel them: {e}")
            for jobid in sorted(ids):
                try:
                    api.cancel(jobid)
                except PsikApiError as e:
                    self.logger.warning(f"psik-api: could not cancel job {jobid}: {e}")
        if ids:
            self.logger.info(f"psik-api: canceled {len(ids)} job(s) of run {self.run_id}.")

    def shutdown(self) -> None:
        """Stop the status thread, then close the clients."""
        super().shutdown()
        self.api.close()
        self.status_api.close()
