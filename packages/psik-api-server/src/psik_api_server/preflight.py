"""``psik-api-server check [--config FILE]``: whether ``serve`` would start with this
config, and work, said before it is started.

The config is read as ``serve`` reads it (``--config``, ``$PSIK_API_CONFIG``, ...), then
each thing ``serve`` needs is checked with the server's own start-up code wherever it
has one, so that the check and the start-up cannot disagree:

* the prefix and the state directory (``check_private_dir``, ``statedir.check_state_dir``,
  ``statedir.check_own_files``): the server's user's own, not reachable or writable by
  others; one that does not exist yet is made as ``serve`` makes it, checked, and removed
  again; free space and inodes above a threshold, and a probe write (a full disk is told
  apart as the server tells it, ``diskfull.full_place``);
* the index: the file's mode, SQLite opens it read-only and finds it sound, its version
  is one this server knows, and no other server holds it or the prefix (``PrefixLock``);
* each backend: psik loads its type (the driver's ``load``); local: the interpreter the
  launcher runs jobs with starts and imports psik; Slurm: ``scontrol ping``, the
  partition, the reservation and the account (where accounting is configured);
* token mode: the certified directory (certified's own ``check_config`` and the SSL
  context ``certified serve`` builds), its certificates' dates, ``known_clients/``, and
  the token key (``TokenAuthority.load``);
* the listen address: the port is free (``cli``'s own bind), and ``authz: local`` listens
  on loopback or a UNIX socket only.

One line per check: ``ok``, ``warn`` (``serve`` starts, but read this) or ``FAIL`` (it
would not start, or not work), what was checked, and for a failure what to do. Exit
status: 0 when nothing failed, 1 when something did, 2 for a config ``serve`` refuses as
one (a broken file; ``authz: local`` on an address other than loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import pwd
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

if TYPE_CHECKING:
    from .settings import BackendSettings, Settings

#: The free space (MiB) and inodes below which a filesystem the server writes fails.
DEFAULT_MIN_FREE_MIB = 512
MIN_FREE_INODES = 10_000
#: A certificate that ends sooner than this is a warning.
EXPIRY_WARNING = dt.timedelta(days=30)
#: Seconds the interpreter check may take (it imports psik: ~0.5 s).
INTERPRETER_TIMEOUT = 60.0

Level = Literal["ok", "warn", "FAIL"]


@dataclass(frozen=True)
class Line:
    """One check's outcome: its level, what was checked, and the detail (for a failure:
    what is wrong and what to do)."""

    level: Level
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.level:<4} {self.what}: {' '.join(self.detail.split())}"


@dataclass
class Report:
    """The lines so far, each printed as it is added (``out``, or kept only)."""

    out: Any = None
    lines: list[Line] = field(default_factory=list)
    #: ``serve`` would refuse the config itself (its exit status 2).
    config_error: bool = False

    def add(self, level: Level, what: str, detail: str) -> None:
        line = Line(level, what, detail)
        self.lines.append(line)
        if self.out is not None:
            print(line, file=self.out, flush=True)

    def ok(self, what: str, detail: str) -> None:
        self.add("ok", what, detail)

    def warn(self, what: str, detail: str) -> None:
        self.add("warn", what, detail)

    def fail(self, what: str, detail: str) -> None:
        self.add("FAIL", what, detail)

    def failed(self, what: str | None = None) -> bool:
        return any(line.level == "FAIL" and (what is None or line.what == what) for line in self.lines)

    @property
    def exit_code(self) -> int:
        if self.config_error:
            return 2
        return 1 if self.failed() else 0


class _Warnings(logging.Handler):
    """The server's own start-up warnings (a parent directory others may write, say),
    said while one of its checks runs: each becomes a ``warn`` line of that check."""

    def __init__(self, report: Report, what: str) -> None:
        super().__init__(logging.WARNING)
        self.report = report
        self.what = what

    def emit(self, record: logging.LogRecord) -> None:
        self.report.warn(self.what, record.getMessage())


@contextlib.contextmanager
def _server_warnings(report: Report, what: str) -> Iterator[None]:
    logger = logging.getLogger("psik_api_server")
    handler = _Warnings(report, what)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _absent_parts(path: Path) -> list[Path]:
    """The components of ``path`` that do not exist, deepest first."""
    parts: list[Path] = []
    current = path.absolute()
    while not os.path.lexists(current) and current != current.parent:
        parts.append(current)
        current = current.parent
    return parts


def _existing_ancestor(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


# ---- directories ----


def _check_dir(report: Report, what: str, path: Path, check: Callable[[Path], None]) -> bool:
    """Run the server's own check of a directory it makes at start-up. A directory not
    there yet is made by that check as ``serve`` would make it, and removed again (with
    the parents made for it). True if the directory was there before and passed."""
    from .errors import StartupError

    absent = _absent_parts(path)
    try:
        with _server_warnings(report, what):
            check(path)
    except StartupError as e:
        report.fail(what, str(e))
        return False
    else:
        if absent:
            report.ok(what, f"{path} does not exist yet; serve makes it (mode 0700), as was tried here")
        else:
            report.ok(what, f"{path}: this user's own, mode {stat.S_IMODE(path.stat().st_mode):04o}")
    finally:
        for part in absent:  # deepest first; only what this check made, and only if empty
            with contextlib.suppress(OSError):
                part.rmdir()
    return not absent


def check_directories(report: Report, settings: Settings) -> tuple[bool, bool]:
    """The prefix and the state directory (and the index's own directory, when
    ``database`` puts it elsewhere); whether each was there and passed."""
    from .auth.private_dir import check_private_dir
    from .errors import StartupError
    from .jobs import statedir

    prefix = _check_dir(report, "prefix", settings.prefix, check_private_dir)
    state = _check_dir(report, "state directory", settings.state_directory, statedir.check_state_dir)
    if settings.database is not None:
        parent = settings.database.parent
        if not parent.is_dir() and not os.access(_existing_ancestor(parent), os.W_OK | os.X_OK):
            report.fail(
                "index directory",
                f"{parent} does not exist and cannot be made by this user; make it (mode 0700) "
                "or change database",
            )
    if state:
        try:
            statedir.check_own_files(settings)
        except StartupError as e:
            report.fail("server's files", str(e))
    return prefix, state


def check_free_space(report: Report, settings: Settings, min_free: int) -> None:
    """Free space and inodes on each filesystem the server writes (once each), and a
    probe write where the directory is there already."""
    from .jobs.diskfull import full_place

    places = [("prefix", settings.prefix), ("state directory", settings.state_directory)]
    if settings.database is not None:
        places.append(("index directory", settings.database.parent))
    seen: set[int] = set()
    for what, path in places:
        where = _existing_ancestor(path)
        try:
            st = os.statvfs(where)
            dev = where.stat().st_dev
        except OSError as e:
            report.fail(f"free space ({what})", f"cannot read the filesystem of {where}: {e.strerror or e}")
            continue
        if dev in seen:
            continue
        seen.add(dev)
        label = f"free space ({what})"
        free = st.f_bavail * st.f_frsize
        fix = f"free some space on the filesystem of {where}, or move the {what} to another one"
        if free < min_free:
            report.fail(
                label, f"{_mib(free)} free on the filesystem of {where}, below {_mib(min_free)}; {fix}"
            )
            continue
        if st.f_files > 0 and st.f_favail < MIN_FREE_INODES:
            report.fail(label, f"{st.f_favail} inodes free on the filesystem of {where}; {fix}")
            continue
        if path.is_dir():
            try:
                _probe_write(path)
            except OSError as e:
                if full_place(e) is not None:
                    report.fail(
                        label, f"the filesystem of {where} is full (writing a probe: {e.strerror}); {fix}"
                    )
                else:
                    report.fail(label, f"cannot write in {path}: {e.strerror or e}")
                continue
        report.ok(label, f"{_mib(free)} free on the filesystem of {where}")


def _probe_write(directory: Path) -> None:
    """Write, sync and remove 64 KiB in ``directory`` (a full disk fails it)."""
    fd, name = tempfile.mkstemp(prefix=".psik-api-check.", dir=directory)
    try:
        left = memoryview(b"\0" * (64 << 10))
        while left:  # a nearly full disk writes part, then refuses the rest
            left = left[os.write(fd, left) :]
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


# ---- the index ----


def check_index(report: Report, settings: Settings, prefix_there: bool, state_there: bool) -> None:
    """The index file (mode, sound, a version this server knows, not locked), and the
    locks ``serve`` takes (no other server on the prefix or the index)."""
    from .auth.private_dir import check_private_file
    from .errors import StartupError
    from .jobs.prefix_lock import PrefixLock
    from .jobs.store import _EXIT_CODES_VERSION

    path = settings.database_path
    what = "index"
    if not path.exists():
        report.ok(
            what, f"{path} does not exist yet; serve makes it (and rebuilds it from the job directories)"
        )
    else:
        try:
            check_private_file(path, what)
            with _no_server_on(path) as unused:
                _read_index(report, path, _EXIT_CODES_VERSION, unused)
        except StartupError as e:
            report.fail(what, str(e))
    if not (prefix_there and (state_there or settings.database is not None)):
        return  # nothing there yet: no server can hold it
    lock = PrefixLock(settings.prefix, path)
    try:
        lock.acquire()
    except StartupError as e:
        report.fail("locks", str(e))
    else:
        report.ok("locks", "no other psik-api server serves this prefix or this index")
    finally:
        lock.release()


@contextlib.contextmanager
def _no_server_on(path: Path) -> Iterator[bool]:
    """True if no server uses the index ``path``, kept true through the block: a shared
    lock on the index's lock file (a server starting meanwhile fails to take its
    exclusive one, and says so); False if a server holds it or that cannot be told."""
    from .errors import StartupError
    from .jobs.prefix_lock import lock_path, open_lock_file

    try:
        fd = open_lock_file(lock_path(path))
    except (OSError, StartupError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            held = False
        else:
            held = True
        yield held
    finally:
        os.close(fd)  # and with it the lock


def _read_index(report: Report, path: Path, known_version: int, unused: bool) -> None:
    """Open the index read-only, as the store's own open reads it first (quick_check),
    leaving nothing behind: with no server on it (``unused``) and no ``-wal``/``-shm``
    beside it, as immutable (SQLite makes neither); else, with none on it, the ones this
    open made are removed after. A running server's are never touched."""
    sidecars = [Path(f"{path}{side}") for side in ("-wal", "-shm")]
    there = {p for p in sidecars if os.path.lexists(p)}
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    if unused and not there:
        uri += "&immutable=1"
    try:
        _query_index(report, path, known_version, uri)
    finally:
        if unused:
            for made in set(sidecars) - there:
                with contextlib.suppress(FileNotFoundError):
                    made.unlink()


