"""Sessions: `nox` runs tests, api_fuzz, lint and typecheck (what CI runs); `nox -s bench`
measures.

Each session installs the three packages from this checkout, so a fresh machine with
Python >= 3.11 needs nothing else: `python3 -m venv .venv && .venv/bin/python -m pip install
nox && .venv/bin/python -m nox` (the README's test command).

Every session installs the versions uv.lock holds, so a fresh clone tests what CI tested.
The sessions keep nox's default virtualenv backend and pip as the installer: `uv export`
turns the lock into a requirements file of exact pins (one per package, for this session's
dependency group, environment markers kept), and pip installs it with `--no-deps`, so
nothing outside the lock comes in; then the workspace packages, editable, also `--no-deps`
(their dependencies are in the export). Why not `uv sync` into the session's venv: by
default it removes what the lock does not name (pip, which nox's `session.install` runs)
and it fetches past pip's configuration (its indexes, certificates); exporting needs only
the lock file, no network. `--frozen` exports the lock as it is; `nox -s lint` checks that
it is current (`uv lock --check`). The uv that exports is the one the root pyproject
requires (`tool.uv.required-version`), installed into each session from PyPI.
"""

from __future__ import annotations

from pathlib import Path

import nox

# The oldest nox these sessions were run with (the lock has the one CI runs: .ci/run).
nox.needs_version = ">=2025.2.9"
nox.options.sessions = ["tests", "api_fuzz", "workflows", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PACKAGES = [
    "-e",
    "packages/psik-api-core",
    "-e",
    "packages/psik-api-server",
    "-e",
    "packages/psik-api-client",
    "-e",
    "packages/snakemake-executor-plugin-psik-api",
]
PYPROJECT = nox.project.load_toml("pyproject.toml")
# "uv==0.13.10": the uv that wrote uv.lock (uv itself refuses to run as another version).
UV = "uv" + PYPROJECT["tool"]["uv"]["required-version"]


def install_locked(session: nox.Session, *groups: str, packages: bool = True) -> None:
    """Install the root pyproject's dependency `groups` (each tool's needs, listed once)
    and, with `packages`, the three workspace packages and their dependencies: every
    third-party package at the version uv.lock holds."""
    session.install(UV)
    # Beside the venv, not in session.create_tmp(): that would set TMPDIR for the tests too.
    requirements = Path(session.virtualenv.location) / "locked-requirements.txt"
    flag = "--group" if packages else "--only-group"  # --only-group: no workspace package
    selection = [arg for group in groups for arg in (flag, group)]
    if packages:
        selection += ["--all-packages", "--no-emit-workspace"]
    session.run(
        "uv",
        "export",
        "--frozen",
        "--quiet",
        "--no-hashes",  # versions are the pin: a site mirror may serve its own build of one
        "--no-header",
        "--no-annotate",
        "--no-default-groups",
        *selection,
        "--output-file",
        str(requirements),
    )
    session.install("--no-deps", "-r", str(requirements))
    if packages:
        session.install("--no-deps", *PACKAGES)
    session.run("python", "-m", "pip", "check")  # the lock left nothing out


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: core, server, client and contract tests on real local jobs,
    and tests/slurm on a real single-node Slurm it brings up (root; skipped, saying why,
    where that cannot be done, unless CI=true)."""
    install_locked(session, "test")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def api_fuzz(session: nox.Session) -> None:
    """schemathesis against the /openapi.json of a real server, in local mode and in token
    mode (mutual TLS): any 5xx, or a status, content type or body the document does not
    declare, fails (tests_fuzz/). Bounded: a few minutes on two cores."""
    install_locked(session, "fuzz")
    session.run("pytest", *(session.posargs or ["-q", "tests_fuzz"]))


@nox.session
def workflows(session: nox.Session) -> None:
    """The integrations workflow tools load by name, run by those tools' own tests against
    a real server: the Snakemake executor plugin (Snakemake's bundled test workflows) and
    the Parsl provider (Parsl's provider checks, and a program of HighThroughputExecutor
    apps); each also once on the real Slurm cluster (tests_workflows/)."""
    install_locked(session, "workflows")
    session.run("pytest", *(session.posargs or ["-q", "tests_workflows"]))


@nox.session
def slurm(session: nox.Session) -> None:
    """Only the tests on a real single-node Slurm (tests/slurm; `tests` runs them too).
    Needs root: the fixture installs Debian's Slurm packages if missing and brings the
    cluster up with scripts/slurm_cluster.py."""
    install_locked(session, "test")
    session.run("pytest", *(session.posargs or ["-q", "tests/slurm"]))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (check and format), and uv.lock current with the pyproject files: a dependency
    changed without `uv lock` fails here."""
    install_locked(session, "lint", packages=False)
    session.run("uv", "lock", "--check")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on every package's src/ (with the workflow tools installed: the
    integrations are checked against their real interfaces)."""
    install_locked(session, "typecheck", "workflows")
    session.run(
        "mypy",
        "packages/psik-api-core/src",
        "packages/psik-api-server/src",
        "packages/psik-api-client/src",
        "packages/snakemake-executor-plugin-psik-api/src",
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Every figure behind the README's performance sentences beside its floor, measured in
    one run (bench/run_all.py: about 15 minutes on 2 cores; `-- --full`, `-- --only NAME`,
    `-- --smoke`); the table goes to bench/results/summary.md. Not in CI: these machines
    are shared and noisy. The test group: bench_store drives the app through asgi-lifespan."""
    install_locked(session, "test")
    session.run("python", "bench/run_all.py", *session.posargs)
