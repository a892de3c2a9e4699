"""Sessions: `nox` runs tests, api_fuzz, lint and typecheck (what CI runs); `nox -s bench`
measures.

Each session installs the three packages from this checkout, so a fresh machine with
Python >= 3.11 needs nothing else: `python3 -m venv .venv && .venv/bin/python -m pip install
nox && .venv/bin/python -m nox` (the README's test command).
"""

from __future__ import annotations

import nox

# 2025.02.09 reads [dependency-groups] from pyproject.toml.
nox.needs_version = ">=2025.2.9"
nox.options.sessions = ["tests", "api_fuzz", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PACKAGES = [
    "-e",
    "packages/psik-api-core",
    "-e",
    "packages/psik-api-server",
    "-e",
    "packages/psik-api-client",
]
PYPROJECT = nox.project.load_toml("pyproject.toml")


def group(name: str) -> tuple[str, ...]:
    """A dependency group of the root pyproject.toml: the one list of each tool's needs."""
    return nox.project.dependency_groups(PYPROJECT, name)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: core, server, client and contract tests on real local jobs,
    and tests/slurm on a real single-node Slurm it brings up (root; skipped, saying why,
    where that cannot be done, unless CI=true)."""
    session.install(*PACKAGES, *group("test"))
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def api_fuzz(session: nox.Session) -> None:
    """schemathesis against the /openapi.json of a real server, in local mode and in token
    mode (mutual TLS): any 5xx, or a status, content type or body the document does not
    declare, fails (tests_fuzz/). Bounded: a few minutes on two cores."""
    session.install(*PACKAGES, *group("fuzz"))
    session.run("pytest", *(session.posargs or ["-q", "tests_fuzz"]))


@nox.session
def slurm(session: nox.Session) -> None:
    """Only the tests on a real single-node Slurm (tests/slurm; `tests` runs them too).
    Needs root: the fixture installs Debian's Slurm packages if missing and brings the
    cluster up with scripts/slurm_cluster.py."""
    session.install(*PACKAGES, *group("test"))
    session.run("pytest", *(session.posargs or ["-q", "tests/slurm"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on every package's src/."""
    session.install(*PACKAGES, *group("typecheck"))
    session.run(
        "mypy",
        "packages/psik-api-core/src",
        "packages/psik-api-server/src",
        "packages/psik-api-client/src",
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Latency and list-cost figures (not in CI: these machines are shared and noisy)."""
    session.install(*PACKAGES)
    session.run("python", "bench/bench_api.py", *session.posargs)