def _query_index(report: Report, path: Path, known_version: int, uri: str) -> None:
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=2.0)
    except sqlite3.Error as e:
        report.fail("index", f"SQLite cannot open {path}: {e}; check its permissions")
        return
    try:
        verdict = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as e:
        name = getattr(e, "sqlite_errorname", "")
        if name in {"SQLITE_BUSY", "SQLITE_LOCKED"}:
            report.fail(
                "index",
                f"{path} is locked by another process ({e}); stop whatever holds it (fuser {path})",
            )
        elif name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):
            _corrupt(report, path, str(e))
        else:
            report.fail("index", f"SQLite cannot read {path}: {e}")
        return
    finally:
        conn.close()
    if verdict != "ok":
        _corrupt(report, path, " ".join(str(verdict).split())[:200])
    elif tables and "jobs" not in tables:
        report.fail("index", f"{path} is a SQLite file, but not a psik-api index; set database elsewhere")
    elif version > known_version:
        report.warn(
            "index",
            f"{path} is version {version}, newer than this server's ({known_version}): a newer "
            "server wrote it; run that version, or expect what it added to be ignored",
        )
    else:
        report.ok("index", f"{path} opens, is sound, version {version}")


def _corrupt(report: Report, path: Path, why: str) -> None:
    # serve starts: recovery moves the file aside and rebuilds from the job directories.
    report.warn(
        "index",
        f"{path} is damaged ({why}); serve moves it aside ({path.name}.corrupt-<time>) and rebuilds "
        "it from the job directories, losing the Idempotency-Keys and any owner but the local user",
    )


