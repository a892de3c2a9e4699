"""Reading psik job directories, cheaply and defensively.

A job directory (``prefix/<jobid>/``) holds ``spec.json`` and ``status.csv`` (rows of
``time,jobndx,state,info``). These readers never raise on a malformed row: psik writes
without validation, so a bad row is skipped and logged, never a 500.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from psik_api_core import JobSpec, JobState, Transition, derive_state, is_jobid, utc

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One row of status.csv."""

    time: float
    jobndx: int
    state: JobState
    info: str

    def transition(self) -> Transition:
        return Transition(time=utc(self.time), jobndx=self.jobndx, state=self.state, info=self.info)


def parse_rows(text: str, where: str = "") -> list[Row]:
    """Rows from (complete lines of) status.csv text; malformed rows are skipped."""
    rows: list[Row] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split(",", 3)
        try:
            rows.append(
                Row(
                    time=float(parts[0]),
                    jobndx=int(parts[1]),
                    state=JobState(parts[2]),
                    info=parts[3] if len(parts) > 3 else "",
                )
            )
        except (ValueError, IndexError):
            _logger.warning("%s: skipping malformed status row %r", where, line[:200])
    return rows


def job_path(prefix: Path, jobid: str) -> Path:
    """The directory of ``jobid``; refuses anything but a well-formed id."""
    if not is_jobid(jobid):
        raise ValueError(f"not a job id: {jobid!r}")
    return prefix / jobid


def read_history(base: Path) -> list[Row]:
    return parse_rows((base / "status.csv").read_text(encoding="utf-8", errors="replace"), str(base))


def read_spec(base: Path) -> JobSpec:
    return JobSpec.model_validate_json((base / "spec.json").read_bytes())


@dataclass(frozen=True)
class JobFiles:
    """What a job directory says about its job."""

    jobid: str
    spec: JobSpec
    history: list[Row]

    @property
    def state(self) -> tuple[JobState, int]:
        return derive_state(self.history)

    @property
    def created(self) -> float:
        return self.history[0].time if self.history else float(self.jobid)

    @property
    def updated(self) -> float:
        return max((r.time for r in self.history), default=self.created)


def read_job(base: Path) -> JobFiles:
    """Spec and history of the job at ``base`` (OSError/ValueError if it is not one)."""
    return JobFiles(jobid=base.name, spec=read_spec(base), history=read_history(base))


def list_jobids(prefix: Path) -> set[str]:
    """Ids of the job directories under ``prefix`` (names only: no file is read)."""
    try:
        with os.scandir(prefix) as it:
            return {e.name for e in it if is_jobid(e.name) and e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return set()
