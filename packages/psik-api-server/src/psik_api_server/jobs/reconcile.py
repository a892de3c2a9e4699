"""Bringing the index in line with the job directories, at every start.

The job directories are the source of truth; the index (:class:`JobStore`) only makes
lists cheap and remembers owners. :func:`reconcile` imports jobs made elsewhere (the
psik command line), drops rows whose directory is gone, and refreshes the state of every
non-final job. It reads only new and non-final jobs, never the whole prefix's files
(and, once, the failed jobs of an index made before it kept exit codes).

It also clears up after a server that died (the caller holds the prefix lock, so
whatever a claim or an unanswered key says was being done, nobody is doing now):

* start claims are dropped, and claims of keys that have no job yet are released, so
  a retry is served at once;
* a directory psik's create was stopped in (:func:`jobdir.half_created`) is removed;
* so is a complete directory made for a keyed request that died before the index knew
  its jobid (matched by the spec's fingerprint): nobody was answered with it, and the
  client's retry makes the job;
* keys linked to a job but never answered are handed back (:attr:`Reconciled.pending`)
  for the service to finish: submit the job if the request was to, then settle.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from psik_api_core import JobState

from . import directory as jobdir
from .store import JobRow, JobStore, OpenKey

_logger = logging.getLogger(__name__)

#: A half-created directory younger than this may be a create still under way (the psik
#: command line, which takes no lock): it is looked at again once it is this old.
HALF_CREATED_GRACE = 1.0

#: Jobs read, then written to the index in one transaction: one commit per job made a
#: first start over many directories twice as slow.
BATCH = 1000


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
        exit_code=files.exit_code,
        labels=files.spec.labels,
        group=files.group,
    )


@dataclass
class Reconciled:
    """What :func:`reconcile` did, and the jobs to follow from now on."""

    imported: int = 0
    removed: int = 0
    refreshed: int = 0
    #: Non-final jobs: ``(jobid, status.csv)`` for the watcher.
    live: list[tuple[str, Path]] = field(default_factory=list)
    #: Keys linked to a job whose request was never answered (see the module docstring).
    pending: list[OpenKey] = field(default_factory=list)
    #: Non-final jobs that made their own files invalid (a FIFO for a status.csv...):
    #: never read, for the service to fail.
    invalid: list[jobdir.JobFileInvalid] = field(default_factory=list)


def reconcile(
    store: JobStore, prefix: Path, import_owner: str, *, grace: float = HALF_CREATED_GRACE
) -> Reconciled:
    """Bring ``store`` in line with the job directories under ``prefix``; jobs found
    only on disk are imported with the owner their directory records (the server's own
    jobs), else as ``import_owner``'s (jobs made with psik directly). Blocking: run it in a worker thread."""
    done = Reconciled()
    store.clear_claims()
    dead = [k for k in store.open_keys() if k.jobid is None]
    on_disk = jobdir.list_jobids(prefix)
    indexed = store.jobids()
    gone = sorted(indexed - on_disk)
    for i in range(0, len(gone), BATCH):
        store.delete_many(gone[i : i + BATCH])
    done.removed = len(gone)
    unindexed = sorted(on_disk - indexed)
    half = _remove_half_created(prefix, unindexed, grace)
    orphans, unreadable = _import(store, prefix, [j for j in unindexed if j not in half], dead, import_owner)
    done.imported = len(unindexed) - len(half) - len(orphans) - len(unreadable)
    if orphans:
        _logger.warning(
            "removed %d job director%s made for requests that were never answered "
            "(a server stopped before it recorded them; their Idempotency-Keys are free): %s",
            len(orphans),
            "y" if len(orphans) == 1 else "ies",
            ", ".join(orphans),
        )
    if unreadable:
        _logger.warning(
            "not importing %d unreadable job director%s: %s",
            len(unreadable),
            "y" if len(unreadable) == 1 else "ies",
            "; ".join(f"{j} ({why})" for j, why in unreadable),
        )
    store.release_claims()
    live = [row.jobid for row in store.live()]
    for i in range(0, len(live), BATCH):
        changes = []
        for jobid in live[i : i + BATCH]:
            read = _read(prefix, jobid, owner=False)
            if isinstance(read, jobdir.JobFileInvalid):
                done.invalid.append(read)
                continue
            if isinstance(read, Exception):
                _logger.warning("cannot read live job %s: %s", jobid, read)
                continue
            files, _ = read
            state, jobndx = files.state
            changes.append((jobid, state, jobndx, files.updated, files.exit_code, files.history))
            if not state.is_final:
                done.live.append((jobid, jobdir.job_path(prefix, jobid) / "status.csv"))
        done.refreshed += store.set_states(changes)
    _fill_exit_codes(store, prefix)
    done.pending = [k for k in store.open_keys() if k.jobid is not None]
    return done