# ---- backends ----


def check_backends(report: Report, settings: Settings) -> None:
    """Each configured backend: psik loads its type, and the checks of its kind."""
    from .backends import DriverContext, driver_class
    from .backends.local.launcher import LocalLauncher

    async def no_jobs(jobid: str) -> Any:
        raise RuntimeError("the check opens no job")

    ctx = DriverContext(settings.prefix, LocalLauncher(settings.launcher_log_path, eager=False), no_jobs)
    interpreter_checked = False
    for name, cfg in settings.backends.items():
        what = f"backend {name} ({cfg.type})"
        cls = driver_class(cfg.type)
        driver = cls(ctx, cfg.type, {name: cfg})
        why = driver.load()
        if why is not None:
            report.fail(what, f"{why}; fix its type, or install what psik needs for it")
            continue
        if cls.runs_here:
            if not interpreter_checked:
                _check_interpreter(report, what)
                interpreter_checked = True
            else:
                report.ok(what, "runs jobs with the interpreter checked above")
        elif cfg.type == "slurm":
            asyncio.run(_check_slurm(report, what, cfg))
        else:
            report.ok(what, "psik loads this type; nothing more is checked for it here")


def _check_interpreter(report: Report, what: str) -> None:
    """The local launcher runs as ``sys.executable -m ...launcher`` and imports psik:
    that interpreter must start and import both."""
    argv = [sys.executable, "-c", "import psik, psik_api_server.backends.local.launcher"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=INTERPRETER_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        report.fail(what, f"the interpreter {sys.executable} cannot run: {e}; reinstall psik-api-server")
        return
    if done.returncode != 0:
        said = " ".join(done.stderr.split())[-300:]
        report.fail(
            what,
            f"the interpreter {sys.executable} cannot import psik and the launcher: {said}; "
            "install psik-api-server into that environment",
        )
        return
    report.ok(what, f"jobs run with {sys.executable}, which starts and imports psik")


async def _check_slurm(report: Report, what: str, cfg: BackendSettings) -> None:
    """The controller answers, and the partition, reservation and account exist."""
    from .backends.slurm.commands import run

    code, out, err = await run("scontrol", "ping", limit=10)
    if code != 0 or "UP" not in out:
        said = " ".join((err or out).split()) or f"scontrol ping exited {code}"
        report.fail(
            what,
            f"the Slurm controller does not answer ({said}); start slurmctld, or point SLURM_CONF "
            "at the cluster's slurm.conf for the server's user",
        )
        return
    report.ok(what, f"the Slurm controller answers ({' '.join(out.split())})")
    if cfg.queue_name:
        await _check_partition(report, what, cfg.queue_name)
    if cfg.reservation_id:
        code, out, err = await run("scontrol", "show", "reservation", cfg.reservation_id, limit=10)
        if code != 0 or not out.strip():
            said = " ".join((err or out).split())
            report.fail(
                what,
                f"reservation {cfg.reservation_id!r}: {said}; fix reservation_id (scontrol show reservation)",
            )
        else:
            report.ok(what, f"reservation {cfg.reservation_id!r} exists")
    if cfg.project_name:
        await _check_account(report, what, cfg.project_name)
    psik_python = cfg.attributes.get("psik_python")
    if psik_python and not os.access(psik_python, os.X_OK):
        report.warn(
            what,
            f"psik_python {psik_python} is not an executable here; it must be one on the compute nodes",
        )


async def _check_partition(report: Report, what: str, partition: str) -> None:
    from .backends.slurm.commands import run

    code, out, err = await run("scontrol", "show", "partition", partition, limit=10)
    if code != 0 or not out.strip():
        said = " ".join((err or out).split())
        code, names, _ = await run("sinfo", "-h", "-o", "%P", limit=10)
        known = ", ".join(n.strip().rstrip("*") for n in names.split() if n.strip()) if code == 0 else ""
        report.fail(
            what,
            f"partition {partition!r}: {said}; set queue_name to one of the cluster's partitions"
            + (f" ({known})" if known else " (sinfo -s lists them)"),
        )
        return
    fields = dict(word.partition("=")[::2] for word in out.split() if "=" in word)
    state = fields.get("State", "?")
    if state != "UP":
        report.warn(what, f"partition {partition!r} is {state}: jobs wait until an admin sets it UP")
    else:
        report.ok(what, f"partition {partition!r} exists and is UP")


async def _check_account(report: Report, what: str, account: str) -> None:
    from .auth.private_dir import user_name
    from .backends.slurm.commands import run

    code, out, _ = await run("scontrol", "show", "config", limit=10)
    storage = next(
        (
            line.partition("=")[2].strip()
            for line in out.splitlines()
            if line.startswith("AccountingStorageType")
        ),
        "",
    )
    if code != 0 or storage in {"", "accounting_storage/none"}:
        report.warn(what, f"account {account!r} not checked: the cluster has no accounting (sacctmgr)")
        return
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        report.warn(
            what, f"account {account!r} not checked: this process's {user_name(os.geteuid())} has no name"
        )
        return
    code, out, err = await run(
        "sacctmgr", "-n", "-P", "show", "assoc", f"account={account}", f"user={user}", "format=account,user",
        limit=15,
    )  # fmt: skip
    if code != 0:
        said = " ".join((err or out).split())[:300]
        report.warn(what, f"account {account!r} not checked: sacctmgr failed ({said})")
    elif not out.strip():
        report.fail(
            what,
            f"account {account!r} has no association for {user}, the server's user: sbatch would refuse "
            f"every job; ask the Slurm admin (sacctmgr add user {user} account={account}), "
            "or fix project_name",
        )
    else:
        report.ok(what, f"account {account!r} is open to {user}")


# ---- token mode: TLS ----


def check_token_mode(report: Report, settings: Settings) -> None:
    """The certified directory ``certified serve`` runs with, its certificates, the CAs
    of ``known_clients/``, and the token signing key."""
    from .auth.certnames import find_config
    from .auth.tokens import TokenAuthority
    from .backends import driver_class
    from .errors import StartupError

    what = "certified"
    config = find_config(settings.certified_config, argv=(), environ=os.environ)
    if config is None:
        report.fail(
            what,
            "no certified config directory with known_clients/ was found (certified_config, "
            "$CERTIFIED_CONFIG, $VIRTUAL_ENV/etc/certified, /etc/certified): every client would be "
            "refused; set certified_config to the directory `certified init --config DIR` made",
        )
    else:
        _check_certified(report, config)
    key = settings.token_key_path
    if key.exists():
        try:
            TokenAuthority(key, settings.token_lifetime, time.time).load()
        except (StartupError, ImportError, OSError) as e:
            report.fail("token key", str(e))
        else:
            report.ok("token key", f"{key} loads")
    else:
        report.ok("token key", f"{key} does not exist yet; serve makes it (mode 0600)")
    if any(driver_class(b.type).runs_here for b in settings.backends.values()):
        report.warn(
            "token mode",
            "a local backend runs every user's jobs as this server's Unix user, who can read the "
            "token key: serve only users who may act as each other",
        )
    report.warn(
        "token mode",
        "TLS comes from certified: run `certified serve --config DIR psik_api_server.main:app "
        "https://HOST:PORT`; plain `psik-api-server serve` answers no job route",
    )


def _check_certified(report: Report, config: Path) -> None:
    from certified.cert import Certified
    from certified.layout import check_config
    from cryptography import x509

    what = "certified"
    warnings, errors = check_config(config)
    for text in warnings:
        report.warn(what, f"{text} (certified's own check of {config})")
    if errors:
        report.fail(
            what,
            f"{config}: " + "; ".join(dict.fromkeys(errors)) + "; make it with `certified init --config DIR`",
        )
        return
    try:
        Certified(config).ssl_context(False)
    except Exception as e:  # whatever certified raises: it could not serve with it either
        report.fail(what, f"{config}: certified serve cannot load its identity: {type(e).__name__}: {e}")
        return
    report.ok(what, f"{config}: id.crt and id.key load into the TLS context certified serve uses")
    now = dt.datetime.now(dt.UTC)
    for name in ("id.crt", "CA.crt"):
        try:
            cert = x509.load_pem_x509_certificate((config / name).read_bytes())
        except (OSError, ValueError) as e:
            report.fail(what, f"{config / name} cannot be read: {e}")
            continue
        _check_dates(report, f"certificate {name}", config / name, cert, now, fatal=True)
    clients = 0
    for path in sorted((config / "known_clients").glob("*.crt")):
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as e:
            report.warn("known_clients", f"{path} cannot be read ({e}): certified serve skips it too")
            continue
        for cert in certs:
            if _check_dates(report, "known_clients", path, cert, now, fatal=False):
                clients += 1
    if clients == 0:
        report.fail(
            "known_clients",
            f"{config / 'known_clients'} has no CA in date: every client would be refused; "
            "add them with `certified add-client NAME CA.crt --config DIR`",
        )
    else:
        report.ok("known_clients", f"{clients} CA certificate(s) in date in {config / 'known_clients'}")


def _check_dates(report: Report, what: str, path: Path, cert: Any, now: dt.datetime, *, fatal: bool) -> bool:
    """Say a certificate not yet or no longer valid (FAIL if ``fatal``, else warn), or
    ending soon (warn); True if it is valid now."""
    say = report.fail if fatal else report.warn
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        say(what, f"{path} is valid only from {start:%Y-%m-%d %H:%M} UTC; check this machine's clock")
        return False
    if now >= end:
        say(what, f"{path} expired on {end:%Y-%m-%d}; renew it (certified init makes a new identity)")
        return False
    if fatal:
        if end - now < EXPIRY_WARNING:
            report.warn(what, f"{path} expires on {end:%Y-%m-%d}; renew it before then")
        else:
            report.ok(what, f"{path} valid until {end:%Y-%m-%d}")
    return True


# ---- the listen address ----


def check_listen(
    report: Report, settings: Settings, host: str | None, port: int | None, uds: str | None
) -> None:
    """Where ``serve`` would listen: allowed (``authz: local``: loopback or a UNIX
    socket) and free, bound here as ``serve`` binds it and let go at once."""
    from .auth.loopback import is_loopback_host
    from .cli import _answers, _tcp_socket
    from .errors import StartupError

    what = "listen"
    if uds:
        path = Path(uds).expanduser()
        if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.lstat().st_mode)):
            report.fail(what, f"{path} exists and is not a socket; serve will not replace it: remove it")
        elif path.exists() and _answers(path):
            report.fail(what, f"{path} is in use by a running server; stop it, or pick another --uds")
        elif not path.parent.is_dir():
            report.fail(what, f"{path.parent} does not exist; make it, or pick another --uds")
        else:
            report.ok(what, f"unix:{path} can be made (owner-only)")
        return
    host = host or settings.host
    port = settings.port if port is None else port
    if settings.authz == "local" and not is_loopback_host(host):
        report.config_error = True
        report.fail(
            what,
            f"authz 'local' serves only loopback or a UNIX socket; serve refuses {host}: listen on "
            "127.0.0.1 (reach it from elsewhere with ssh -L to a UNIX socket), or use authz 'token'",
        )
        return
    where = f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = _tcp_socket(host, port)
    except StartupError as e:
        if "in use" in str(e):
            fix = "stop what listens there (ss -ltnp), or pick another --port"
        elif "Permission denied" in str(e) and 0 < port < 1024:
            # Only root (or CAP_NET_BIND_SERVICE) binds a port below 1024: no host helps.
            fix = (
                "pick a --port of 1024 or above (ports below need root or the "
                "CAP_NET_BIND_SERVICE capability)"
            )
        elif "Permission denied" in str(e):
            fix = "pick another --port, or see what forbids it (SELinux, a firewall)"
        else:
            fix = "pick another --host"
        report.fail(what, f"{e}; {fix}")
        return
    sock.close()
    report.ok(what, f"{where} is free" + (" (serve picks a free port)" if port == 0 else ""))


