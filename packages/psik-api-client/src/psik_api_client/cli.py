"""``psik-api``: the client's command line.

::

    psik-api [--url URL | --uds PATH] [--cert-dir DIR] [--token TOKEN] COMMAND ...

    submit FILE | --script TEXT [--after ID[:ok|failed|any]]... [--label K=V]...
           [--wait [--timeout S] [--output] [--poll]]
                                         create and submit a job (JSON, or YAML)
    sweep FILE | --script TEXT -p NAME=V1,V2,...  [-p ...]
                                         submit one job per combination (one request)
    group ID | cancel-group ID           show a group's jobs, or cancel those not ended
    create FILE | --script TEXT          create a job without submitting it
    start ID | get ID | state ID
    cancel ID... | purge ID... | wait ID... [--timeout S] [--output] [--poll]
    watch [ID...] [--json] [--after N]   print the jobs' events as they happen
    ls [--state S]... [--backend B] [--name N] [--label K=V]... [--group ID]
       [--limit N | --all]
    backends
    upload ID LOCAL [REMOTE]             put a file (or a directory's files) in the job's directory
    download ID REMOTE [LOCAL]           fetch a job's file (resumed, checksum verified)
    files ID [PATH] [--recursive]        list the job's files
    logs ID [NAME] [--follow] [--tail N] print the job's logs, or follow one as it is written
    token [--read-only] [--job ID]... [--expires 1h]
                                         print a new token (narrowed: needs biscuit-python)

``--cert-dir`` (else ``$PSIK_API_CERTIFIED``) is a certified identity directory for a
server run under ``certified serve`` (https); ``--token`` (else ``$PSIK_API_TOKEN``,
which other users cannot read in ``ps``) is sent as a bearer token, never over plain
http to another host.

``--timeout`` is seconds >= 0 (0: look once); ``--limit`` is a count >= 0 (0: all).
``ls`` says on stderr when more jobs match than it shows. ``submit --wait`` says the
new job's id on stderr at once (Ctrl-C while waiting leaves the job running).
``cancel``, ``purge`` and ``wait`` take several ids: one refused does not stop the others.
``wait`` (and ``submit --wait``) listens to the server's event stream (a server without
one is polled); ``--poll`` only polls (``--events``, the default, is still accepted).
``watch`` prints each event (one history row of one of your jobs) as it happens, as a
line or, with ``--json``, as JSON lines; ``--after N`` first replays the events after
id N (0: all). It runs until Ctrl-C, picking the stream up again if the connection
drops or the server restarts.

Errors are one line on stderr. The exit status says what happened::

      0  success (for wait and submit --wait: the job completed)
      1  the job ended failed or canceled (wait, submit --wait), or never started (logs -f)
      2  usage error, unreadable or invalid job file or upload, bad input (e.g. a malformed id)
      3  wait or submit --wait timed out (the job is left running)
      4  the server could not be reached (connection refused, timeout, ...)
      5  the server refused the request (e.g. no such job), the job, or the client certificate
      6  the output, or a downloaded file, could not be written (e.g. a full disk)
    130  interrupted (Ctrl-C)
    141  stdout was closed early (e.g. psik-api ls | head -1): stops quietly

A local file that cannot be read (``upload``) is a usage error (2); one that cannot
be written (``download``) exits 6, and a download that arrives damaged (its SHA-256 is
not the server's) exits 5: neither leaves a file at LOCAL, and running ``download``
again resumes or starts afresh.

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
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

from psik_api_core import LIMITS, Event, Group, GroupRequest, Job, JobSpec, JobState, JobSummary

from ._client import Client
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    CertificateRefusedError,
    InvalidRequestError,
    NotFoundError,
    PsikApiError,
    SubmitFailedError,
    WaitTimeout,
)
from ._inputs import CONDITIONS, path_jobid, validate_spec
from ._tokens import attenuate
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
    1  the job ended failed or canceled (wait, submit --wait), or never started (logs -f)
    2  usage error, unreadable or invalid job file or upload, bad input (e.g. a malformed id)
    3  wait or submit --wait timed out (the job is left running)
    4  the server could not be reached (connection refused, timeout, ...)
    5  the server refused the request (e.g. no such job), the job, or the client certificate
    6  the output, or a downloaded file, could not be written (e.g. a full disk)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. psik-api ls | head -1): stops quietly"""


class InputError(Exception):
    """The job file could not be read or is not a job spec."""


