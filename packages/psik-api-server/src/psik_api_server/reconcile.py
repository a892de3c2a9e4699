"""Bringing the index in line with the job directories, at every start.

The job directories are the source of truth; the index (:class:`JobStore`) only makes
lists cheap and remembers owners. :func:`reconcile` imports jobs made elsewhere (the
psik command line), drops rows whose directory is gone, and refreshes the state of every
non-final job. It reads only new and non-final jobs, never the whole prefix's files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import jobdir
from .store import JobRow, JobStore

_logger = logging.getLogger(__name__)


def index_row(files: jobdir.JobFiles, owner: str) -> JobRow:
    """The index row of the job ``files`` describe, owned by ``owner``."""
    state, jobndx = files.state
    return JobRow(
        jobid=files.jobid,
        backend=files.spec.backend,
        owner=owner,
        name=files.spec.name,
        state=state,
        jobndx=jobndx,
        created=files.created,
        updated=files.updated,
    )


@dataclass
class Reconciled:
    """What :func:`reconcile` did, and the jobs to follow from now on."""

    imported: int = 0
    removed: int = 0
    refreshed: int = 0
    #: Non-final jobs: ``(jobid, status.csv)`` for the watcher.
    live: list[tuple[str, Path]] = field(default_factory=list)


def reconcile(store: JobStore, prefix: Path, import_owner: str) -> Reconciled:
    """Bring ``store`` in line with the job directories under ``prefix``; jobs found
    only on disk are imported as ``import_owner``'s. Blocking: run it in a worker thread."""
    done = Reconciled()
    on_disk = jobdir.list_jobids(prefix)
    indexed = store.jobids()
    for jobid in indexed - on_disk:
        store.delete(jobid)
        done.removed += 1
    for jobid in sorted(on_disk - indexed):
        try:
            files = jobdir.read_job(jobdir.job_path(prefix, jobid))
        except (OSError, ValueError) as e:
            _logger.warning("not importing %s: %s", jobid, e)
            continue
        store.put(index_row(files, import_owner))
        done.imported += 1
    for row in store.live():
        path = jobdir.job_path(prefix, row.jobid)
        try:
            files = jobdir.read_job(path)
        except (OSError, ValueError) as e:
            _logger.warning("cannot read live job %s: %s", row.jobid, e)
            continue
        state, jobndx = files.state
        if store.set_state(row.jobid, state, jobndx, files.updated):
            done.refreshed += 1
        if not state.is_final:
            done.live.append((row.jobid, path / "status.csv"))
    return done
