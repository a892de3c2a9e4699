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
import sys
from typing import Any

# Each module imports only the standard library at import time (cli.py imports this
# package on every command); the server's own code is imported inside the checks.
from .backends import check_backends
from .index import check_index
from .listen import check_listen
from .places import DEFAULT_MIN_FREE_MIB, check_directories, check_free_space
from .report import Line, Report
from .tls import check_token_mode

__all__ = [
    "Line",
    "Report",
    "add_arguments",
    "check_backends",
    "check_directories",
    "check_free_space",
    "check_index",
    "check_listen",
    "check_token_mode",
    "run",
]


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
    from ..settings import ConfigError, load_settings

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
    from ..auth.policy import load_policy
    from ..errors import StartupError

    try:
        load_policy(spec)
    except StartupError as e:
        report.fail("policy", f"{e}; install the module, or fix policy")
    else:
        report.ok("policy", f"{spec} loads")