class LocalWriteError(Exception):
    """A downloaded file could not be written (a full disk, no permission, ...)."""


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
        # None: the client's default, the stream (the CLI always talks over the network).
        events = {"events": True, "poll": False}.get(getattr(args, "listen", None) or "")
        api = Client(args.url, uds=args.uds, token=args.token, cert_dir=args.cert_dir, events=events)
    except ValueError as exc:  # e.g. --url or $PSIK_API_URL is not an http(s) URL, a bad --cert-dir
        return _fail(str(exc), ExitStatus.USAGE)
    try:
        with api:
            return command(api, args)
    except (InputError, InvalidRequestError) as exc:  # refused before any request
        return _fail(str(exc), ExitStatus.USAGE)
    except LocalWriteError as exc:
        return _fail(str(exc), ExitStatus.OUTPUT_FAILED)
    except WaitTimeout as exc:
        return _fail(str(exc), ExitStatus.WAIT_TIMEOUT)
    except CertificateRefusedError as exc:  # reached, and refused: not "cannot reach"
        return _fail(str(exc), ExitStatus.REFUSED)
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


def _out(*values: object, end: str = "\n") -> None:
    """``print`` to stdout; a write that fails raises :class:`OutputError` (a closed
    pipe passes as the ``BrokenPipeError`` it is)."""
    if sys.stdout is None:  # started with stdout closed (psik-api ... >&-)
        raise OutputError("stdout is closed")
    try:
        print(*values, end=end)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc)) from exc


def _out_bytes(data: bytes) -> None:
    """Write ``data`` (a log, as the job wrote it) to stdout unchanged, at once; errors
    as in :func:`_out`."""
    if sys.stdout is None:
        raise OutputError("stdout is closed")
    try:
        sys.stdout.flush()  # what was printed before comes first
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:  # stdout replaced by a text-only stream
            sys.stdout.write(data.decode("utf-8", "replace"))
        else:
            buffer.write(data)
            buffer.flush()
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


def _spec(args: argparse.Namespace) -> JobSpec:
    """The job spec of ``submit``/``create``: the job file, or ``--script``'s text."""
    if (args.file is None) == (args.script is None):
        raise InputError("give a job file or --script (one of them)")
    if args.script is not None:
        return validate_spec({"script": args.script})
    return load_spec(args.file)


def _submit(api: Client, args: argparse.Namespace) -> int:
    if args.output and not args.wait:
        raise InputError("--output prints the job's stdout once it ends: give --wait too")
    job = api.submit(_spec(args), after=args.after, labels=dict(args.label) if args.label else None)
    if not args.wait:
        _out(job.jobid)
        return ExitStatus.OK
    # Said now, not only at the end: Ctrl-C while waiting leaves a running job.
    print(
        f"{PROG}: job {job.jobid} submitted; waiting (Ctrl-C leaves it running)", file=sys.stderr, flush=True
    )
    return _waited(api, [job.jobid], timeout=args.timeout, output=args.output)


def _sweep(api: Client, args: argparse.Namespace) -> int:
    params: dict[str, list[str]] = {}
    for name, values in args.param:
        if name in params:
            raise InputError(f"-p {name} is given twice: give all its values at once ({name}=1,2,3)")
        params[name] = values
    spec = _spec(args)
    group = api.sweep(spec, params)
    _out(group.group)
    # Each job's values, from the same expansion the server made (the last name fastest).
    combos = GroupRequest(spec=spec, params=params).specs()
    rows = [
        [job.jobid, job.state.value, " ".join(f"{n}={combo.environment[n]}" for n in params)]
        for job, combo in zip(group.jobs, combos, strict=False)
    ]
    _table(["JOBID", "STATE", "PARAMS"], rows)
    return ExitStatus.OK


def _group(api: Client, args: argparse.Namespace) -> int:
    _show_group(api.group(args.group))
    return ExitStatus.OK


def _cancel_group(api: Client, args: argparse.Namespace) -> int:
    _show_group(api.cancel_group(args.group))
    return ExitStatus.OK


def _show_group(group: Group) -> None:
    """The group's id and counts by state, then a row per member."""
    counts = ", ".join(f"{n} {state.value}" for state, n in group.states.items())
    _out(f"{group.group}: {len(group.jobs)} jobs" + (f" ({counts})" if counts else ""))
    rows = [[j.jobid, j.state.value, *_ended(j), j.name or "-"] for j in group.jobs]
    _table(["JOBID", "STATE", "ENDED (UTC)", "EXIT", "NAME"], rows)


