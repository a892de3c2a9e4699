"""``psik-api``: the client's command line.

::

    psik-api [--url URL | --uds PATH] COMMAND ...

    submit FILE [--wait [--timeout S]]   create and submit a job (JSON, or YAML)
    create FILE                          create a job without submitting it
    start ID | get ID | state ID | cancel ID | wait ID [--timeout S]
    ls [--state S]... [--backend B] [--name N] [--limit N]
    backends

``--timeout`` is seconds >= 0 (0: look once); ``--limit`` is a count >= 0 (0: all).

Errors are one line on stderr. The exit status says what happened::

      0  success (for wait and submit --wait: the job completed)
      1  the job ended failed or canceled (wait, submit --wait)
      2  usage error, unreadable or invalid job file, bad input (e.g. a malformed id)
      3  wait or submit --wait timed out (the job is left running)
      4  the server could not be reached (connection refused, timeout, ...)
      5  the server refused the request (e.g. no such job, or the backend refused the job)
      6  the output could not be written (e.g. a full disk)
    130  interrupted (Ctrl-C)
    141  stdout was closed early (e.g. psik-api ls | head -1): stops quietly

When the backend refuses a submitted job (``submit``, with or without ``--wait``; the
server's 502 ``submit_failed``), the job exists, in state ``failed``: the status is 5
and the error line names the job, for ``psik-api get ID``. Nothing is waited for.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

from psik_api_core import LIMITS, Job, JobSpec, JobState

from ._client import Client
from ._exceptions import (
    APIConnectionError,
    InvalidRequestError,
    PsikApiError,
    SubmitFailedError,
    WaitTimeout,
)
from ._inputs import validate_spec
from ._version import __version__

PROG = "psik-api"


class ExitStatus(IntEnum):
    """The exit statuses of ``psik-api`` (see the module docstring)."""

    OK = 0
    JOB_NOT_COMPLETED = 1
    USAGE = 2
    WAIT_TIMEOUT = 3
    UNREACHABLE = 4
    REFUSED = 5
    OUTPUT_FAILED = 6
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer killed by a closed pipe


EPILOG = """exit status:
    0  success (for wait and submit --wait: the job completed)
    1  the job ended failed or canceled (wait, submit --wait)
    2  usage error, unreadable or invalid job file, bad input (e.g. a malformed id)
    3  wait or submit --wait timed out (the job is left running)
    4  the server could not be reached (connection refused, timeout, ...)
    5  the server refused the request (e.g. no such job, or the backend refused the job)
    6  the output could not be written (e.g. a full disk)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. psik-api ls | head -1): stops quietly"""


class InputError(Exception):
    """The job file could not be read or is not a job spec."""


class OutputError(Exception):
    """stdout could not be written (a full disk, a closed descriptor, ...); a reader
    that went away is a ``BrokenPipeError`` instead, which is not an error."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status (see :class:`ExitStatus`)."""
    try:
        status = _main(argv)
        _flush()  # output that fails shows here at the latest, whatever the status was
    except BrokenPipeError:
        status = _stdout_gone()
    except OutputError as exc:
        _discard_stdout()
        status = _fail(f"cannot write the output: {exc}", ExitStatus.OUTPUT_FAILED)
    except KeyboardInterrupt:
        status = ExitStatus.INTERRUPTED
    return int(status)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else ExitStatus.USAGE
    command: Callable[[Client, argparse.Namespace], int] = args.command
    try:
        api = Client(args.url, uds=args.uds)
    except ValueError as exc:  # e.g. --url or $PSIK_API_URL is not an http(s) URL
        return _fail(str(exc), ExitStatus.USAGE)
    try:
        with api:
            return command(api, args)
    except (InputError, InvalidRequestError) as exc:  # refused before any request
        return _fail(str(exc), ExitStatus.USAGE)
    except WaitTimeout as exc:
        return _fail(str(exc), ExitStatus.WAIT_TIMEOUT)
    except APIConnectionError as exc:
        return _fail(str(exc), ExitStatus.UNREACHABLE)
    except SubmitFailedError as exc:  # the job was created, and is failed: say which
        jobid = f" (job {exc.jobid} exists, failed: psik-api get {exc.jobid})" if exc.jobid else ""
        return _fail(f"{exc}{jobid}", ExitStatus.REFUSED)
    except PsikApiError as exc:  # an error answer, or an answer that is not the API's
        return _fail(str(exc), ExitStatus.REFUSED)


def _fail(message: str, status: ExitStatus) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _out(*values: object) -> None:
    """``print`` to stdout; a write that fails raises :class:`OutputError` (a closed
    pipe passes as the ``BrokenPipeError`` it is)."""
    if sys.stdout is None:  # started with stdout closed (psik-api ... >&-)
        raise OutputError("stdout is closed")
    try:
        print(*values)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc)) from exc


