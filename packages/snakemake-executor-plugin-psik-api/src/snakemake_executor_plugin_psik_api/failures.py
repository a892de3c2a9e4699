"""What Snakemake is told when a psik-api job of the workflow did not complete: its
state, exit code, and the tail of its logs (read with one request, ``GET
/v1/jobs/{id}/logs``), so the reason is in the error itself and not only on the server."""

from __future__ import annotations

from psik_api_client import JobSummary

#: Lines of each log the message ends with.
TAIL_LINES = 20


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text`` (without the trailing newline)."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


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