def _final(api: Client, job: Job, *, output: bool = False) -> int:
    """Print a final job's id and state (then, with ``output``, its last run's stdout);
    its status says whether it completed."""
    _out(job.jobid, job.state.value)
    if output:
        try:
            _out_bytes(api.read_log(job.jobid, f"stdout.{job.jobndx}"))
        except NotFoundError:  # it ended before writing any (e.g. canceled while queued)
            print(f"{PROG}: job {job.jobid} has no stdout", file=sys.stderr)
    return ExitStatus.OK if job.state is JobState.completed else ExitStatus.JOB_NOT_COMPLETED


def _create(api: Client, args: argparse.Namespace) -> int:
    _out(api.create(_spec(args)).jobid)
    return ExitStatus.OK


def _start(api: Client, args: argparse.Namespace) -> int:
    job = api.start(args.jobid)
    _out(job.jobid, job.state.value)
    return ExitStatus.OK


def _ls(api: Client, args: argparse.Namespace) -> int:
    limit = None if args.all or args.limit == 0 else args.limit
    # One job more than shown, in the same request: whether to say there are more.
    page_size = LIMITS.default_page_size if limit is None else min(limit + 1, LIMITS.max_page_size)
    jobs = list(
        api.list(
            state=args.state,
            backend=args.backend,
            name=args.name,
            label=args.label,
            group=args.group,
            limit=None if limit is None else limit + 1,
            page_size=page_size,
        )
    )
    more = limit is not None and len(jobs) > limit
    rows = [
        [j.jobid, j.state.value, str(j.jobndx), j.backend, *_ended(j), j.name or "-"] for j in jobs[:limit]
    ]
    _table(["JOBID", "STATE", "JOBNDX", "BACKEND", "ENDED (UTC)", "EXIT", "NAME"], rows)
    if more:
        print(f"{PROG}: more jobs than shown (--limit {limit}): --all lists every one", file=sys.stderr)
    return ExitStatus.OK


def _ended(job: JobSummary) -> list[str]:
    """When a final job ended and its exit code (``-`` for a job not final, or no code),
    both from the list's own item: no request per job."""
    if not job.state.is_final:
        return ["-", "-"]
    code = "-" if job.exit_code is None else str(job.exit_code)
    return [job.updated.strftime("%Y-%m-%d %H:%M:%S"), code]


def _get(api: Client, args: argparse.Namespace) -> int:
    # cb_secret is write-only: never shown, even if a server sent it back by mistake.
    _out(api.get(args.jobid).model_dump_json(indent=2, exclude={"spec": {"cb_secret"}}))
    return ExitStatus.OK


def _state(api: Client, args: argparse.Namespace) -> int:
    _out(api.state(args.jobid).state.value)
    return ExitStatus.OK


def _each(ids: Sequence[str], act: Callable[[str], str]) -> int:
    """``act`` on every id, printing what it returns. Every id is checked before the
    first is acted on; a job the server refuses is said on stderr and the others still
    go ahead (status 5 at the end). A server that cannot be reached stops them all."""
    for jobid in ids:
        path_jobid(jobid)
    status = ExitStatus.OK
    for jobid in ids:
        try:
            _out(act(jobid))
        except APIStatusError as exc:
            status = ExitStatus(_fail(str(exc), ExitStatus.REFUSED))
    return status


def _cancel(api: Client, args: argparse.Namespace) -> int:
    def cancel(jobid: str) -> str:
        job = api.cancel(jobid)
        return f"{job.jobid} {job.state.value}"

    return _each(args.jobid, cancel)


def _purge(api: Client, args: argparse.Namespace) -> int:
    def purge(jobid: str) -> str:
        api.purge(jobid)
        return f"{jobid} purged"

    return _each(args.jobid, purge)


def _wait(api: Client, args: argparse.Namespace) -> int:
    return _waited(api, args.jobid, timeout=args.timeout, output=args.output)


def _waited(api: Client, ids: Sequence[str], *, timeout: float | None, output: bool) -> int:
    """Wait for the jobs, print each final one (see :func:`_final`): 0 if all completed."""
    try:
        jobs = [api.wait(ids[0], timeout=timeout)] if len(ids) == 1 else api.wait_all(ids, timeout=timeout)
    except WaitTimeout as exc:
        if exc.status is not None and exc.status.state is JobState.new:
            # "left running" would be wrong: it never ran, and waiting cannot start it.
            jobid = exc.status.jobid
            raise WaitTimeout(
                f"job {jobid} was never started (state new: psik-api start {jobid}); "
                f"not final after {timeout:g} s",
                status=exc.status,
                pending=exc.pending,
            ) from exc
        raise
    statuses = [_final(api, job, output=output) for job in jobs]
    return max(statuses)