# ---- the command ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``check`` subcommand's arguments (``--config``, and where ``serve`` would listen)."""
    parser.add_argument(
        "--config", help="config file (default: $PSIK_API_CONFIG, $VIRTUAL_ENV/etc/psik_api.json)"
    )
    parser.add_argument("--host", help="the address serve would listen on (default: the config's)")
    parser.add_argument("--port", type=int, help="the TCP port serve would listen on (default: the config's)")
    parser.add_argument("--uds", help="the UNIX socket serve would listen on instead of TCP")
    parser.add_argument(
        "--min-free",
        type=int,
        default=DEFAULT_MIN_FREE_MIB,
        metavar="MIB",
        help=f"free space (MiB) each filesystem the server writes needs (default {DEFAULT_MIN_FREE_MIB})",
    )


def run(args: argparse.Namespace, out: Any = None) -> int:
    """Run every check, printing one line each to ``out`` (default stdout); the exit
    status (module doc)."""
    from .settings import ConfigError, load_settings

    report = Report(out=sys.stdout if out is None else out)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        report.config_error = True
        report.fail("config", f"{e}; fix the file (serve refuses it too)")
        return report.exit_code
    report.ok("config", f"{settings.source or '(no file: the embedded default)'}, authz {settings.authz}")
    if (notes := settings.notes_line()) is not None:
        report.warn("config", notes)
    if settings.policy is not None:
        _check_policy(report, settings.policy)
    check_listen(report, settings, args.host, args.port, args.uds)
    prefix_there, state_there = check_directories(report, settings)
    check_free_space(report, settings, max(0, args.min_free) << 20)
    check_index(report, settings, prefix_there, state_there)
    check_backends(report, settings)
    if settings.authz == "token":
        check_token_mode(report, settings)
    return report.exit_code


def _check_policy(report: Report, spec: str) -> None:
    from .auth.policy import load_policy
    from .errors import StartupError

    try:
        load_policy(spec)
    except StartupError as e:
        report.fail("policy", f"{e}; install the module, or fix policy")
    else:
        report.ok("policy", f"{spec} loads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="psik-api-server check", description="Whether `psik-api-server serve` would start and work."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