def _fill_exit_codes(store: JobStore, prefix: Path) -> None:
    """Read, once, the exit codes of the failed jobs an index made before it kept them
    lacks (:meth:`JobStore.missing_exit_codes`); a job that cannot be read keeps none."""
    for row in store.missing_exit_codes():
        try:
            files = jobdir.read_job(jobdir.job_path(prefix, row.jobid))
        except (OSError, ValueError):
            continue
        state, jobndx = files.state
        store.set_state(row.jobid, state, jobndx, files.updated, exit_code=files.exit_code)
    store.exit_codes_filled()


def _remove_half_created(prefix: Path, jobids: list[str], grace: float) -> set[str]:
    """Remove the directories psik's create was stopped in; their ids. One log line."""
    half = {j for j in jobids if jobdir.half_created(prefix / j)}
    if not half:
        return half
    youngest = min(_age(prefix / j) for j in half)
    if youngest < grace:
        time.sleep(grace - youngest)  # a create under way has finished by now
        half = {j for j in half if jobdir.half_created(prefix / j)}
    removed = set()
    for jobid in sorted(half):
        try:
            shutil.rmtree(prefix / jobid)
        except FileNotFoundError:
            pass
        except OSError as e:
            _logger.warning("cannot remove half-created job directory %s: %s", jobid, e)
            continue
        removed.add(jobid)
    if removed:
        _logger.warning(
            "removed %d half-created job director%s (a server stopped while psik created them): %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            ", ".join(sorted(removed)),
        )
    return half


def _age(base: Path) -> float:
    try:
        return jobdir.age(base)
    except OSError:
        return 0.0


def _import(
    store: JobStore, prefix: Path, jobids: list[str], dead: list[OpenKey], owner: str
) -> tuple[list[str], list[tuple[str, str]]]:
    """Import the jobs ``jobids`` (complete directories the index does not know), except
    those made for the ``dead`` claims, which are removed. Returns (removed, unreadable)."""
    unclaimed = Counter(k.fingerprint for k in dead if k.fingerprint is not None)
    since = min((k.created for k in dead), default=float("inf")) - 1.0  # stamps are rounded
    removed: list[str] = []
    unreadable: list[tuple[str, str]] = []
    for i in range(0, len(jobids), BATCH):
        rows = []
        seen: dict[str, int] = {}
        for jobid in jobids[i : i + BATCH]:
            read = _read(prefix, jobid, owner=True)
            if isinstance(read, Exception):
                unreadable.append((jobid, " ".join(str(read).split())[:200]))
                continue
            files, recorded = read
            base = jobdir.job_path(prefix, jobid)
            if unclaimed and float(jobid) >= since and _never_run(files):
                digest = jobdir.fingerprint(files.spec, base)
                if unclaimed[digest] > 0:
                    try:
                        shutil.rmtree(base)
                    except OSError as e:
                        _logger.warning("cannot remove job directory %s: %s", jobid, e)
                    else:
                        unclaimed[digest] -= 1
                        removed.append(jobid)
                        continue
            rows.append(index_row(files, recorded or owner))
            seen[jobid] = len(files.history)  # its past is not news; rows from now on are
        # One transaction per batch: a crash loses at most this batch, and the next
        # start imports it again (the directories are the truth).
        store.put_many(rows, seen)
    return removed, unreadable


def _read(prefix: Path, jobid: str, owner: bool) -> tuple[jobdir.JobFiles, str | None] | Exception:
    """A job directory's files (and, if ``owner``, its recorded owner), or why they
    cannot be read. Read one after another: a pool of reader threads was slower (the
    parsing holds the GIL; bench/bench_store.py)."""
    base = jobdir.job_path(prefix, jobid)
    try:
        return jobdir.read_job(base), jobdir.read_owner(base) if owner else None
    except (OSError, ValueError) as e:
        return e


def _never_run(files: jobdir.JobFiles) -> bool:
    return all(r.state is JobState.new and r.jobndx == 0 for r in files.history)