def _watch(api: Client, args: argparse.Namespace) -> int:
    events = api.watch(args.jobid or None, after=args.after)
    # A generator: closing it ends the stream at once (Ctrl-C, a closed pipe).
    with closing(cast("Generator[Event, None, None]", events)) as stream:
        for event in stream:
            _out(event.model_dump_json() if args.json else _event_line(event))
            _flush()  # as it happens, also into a pipe
    return ExitStatus.OK


def _event_line(event: Event) -> str:
    """``12 2024-01-01T00:00:00+00:00 1693992878.203 run 1 failed exit 3: info``; the
    job's state follows in brackets when the row's own differs (a row overruled)."""
    line = f"{event.id} {event.time.isoformat()} {event.jobid} run {event.jobndx} {event.state.value}"
    if event.job_state is not event.state:
        line += f" [job {event.job_state.value}]"
    if event.exit_code is not None and event.job_state.is_final:
        line += f" exit {event.exit_code}"
    return f"{line}: {event.info}" if event.info else line


def _backends(api: Client, args: argparse.Namespace) -> int:
    rows = [[b.name, b.type, "yes" if b.healthy else "no", b.detail or ""] for b in api.backends()]
    _table(["NAME", "TYPE", "HEALTHY", "DETAIL"], rows)
    return ExitStatus.OK


def _upload(api: Client, args: argparse.Namespace) -> int:
    local = Path(args.local)
    name = local.resolve().name if args.local in (".", "..") else local.name
    if args.remote is None and not local.is_dir() and name != name.encode("utf-8", "replace").decode():
        # Named in another encoding (surrogate-escaped): the server's names are UTF-8.
        raise InputError(f"the name of {args.local!r} is not valid UTF-8: give REMOTE, a UTF-8 name for it")
    try:
        if local.is_dir():
            infos = api.upload_dir(args.jobid, local, name if args.remote is None else args.remote)
        else:
            remote = name if args.remote is None else args.remote
            infos = [api.upload(args.jobid, local, remote + name if remote.endswith("/") else remote)]
    except OSError as exc:
        raise InputError(f"cannot read {exc.filename or args.local}: {exc.strerror or exc}") from exc
    for info in infos:
        _out(info.path)
    return ExitStatus.OK


def _download(api: Client, args: argparse.Namespace) -> int:
    try:
        path = api.download(args.jobid, args.remote, args.local)
    except OSError as exc:
        raise LocalWriteError(f"cannot write {exc.filename or args.local}: {exc.strerror or exc}") from exc
    _out(path)
    return ExitStatus.OK


def _files(api: Client, args: argparse.Namespace) -> int:
    listing = api.list_files(args.jobid, args.path, recursive=args.recursive)
    rows = [
        [
            e.type,
            str(e.size),
            e.mtime.strftime("%Y-%m-%d %H:%M:%S"),
            e.path + ("/" if e.type == "dir" else ""),
        ]
        for e in listing.entries
    ]
    _table(["TYPE", "SIZE", "MTIME (UTC)", "PATH"], rows)
    if listing.truncated:
        print(f"{PROG}: more entries than the server lists at once; list a subdirectory", file=sys.stderr)
    return ExitStatus.OK


def _logs(api: Client, args: argparse.Namespace) -> int:
    if args.follow:
        follow = api.follow_log(args.jobid, args.name or "stdout", tail=args.tail)
        got = False
        # A generator: closing it ends the request at once (Ctrl-C, a closed pipe).
        with closing(cast("Generator[bytes, None, None]", follow)) as chunks:
            for chunk in chunks:
                got = got or bool(chunk)
                _out_bytes(chunk)
        # The server ends a follow of a job never started at once: say so, not nothing.
        if not got and api.state(args.jobid).state is JobState.new:
            return _fail(
                f"job {args.jobid} was never started: no log to follow (psik-api start {args.jobid})",
                ExitStatus.JOB_NOT_COMPLETED,
            )
        return ExitStatus.OK
    if args.name is not None:
        _out_bytes(api.read_log(args.jobid, args.name, tail=args.tail))
        return ExitStatus.OK
    for name, text in api.logs(args.jobid).items():
        if args.tail is not None:
            text = "".join(text.splitlines(keepends=True)[-args.tail :])
        _out(f"==> {name} <==")
        _out(text, end="" if text.endswith("\n") or not text else "\n")
    return ExitStatus.OK


