"""Each configured backend: psik loads its type; local: the interpreter jobs run with;
Slurm: the controller, the partition, the reservation and the account."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from .report import Report

if TYPE_CHECKING:
    from ..settings import BackendSettings, Settings

#: Seconds the interpreter check may take (it imports psik: ~0.5 s).
INTERPRETER_TIMEOUT = 60.0


def check_backends(report: Report, settings: Settings) -> None:
    """Each configured backend: psik loads its type, and the checks of its kind."""
    from ..backends import DriverContext, driver_class
    from ..backends.local.launcher import LocalLauncher

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
    from ..backends.slurm.commands import run

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
    from ..backends.slurm.commands import run

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
    from ..auth.private_dir import user_name
    from ..backends.slurm.commands import run

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