def _flush() -> None:
    """Flush stdout: buffered output to a file fails here rather than at exit."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc)) from exc


def _stdout_gone() -> int:
    """Whoever read stdout has gone (``psik-api ls | head -1``): that is not an error,
    so no traceback."""
    _discard_stdout()
    return ExitStatus.BROKEN_PIPE


def _discard_stdout() -> None:
    """Python flushes stdout once more at exit, which would fail again and print a
    traceback-like warning: point the descriptor at /dev/null first."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file: nothing to flush into
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def load_spec(name: str) -> JobSpec:
    """The job spec in file ``name`` (``-``: stdin). JSON, or YAML for ``.yaml``/``.yml``
    files (and for stdin that is not JSON) when PyYAML is installed. Unknown fields are
    errors, as they are for the server (:class:`InvalidRequestError`)."""
    label = "stdin" if name == "-" else name
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as exc:
        raise InputError(f"cannot read {label}: {exc.strerror or exc}") from exc
    data: Any
    if name.endswith((".yaml", ".yml")) or (name == "-" and _yaml() is not None and not _is_json(text)):
        data = _load_yaml(label, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{label} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{label} does not hold a job spec (a mapping with a 'script')")
    return validate_spec(data)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _yaml() -> Any:
    """The yaml module, or None. (Imported by name: PyYAML is optional and its type
    stubs are a separate package.)"""
    try:
        return importlib.import_module("yaml")
    except ImportError:
        return None


def _load_yaml(label: str, text: str) -> Any:
    yaml = _yaml()
    if yaml is None:
        raise InputError(
            f"reading {label} needs PyYAML: pip install 'psik-api-client[yaml]', or give the spec as JSON"
        )
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{label} is not valid YAML: {' '.join(str(exc).split())}") from exc


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _out("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# ---- commands: each takes the client and the parsed arguments, returns the status ----


def _submit(api: Client, args: argparse.Namespace) -> int:
    job = api.submit(load_spec(args.file))
    if not args.wait:
        _out(job.jobid)
        return ExitStatus.OK
    return _final(api.wait(job.jobid, timeout=args.timeout))


def _final(job: Job) -> int:
    """Print a final job's id and state; its status says whether it completed."""
    _out(job.jobid, job.state.value)
    return ExitStatus.OK if job.state is JobState.completed else ExitStatus.JOB_NOT_COMPLETED


def _create(api: Client, args: argparse.Namespace) -> int:
    _out(api.create(load_spec(args.file)).jobid)
    return ExitStatus.OK


def _start(api: Client, args: argparse.Namespace) -> int:
    job = api.start(args.jobid)
    _out(job.jobid, job.state.value)
    return ExitStatus.OK


def _ls(api: Client, args: argparse.Namespace) -> int:
    jobs = api.list(state=args.state, backend=args.backend, name=args.name, limit=args.limit or None)
    rows = [[j.jobid, j.state.value, str(j.jobndx), j.backend, j.name or "-"] for j in jobs]
    _table(["JOBID", "STATE", "JOBNDX", "BACKEND", "NAME"], rows)
    return ExitStatus.OK


def _get(api: Client, args: argparse.Namespace) -> int:
    # cb_secret is write-only: never shown, even if a server sent it back by mistake.
    _out(api.get(args.jobid).model_dump_json(indent=2, exclude={"spec": {"cb_secret"}}))
    return ExitStatus.OK


def _state(api: Client, args: argparse.Namespace) -> int:
    _out(api.state(args.jobid).state.value)
    return ExitStatus.OK


def _cancel(api: Client, args: argparse.Namespace) -> int:
    job = api.cancel(args.jobid)
    _out(job.jobid, job.state.value)
    return ExitStatus.OK


def _wait(api: Client, args: argparse.Namespace) -> int:
    return _final(api.wait(args.jobid, timeout=args.timeout))


def _backends(api: Client, args: argparse.Namespace) -> int:
    rows = [[b.name, b.type, "yes" if b.healthy else "no", b.detail or ""] for b in api.backends()]
    _table(["NAME", "TYPE", "HEALTHY", "DETAIL"], rows)
    return ExitStatus.OK


def _seconds(text: str) -> float:
    """``--timeout``: seconds >= 0 (0: look once, then give up)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"seconds are >= 0 (0: look once), not {text}")
    return value


def _count(text: str) -> int:
    """``--limit``: a count of jobs >= 0 (0: all of them)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a count of jobs is >= 0 (0: all), not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Submit and follow psik jobs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="server URL (default: $PSIK_API_URL or http://127.0.0.1:8000)")
    where.add_argument("--uds", help="server UNIX socket (default: $PSIK_API_UDS)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(
        name: str, run: Callable[[Client, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=run)
        return sub

    sub = command("submit", _submit, "create a job and submit it; print its id")
    sub.add_argument("file", help="job spec: JSON, or YAML (.yaml/.yml); - reads stdin")
    sub.add_argument("--wait", action="store_true", help="wait until it is final; print its state")
    sub.add_argument(
        "--timeout", type=_seconds, help="with --wait: give up after this many seconds (0: look once)"
    )
    sub = command("create", _create, "create a job without submitting it; print its id")
    sub.add_argument("file", help="job spec: JSON, or YAML (.yaml/.yml); - reads stdin")
    for name, run, text in [
        ("start", _start, "submit a new job, or run a final one again"),
        ("get", _get, "print a job as JSON"),
        ("state", _state, "print a job's state"),
        ("cancel", _cancel, "cancel a job"),
    ]:
        command(name, run, text).add_argument("jobid", metavar="ID")
    sub = command("wait", _wait, "wait until a job is final (never cancels it)")
    sub.add_argument("jobid", metavar="ID")
    sub.add_argument("--timeout", type=_seconds, help="give up after this many seconds (0: look once)")
    sub = command("ls", _ls, "list jobs, newest first")
    sub.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    sub.add_argument("--backend", help="only jobs of this backend")
    sub.add_argument("--name", help="only jobs with this name")
    sub.add_argument(
        "--limit",
        type=_count,
        default=LIMITS.default_page_size,
        help=f"at most this many (0: all; default {LIMITS.default_page_size})",
    )
    command("backends", _backends, "list the configured backends")
    return parser