def _token(api: Client, args: argparse.Namespace) -> int:
    # --expires alone is the server's to honour; a narrowed token is made here, offline.
    jobs = [path_jobid(jobid) for jobid in args.job] if args.job else None
    token = api.token(expires=args.expires)
    if args.read_only or jobs:
        key = api.token_key()
        try:
            token = attenuate(
                token, public_key=key, read_only=args.read_only, jobs=jobs, expires=args.expires
            )
        except ImportError as exc:
            raise InputError(f"--read-only and --job: {exc}") from exc
    _out(token)
    return ExitStatus.OK


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """``--expires``: a lifetime > 0, in seconds or with a unit: 90s, 30m, 1h, 2d."""
    number, unit = (text[:-1], _UNITS[text[-1]]) if text[-1:] in _UNITS else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a lifetime: {text!r} (e.g. 90s, 30m, 1h, 2d)") from None
    if not (value > 0 and value != float("inf")):  # also refuses nan
        raise argparse.ArgumentTypeError(f"a lifetime is > 0, not {text}")
    return value


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


def _dependency(text: str) -> tuple[str, str]:
    """``--after``: ``ID`` (it must complete) or ``ID:ok``, ``ID:failed``, ``ID:any``."""
    jobid, _, condition = text.partition(":")
    condition = condition or "ok"
    if condition not in CONDITIONS:
        raise argparse.ArgumentTypeError(f"a condition is one of {', '.join(CONDITIONS)}, not {condition!r}")
    return jobid, condition


def _label(text: str) -> tuple[str, str]:
    """``--label``: ``KEY=VALUE``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"a label is KEY=VALUE, not {text!r}")
    return key, value


def _label_filter(text: str) -> str:
    """``ls --label``: ``KEY=VALUE``, sent as it is."""
    _label(text)
    return text


def _param(text: str) -> tuple[str, list[str]]:
    """``sweep -p``: ``NAME=V1,V2,...``."""
    name, sep, values = text.partition("=")
    if not sep or not name or not values:
        raise argparse.ArgumentTypeError(f"a parameter is NAME=V1,V2,..., not {text!r}")
    return name, values.split(",")


def _lines(text: str) -> int:
    """``--tail``: a count of lines >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a count of lines is >= 1, not {text}")
    return value


def _spec_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("file", nargs="?", help="job spec: JSON, or YAML (.yaml/.yml); - reads stdin")
    sub.add_argument("--script", metavar="TEXT", help="instead of a job file: the job's script alone")


_EVENTS_HELP = "listen to the server's event stream (the default; a server without one is polled)"
_POLL_HELP = "poll the jobs' states instead of listening to the event stream"


