"""What Snakemake is told when a psik-api job of the workflow did not complete: its
state, exit code, and the tail of its logs (read with one request, ``GET
/v1/jobs/{id}/logs``), so the reason is in the error itself and not only on the server."""

from __future__ import annotations

import re

from psik_api_client import JobSummary

#: Lines of each log the message ends with.
TAIL_LINES = 20

#: ... and at most this many bytes of each (UTF-8): a job may write megabytes on one
#: line, which would otherwise go whole into Snakemake's output.
TAIL_BYTES = 4096

#: C0 controls but tab and newline, DEL, and C1 controls: a job's output may hold
#: terminal escape sequences (ESC, BEL, ...) which must not reach the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


def tail(text: str, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines of ``text`` (without the trailing newline), at most
    ``max_bytes`` of them (cut at the front, marked ``...``), control characters but
    tab and newline escaped (``\\x1b``)."""
    text = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    data = text.encode("utf-8", errors="replace")
    if len(data) > max_bytes:
        # Cut by bytes (text may be wide); a character split at the cut is dropped.
        text = "..." + data[-max_bytes:].decode("utf-8", errors="ignore")
    return _CONTROL.sub(_escape, text)


def failure_message(job: JobSummary, logs: dict[str, str] | None, reason: str = "") -> str:
    """``psik-api job 1693992878.203 failed (exit code 1)``, why it ended (a history
    row's info, if given), then the tails of the current run's logs (``stderr.N``,
    ``stdout.N`` and the scheduler's ``console``), the empty ones left out. ``logs`` is
    None when they could not be read."""
    head = f"psik-api job {job.jobid} {job.state.value}"
    if job.exit_code is not None:
        head += f" (exit code {job.exit_code})"
    if reason:
        head += f": {reason}"
    parts = [head + "."]
    if logs is None:
        parts.append("Its logs could not be read from the server.")
        return "\n".join(parts) + "\n"
    run = job.jobndx
    for name in (f"stderr.{run}", f"stdout.{run}", "console"):
        text = logs.get(name, "")
        if text.strip():
            parts.append(f"--- last lines of {name} ---\n{tail(text)}")
    if len(parts) == 1:
        parts.append("Its logs are empty.")
    return "\n".join(parts) + "\n"
