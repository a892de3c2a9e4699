#!/usr/bin/env python3
"""A single-node Slurm cluster on loopback, for tests and benchmarks.

    python scripts/slurm_cluster.py up     --state DIR   # install if needed, start, wait idle
    python scripts/slurm_cluster.py up     --state DIR --no-accounting   # no slurmdbd/sacct
    python scripts/slurm_cluster.py status --state DIR   # what runs; exit 1 if not up
    python scripts/slurm_cluster.py down   --state DIR   # cancel jobs, stop what `up` started

``up`` is idempotent: daemons whose pid files name a live process are left alone. It
installs Debian's ``munge slurmctld slurmd slurm-client`` with apt when they are missing
(root only; daemons are kept from starting at install by a ``policy-rc.d`` exiting 101),
writes ``DIR/slurm.conf`` and a munge key, starts munged (as user munge), slurmctld and
slurmd with every file under DIR, waits for the node to be idle, and runs a probe job so
that the first scheduling pass (3-4 s after slurmctld starts) is behind us. Clients need
``SLURM_CONF=DIR/slurm.conf`` (printed by ``up``, and in ``DIR/env``).

Accounting (unless ``--no-accounting``), so that ``sacct`` answers for jobs squeue has
forgotten: Debian's ``slurmdbd mariadb-server`` are installed the same way; a MariaDB of
the cluster's own (``DIR/mariadb``: datadir, socket, pid file, log; TCP on 127.0.0.1 at a
port picked once) runs as user mysql; slurmdbd (``DIR/slurmdbd.conf``, mode 600, next to
slurm.conf) stores into it; the cluster is registered (``sacctmgr -i add cluster``) before
slurmctld starts with ``AccountingStorageType=accounting_storage/slurmdbd``. A cluster
already up on another ``slurm.conf`` (e.g. without accounting) has slurmctld and slurmd
restarted on the new one. ``MinJobAge`` is 5 s (Slurm's default: 300 s): a finished job
leaves squeue 5-15 s after its end (slurmctld purges every max(10 s, MinJobAge)), so that
tests see what a server sees of a job that ended long ago.

``down`` stops only the daemons named by DIR's pid files (mariadbd and slurmdbd too),
after cancelling the cluster's jobs. The state survives ``down``/``up`` (Slurm's job ids
go on); ``--fresh`` wipes it.

Stdlib only: it runs before any virtualenv exists. Needs root (the daemons run as root;
a job runs as whoever submits it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
PROGRAMS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo"]
ACCOUNTING_PACKAGES = ["slurmdbd", "mariadb-server"]
ACCOUNTING_PROGRAMS = ["slurmdbd", "mariadbd", "mariadb-install-db", "mariadb", "sacct", "sacctmgr"]
#: Daemons in start order; ``down`` stops them in reverse.
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]
ACCOUNTING_DAEMONS = ("mariadbd", "slurmdbd")
#: slurmdbd's port on 127.0.0.1 (Slurm's default).
DBD_PORT = 6819
SBIN = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]


class ClusterError(Exception):
    """The cluster cannot be brought up here; the message says why."""


def log(msg: str) -> None:
    print(f"slurm_cluster: {msg}", file=sys.stderr, flush=True)


def which(prog: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(prog, path=path)


def missing_programs(accounting: bool = False) -> list[str]:
    wanted = PROGRAMS + (ACCOUNTING_PROGRAMS if accounting else [])
    return [p for p in wanted if which(p) is None]


def cannot_run() -> str | None:
    """Why this machine cannot run the cluster (None: it can, possibly after installing)."""
    if not sys.platform.startswith("linux"):
        return f"Slurm harness needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "Slurm harness needs root (slurmctld, slurmd and munged are started as root)"
    missing = missing_programs()
    if missing and which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install it"
    return None


def install(accounting: bool = False) -> None:
    """apt-get install the Slurm packages (and accounting's) if any program is missing."""
    missing = missing_programs(accounting)
    if not missing:
        return
    packages = PACKAGES + (ACCOUNTING_PACKAGES if accounting else [])
    log(f"installing {' '.join(packages)} ({', '.join(missing)} missing)")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        # Keep the packages' scripts from starting daemons with the system config.
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold"]
    try:
        result = subprocess.run([*apt, "install", "--no-install-recommends", *packages], env=env, check=False)
        if result.returncode != 0:
            # A fresh machine may have no package lists yet.
            subprocess.run([*apt, "update"], env=env, check=True)
            subprocess.run([*apt, "install", "--no-install-recommends", *packages], env=env, check=True)
    except subprocess.CalledProcessError as e:
        raise ClusterError(f"apt-get failed ({e.returncode}) installing {' '.join(packages)}") from e
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = missing_programs(accounting)
    if still:
        raise ClusterError(f"installed {' '.join(packages)} but {', '.join(still)} still missing")


class Cluster:
    """The files of one cluster under its state directory."""

    def __init__(self, state: Path, *, accounting: bool = True) -> None:
        self.state = state.absolute()
        self.accounting = accounting
        self.conf = self.state / "slurm.conf"
        self.dbd_conf = self.state / "slurmdbd.conf"
        # MariaDB's own files, owned by mysql: datadir, socket, pid file, log.
        self.mariadb = self.state / "mariadb"
        self.datadir = self.mariadb / "data"
        self.db_socket = self.mariadb / "mariadbd.sock"
        self.db_secret = self.state / "db.secret"  # "port password", root only
        self.munge = self.state / "munge"
        self.socket = self.munge / "munge.socket.2"
        self.key = self.munge / "munge.key"
        self.ctld = self.state / "ctld"
        self.spool = self.state / "spool"
        self.logs = self.state / "log"

    def pidfile(self, daemon: str) -> Path:
        # munged and mariadbd run as users munge and mysql: their files live in their own directories.
        own = {"munged": self.munge, "mariadbd": self.mariadb}
        return own.get(daemon, self.state) / f"{daemon}.pid"

    def daemons(self) -> list[str]:
        """The daemons of this configuration, in start order."""
        return [d for d in DAEMONS if self.accounting or d not in ACCOUNTING_DAEMONS]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def daemon_env(self) -> dict[str, str]:
        """A daemon's environment: the cluster's, not its starter's. The daemons outlive
        whoever started them (a test that restarts slurmctld): nothing of the starter's
        environment, such as the test session's process marker (tests/leaks.py), may
        make them look like that starter's leftovers."""
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        return {**keep, "SLURM_CONF": str(self.conf)}

    def pid(self, daemon: str) -> int | None:
        """The daemon's pid if its pid file names a live process of that program."""
        try:
            pid = int(self.pidfile(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if running(pid, daemon) else None

    # ---- files ----

    def write_files(self) -> None:
        for d in (self.state, self.ctld, self.spool, self.logs):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        # munged wants its own directories owned by munge and not writable by others.
        self.munge.mkdir(exist_ok=True)
        self.munge.chmod(0o755)
        if not self.key.exists():
            subprocess.run([which("mungekey") or "mungekey", "--create", f"--keyfile={self.key}"], check=True)
        shutil.chown(self.munge, "munge", "munge")
        shutil.chown(self.key, "munge", "munge")
        self.key.chmod(0o400)
        if self.accounting:
            self.mariadb.mkdir(exist_ok=True)
            shutil.chown(self.mariadb, "mysql", "mysql")
            self.mariadb.chmod(0o750)
            self.write_secret(self.dbd_conf, self.slurmdbd_conf())
        self.write_if_changed(self.conf, self.slurm_conf())

    def write_if_changed(self, path: Path, text: str) -> bool:
        """Write ``text`` to ``path`` unless it holds it already; True if it changed."""
        try:
            if path.read_text() == text:
                return False
        except OSError:
            pass
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return True

    def write_secret(self, path: Path, text: str) -> None:
        try:
            if path.read_text() == text and path.stat().st_mode & 0o077 == 0:
                return
        except OSError:
            pass
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)

    def db_port_and_password(self) -> tuple[int, str]:
        """MariaDB's TCP port (a free one, picked once) and the password of its user slurm."""
        try:
            port, password = self.db_secret.read_text().split()
            return int(port), password
        except (OSError, ValueError):
            pass
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        password = secrets.token_hex(16)
        self.write_secret(self.db_secret, f"{port} {password}\n")
        return port, password

    def slurmdbd_conf(self) -> str:
        port, password = self.db_port_and_password()
        return f"""\
# Written by scripts/slurm_cluster.py: slurmdbd of the cluster under {self.state}.
AuthType=auth/munge
AuthInfo=socket={self.socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={DBD_PORT}
SlurmUser=root
PidFile={self.pidfile("slurmdbd")}
LogFile={self.logs / "slurmdbd.log"}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={port}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""

    def accounting_conf(self) -> str:
        if not self.accounting:
            return "AccountingStorageType=accounting_storage/none\n"
        return f"""\
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={DBD_PORT}
AccountingStoragePass={self.socket}
"""

    def slurm_conf(self) -> str:
        s = self.state
        return f"""\
# Written by scripts/slurm_cluster.py: a single-node cluster on loopback under {s}.
ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={os.cpu_count() or 1} RealMemory=1000
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MinJobAge=5
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
{self.accounting_conf()}MailProg=/bin/true
MpiDefault=none
StateSaveLocation={self.ctld}
SlurmdSpoolDir={self.spool}
SlurmctldPidFile={self.pidfile("slurmctld")}
SlurmdPidFile={self.pidfile("slurmd")}
SlurmctldLogFile={self.logs / "slurmctld.log"}
SlurmdLogFile={self.logs / "slurmd.log"}
SlurmctldTimeout=30
SlurmdTimeout=30
"""

    # ---- daemons ----

    def start(self, daemon: str) -> bool:
        """Start ``daemon`` unless it runs; True if this call started it."""
        if self.pid(daemon) is not None:
            return False
        if daemon == "mariadbd":
            self.start_mariadbd()
            return True
        if daemon == "munged":
            argv = [
                "runuser", "-u", "munge", "--", which("munged") or "munged",
                f"--socket={self.socket}",
                f"--key-file={self.key}",
                f"--pid-file={self.pidfile('munged')}",
                f"--log-file={self.munge / 'munged.log'}",
                f"--seed-file={self.munge / 'munged.seed'}",
            ]  # fmt: skip
        elif daemon == "slurmdbd":
            argv = [which("slurmdbd") or "slurmdbd"]  # reads slurmdbd.conf next to $SLURM_CONF
        elif daemon == "slurmctld":
            argv = [which("slurmctld") or "slurmctld", "-i", "-f", str(self.conf)]
        else:
            argv = [which("slurmd") or "slurmd", "-f", str(self.conf), "-N", "localhost"]
        result = subprocess.run(argv, env=self.daemon_env(), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ClusterError(
                f"{daemon} did not start ({result.returncode}): {(result.stderr or result.stdout).strip()}"
                f"; see {self.logs}"
            )
        wait_for(lambda: self.pid(daemon) is not None, 10, f"{daemon}'s pid file {self.pidfile(daemon)}")
        if daemon == "munged":
            wait_for(self.socket.exists, 10, f"munged's socket {self.socket}")
        if daemon == "slurmdbd":
            wait_for(
                lambda: self.slurm("sacctmgr", "-n", "list", "cluster").returncode == 0,
                60,
                "slurmdbd to answer",
            )
        return True

    def stale(self, daemon: str) -> bool:
        """True if ``daemon`` runs on an older configuration than its file's."""
        if daemon not in ("slurmdbd", "slurmctld", "slurmd"):
            return False
        conf = self.dbd_conf if daemon == "slurmdbd" else self.conf
        try:
            return (
                self.pid(daemon) is not None and conf.stat().st_mtime > self.pidfile(daemon).stat().st_mtime
            )
        except OSError:
            return False

    # ---- accounting ----

    def sql(self, statement: str) -> subprocess.CompletedProcess[str]:
        """Run SQL as MariaDB's root (unix socket authentication: we are root)."""
        argv = [which("mariadb") or "mariadb", "--no-defaults", f"--socket={self.db_socket}", "-uroot", "-e"]
        return subprocess.run([*argv, statement], capture_output=True, text=True, timeout=30, check=False)

    def start_mariadbd(self) -> None:
        """Initialise the datadir once, start mariadbd (it does not daemonise: setsid -f),
        and (re)grant user slurm its database."""
        port, password = self.db_port_and_password()
        log_file = self.mariadb / "mariadbd.log"
        if not self.datadir.exists():
            tmp = self.mariadb / "data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            r = subprocess.run(
                [
                    which("mariadb-install-db") or "mariadb-install-db", "--no-defaults", "--user=mysql",
                    f"--datadir={tmp}", "--auth-root-authentication-method=socket", "--skip-test-db",
                    "--skip-name-resolve",
                ],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if r.returncode != 0:
                raise ClusterError(
                    f"mariadb-install-db failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}"
                )
            tmp.rename(self.datadir)
        subprocess.run(
            [
                which("setsid") or "setsid", "-f", which("mariadbd") or "mariadbd",
                "--no-defaults", "--user=mysql",
                f"--datadir={self.datadir}", f"--socket={self.db_socket}",
                f"--pid-file={self.pidfile('mariadbd')}", f"--log-error={log_file}",
                "--bind-address=127.0.0.1", f"--port={port}", "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M", "--innodb-lock-wait-timeout=900",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
            env=self.daemon_env(),
        )  # fmt: skip
        wait_for(lambda: self.pid("mariadbd") is not None, 30, f"mariadbd's pid file (log: {log_file})")
        wait_for(lambda: self.sql("SELECT 1").returncode == 0, 30, f"mariadbd to answer (log: {log_file})")
        grant = (
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
            f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        r = self.sql(grant)
        if r.returncode != 0:
            raise ClusterError(f"granting user slurm its database failed: {r.stderr.strip()}")

    def register(self) -> None:
        """Add the cluster to accounting unless it is known (slurmctld wants it there)."""
        r = self.slurm("sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster")
        if r.returncode == 0 and "test" in r.stdout.split():
            return
        r = self.slurm("sacctmgr", "-i", "add", "cluster", "test")
        if r.returncode != 0 and "already exists" not in (r.stdout + r.stderr).lower():
            raise ClusterError(f"sacctmgr add cluster test failed: {(r.stderr or r.stdout).strip()}")

    def stop(self, daemon: str) -> bool:
        pid = self.pid(daemon)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        # The process, not its pid file: daemons remove that before they are done (saving
        # state, closing ports a restart needs).
        if not poll(lambda: not running(pid, daemon), 20):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            poll(lambda: not running(pid, daemon), 5)
        self.pidfile(daemon).unlink(missing_ok=True)
        return True

    def slurm(self, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )

    def node_state(self) -> str:
        r = self.slurm("sinfo", "-h", "-N", "-o", "%T")
        return r.stdout.strip() if r.returncode == 0 else f"(sinfo: {r.stderr.strip()})"

    def job_ids(self) -> list[str]:
        r = self.slurm("squeue", "-h", "-o", "%i")
        return r.stdout.split() if r.returncode == 0 else []

    def probe(self) -> None:
        """A trivial job, waited for: the first scheduling pass is then behind us."""
        r = self.slurm("sbatch", "--parsable", "--job-name=probe", "-o", "/dev/null", "--wrap", "true")
        if r.returncode != 0:
            raise ClusterError(f"probe job refused: {r.stderr.strip()}")
        jobid = r.stdout.strip().split(";")[0]
        wait_for(lambda: jobid not in self.job_ids(), 60, f"probe job {jobid} to finish")


def running(pid: int, daemon: str) -> bool:
    """True if ``pid`` is a live (not zombie) process of the program ``daemon``."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and daemon.startswith(comm[:15])


def poll(cond: object, timeout: float, step: float = 0.1) -> bool:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def wait_for(cond: object, timeout: float, what: str) -> None:
    if not poll(cond, timeout):
        raise ClusterError(f"timed out after {timeout:g} s waiting for {what}")


def up(cluster: Cluster, *, fresh: bool = False) -> list[str]:
    """Bring the cluster up; the daemons this call started (or restarted on a new
    configuration)."""
    why = cannot_run()
    if why is not None:
        raise ClusterError(why)
    install(cluster.accounting)
    if fresh:
        down(cluster)
        shutil.rmtree(cluster.state, ignore_errors=True)
    cluster.write_files()
    started = []
    for d in cluster.daemons():
        if cluster.stale(d):
            log(f"restarting {d} on its new configuration")
            cluster.stop(d)
        if d == "slurmctld" and cluster.accounting and cluster.pid(d) is None:
            cluster.register()
        if cluster.start(d):
            started.append(d)
    try:
        wait_for(lambda: cluster.node_state() == "idle" or bool(cluster.job_ids()), 30, "the node to be idle")
        if started:
            cluster.probe()
    except ClusterError as e:
        raise ClusterError(f"{e} (node: {cluster.node_state()}; logs in {cluster.logs})") from None
    (cluster.state / "env").write_text(f"SLURM_CONF={cluster.conf}\n")
    return started


def down(cluster: Cluster) -> list[str]:
    """Cancel the cluster's jobs and stop the daemons its pid files name."""
    if cluster.pid("slurmctld") is not None:
        ids = cluster.job_ids()
        if ids:
            cluster.slurm("scancel", *ids)
            poll(lambda: not cluster.job_ids(), 10)
    return [d for d in reversed(DAEMONS) if cluster.stop(d)]


def status(cluster: Cluster) -> bool:
    running = {d: cluster.pid(d) for d in cluster.daemons()}
    for d, pid in running.items():
        print(f"{d}: {'pid ' + str(pid) if pid else 'not running'}")
    if all(running.values()):
        print(f"node: {cluster.node_state()}")
        print(f"SLURM_CONF={cluster.conf}")
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state", required=True, type=Path, help="the cluster's state directory")
    parser.add_argument("--fresh", action="store_true", help="up: wipe the state directory first")
    parser.add_argument(
        "--no-accounting",
        dest="accounting",
        action="store_false",
        help="up: no slurmdbd/MariaDB (sacct says accounting storage is disabled)",
    )
    args = parser.parse_args(argv)
    cluster = Cluster(args.state, accounting=args.accounting)
    try:
        if args.action == "up":
            started = up(cluster, fresh=args.fresh)
            log(f"up ({'started ' + ', '.join(started) if started else 'already running'})")
            print(f"SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            stopped = down(cluster)
            log(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
        else:
            return 0 if status(cluster) else 1
    except ClusterError as e:
        log(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