def _listen_arguments(sub: argparse.ArgumentParser) -> None:
    how = sub.add_mutually_exclusive_group()
    how.add_argument("--events", dest="listen", action="store_const", const="events", help=_EVENTS_HELP)
    how.add_argument("--poll", dest="listen", action="store_const", const="poll", help=_POLL_HELP)


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
    parser.add_argument(
        "--cert-dir",
        metavar="DIR",
        help="certified identity directory, for an https server (default: $PSIK_API_CERTIFIED)",
    )
    parser.add_argument(
        "--token",
        help="bearer token (default: $PSIK_API_TOKEN, which is safer: a command line is public)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(
        name: str, run: Callable[[Client, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=run)
        return sub

    sub = command("submit", _submit, "create a job and submit it; print its id")
    _spec_arguments(sub)
    sub.add_argument("--wait", action="store_true", help="wait until it is final; print its state")
    sub.add_argument(
        "--timeout", type=_seconds, help="with --wait: give up after this many seconds (0: look once)"
    )
    sub.add_argument("--output", action="store_true", help="with --wait: then print the job's stdout")
    sub.add_argument(
        "--after",
        action="append",
        type=_dependency,
        metavar="ID[:COND]",
        help="start only once job ID ended: ok (completed, the default), failed or any (repeatable)",
    )
    sub.add_argument(
        "--label", action="append", type=_label, metavar="KEY=VALUE", help="tag the job (repeatable)"
    )
    _listen_arguments(sub)
    sub = command("sweep", _sweep, "submit one job per combination of parameters; print the group and jobs")
    _spec_arguments(sub)
    sub.add_argument(
        "-p",
        "--param",
        action="append",
        type=_param,
        required=True,
        metavar="NAME=V1,V2",
        help="a parameter and its values, each in its job's environment as $NAME (repeatable)",
    )
    command("group", _group, "show a group's jobs and how many are in each state").add_argument(
        "group", metavar="ID"
    )
    command("cancel-group", _cancel_group, "cancel every job of a group that has not ended").add_argument(
        "group", metavar="ID"
    )
    sub = command("create", _create, "create a job without submitting it; print its id")
    _spec_arguments(sub)
    for name, run, text in [
        ("start", _start, "submit a new job, or run a final one again"),
        ("get", _get, "print a job as JSON"),
        ("state", _state, "print a job's state"),
    ]:
        command(name, run, text).add_argument("jobid", metavar="ID")
    command("cancel", _cancel, "cancel jobs (a final job stays as it is)").add_argument(
        "jobid", metavar="ID", nargs="+"
    )
    command("purge", _purge, "remove final jobs and their directories").add_argument(
        "jobid", metavar="ID", nargs="+"
    )
    sub = command("wait", _wait, "wait until jobs are final (never cancels them)")
    sub.add_argument("jobid", metavar="ID", nargs="+")
    sub.add_argument("--timeout", type=_seconds, help="give up after this many seconds (0: look once)")
    sub.add_argument("--output", action="store_true", help="then print the job's stdout")
    _listen_arguments(sub)
    sub = command("watch", _watch, "print your jobs' events as they happen (until Ctrl-C)")
    sub.add_argument("jobid", metavar="ID", nargs="*", help="only these jobs' (default: all of yours)")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument("--after", type=_count, metavar="N", help="first replay the events after id N (0: all)")
    sub = command("ls", _ls, "list jobs, newest first")
    sub.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    sub.add_argument("--backend", help="only jobs of this backend")
    sub.add_argument("--name", help="only jobs with this name")
    sub.add_argument(
        "--label",
        action="append",
        type=_label_filter,
        metavar="KEY=VALUE",
        help="only jobs with this label (repeatable)",
    )
    sub.add_argument("--group", metavar="ID", help="only the jobs of this group")
    sub.add_argument(
        "--limit",
        type=_count,
        default=LIMITS.default_page_size,
        help=f"at most this many (0: all; default {LIMITS.default_page_size})",
    )
    sub.add_argument("--all", action="store_true", help="every matching job, page after page")
    command("backends", _backends, "list the configured backends")
    sub = command(
        "upload",
        _upload,
        "put a local file in the job's directory (a directory: all its files); print each path stored",
    )
    sub.add_argument("jobid", metavar="ID")
    sub.add_argument("local", metavar="LOCAL", help="a file, or a directory to upload recursively")
    sub.add_argument(
        "remote",
        metavar="REMOTE",
        nargs="?",
        help="path in the job's directory (default: LOCAL's name; ending in /: a directory to put it in)",
    )
    sub = command(
        "download",
        _download,
        "save a job's file (an interrupted download resumes; the checksum is verified); print where",
    )
    sub.add_argument("jobid", metavar="ID")
    sub.add_argument("remote", metavar="REMOTE", help="path in the job's directory")
    sub.add_argument(
        "local", metavar="LOCAL", nargs="?", default=".", help="file or directory to save it to (default: .)"
    )
    sub = command("files", _files, "list the files in a job's directory")
    sub.add_argument("jobid", metavar="ID")
    sub.add_argument("path", metavar="PATH", nargs="?", default="", help="a subdirectory (default: the top)")
    sub.add_argument("--recursive", "-r", action="store_true", help="list subdirectories too")
    sub = command("logs", _logs, "print a job's logs, or one log (as the job wrote it), or follow one")
    sub.add_argument("jobid", metavar="ID")
    sub.add_argument(
        "name",
        metavar="NAME",
        nargs="?",
        help="stdout, stderr, console, or stdout.N/stderr.N for run N (default: all; with --follow: stdout)",
    )
    sub.add_argument("--follow", "-f", action="store_true", help="print new output until the job ends")
    sub.add_argument(
        "--tail", "-n", metavar="N", type=_lines, help="only the last N lines (then new ones, with --follow)"
    )
    sub = command(
        "token",
        _token,
        "mint a token for your certificate and print it (narrowed offline with --read-only/--job)",
    )
    sub.add_argument("--read-only", action="store_true", help="the token can only read (GET)")
    sub.add_argument(
        "--job", action="append", metavar="ID", help="the token works on this job only (repeatable)"
    )
    sub.add_argument(
        "--expires", type=_duration, metavar="TIME", help="its lifetime: seconds, or 90s, 30m, 1h, 2d"
    )
    return parser
