"""``psik-api``: the client's command line.

::

    psik-api [--url URL | --uds PATH] COMMAND ...

    submit FILE [--wait [--timeout S]]   create and submit a job (JSON, or YAML)
    create FILE                          create a job without submitting it
    start ID | get ID | state ID | cancel ID | wait ID [--timeout S]
    ls [--state S]... [--backend B] [--name N] [--limit N]
    backends

Exit status: 0 on success, 1 when the server (or the connection) refused, 2 for a
usage error or an unreadable job file. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydantic

from psik_api_core import STRICT_INPUT, JobSpec

from ._client import Client
from ._exceptions import InvalidRequestError, PsikApiError
from ._version import __version__

PROG = "psik-api"


class InputError(Exception):
    """The job file could not be read or is not a job spec."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    command: Callable[[Client, argparse.Namespace], int] = args.command
    try:
        with Client(args.url, uds=args.uds) as api:
            return command(api, args)
    except InvalidRequestError as exc:  # e.g. a malformed job id, refused before any request
        return _fail(str(exc), 2)
    except PsikApiError as exc:
        return _fail(str(exc), 1)
    except InputError as exc:
        return _fail(str(exc), 2)
    except pydantic.ValidationError as exc:
        return _fail(f"invalid job spec: {_one_line(exc)}", 2)
    except ValueError as exc:  # e.g. a malformed job id, refused before any request
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _one_line(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()
    )


def load_spec(name: str) -> JobSpec:
    """The job spec in file ``name`` (``-``: stdin). JSON, or YAML for ``.yaml``/``.yml``
    files (and for stdin that is not JSON) when PyYAML is installed. Unknown fields are
    errors, as they are for the server."""
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
    return JobSpec.model_validate(data, context=STRICT_INPUT)


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
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# ---- commands: each takes the client and the parsed arguments, returns the status ----


def _submit(api: Client, args: argparse.Namespace) -> int:
    job = api.submit(load_spec(args.file))
    if args.wait:
        job = api.wait(job.jobid, timeout=args.timeout)
        print(job.jobid, job.state.value)
    else:
        print(job.jobid)
    return 0


def _create(api: Client, args: argparse.Namespace) -> int:
    print(api.create(load_spec(args.file)).jobid)
    return 0


def _start(api: Client, args: argparse.Namespace) -> int:
    job = api.start(args.jobid)
    print(job.jobid, job.state.value)
    return 0


def _ls(api: Client, args: argparse.Namespace) -> int:
    jobs = api.list(state=args.state, backend=args.backend, name=args.name, limit=args.limit or None)
    rows = [[j.jobid, j.state.value, str(j.jobndx), j.backend, j.name or "-"] for j in jobs]
    _table(["JOBID", "STATE", "JOBNDX", "BACKEND", "NAME"], rows)
    return 0


def _get(api: Client, args: argparse.Namespace) -> int:
    print(api.get(args.jobid).model_dump_json(indent=2))
    return 0


def _state(api: Client, args: argparse.Namespace) -> int:
    print(api.state(args.jobid).state.value)
    return 0


def _cancel(api: Client, args: argparse.Namespace) -> int:
    job = api.cancel(args.jobid)
    print(job.jobid, job.state.value)
    return 0


def _wait(api: Client, args: argparse.Namespace) -> int:
    job = api.wait(args.jobid, timeout=args.timeout)
    print(job.jobid, job.state.value)
    return 0


def _backends(api: Client, args: argparse.Namespace) -> int:
    rows = [[b.name, b.type, "yes" if b.healthy else "no", b.detail or ""] for b in api.backends()]
    _table(["NAME", "TYPE", "HEALTHY", "DETAIL"], rows)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Submit and follow psik jobs.")
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
    sub.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
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
    sub.add_argument("--timeout", type=float, help="give up after this many seconds")
    sub = command("ls", _ls, "list jobs, newest first")
    sub.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    sub.add_argument("--backend", help="only jobs of this backend")
    sub.add_argument("--name", help="only jobs with this name")
    sub.add_argument("--limit", type=int, default=100, help="at most this many (0: all; default 100)")
    command("backends", _backends, "list the configured backends")
    return parser
