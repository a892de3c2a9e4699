"""The server makes job directories with ``create_sync`` (one blocking call) instead of
psik's async ``JobManager.create`` (~17 worker-thread trips): the two must make the
same directory, file for file, mode for mode and byte for byte (but for the stamp, the
paths that hold it, and the time of the ``new`` row), so that psik reads it as its own."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from psik.config import Config
from psik.job import Job
from psik.manager import JobManager
from psik.models import BackendConfig
from psik.models import JobSpec as PsikJobSpec

from psik_api_server.backends._psik_job import create_sync


def _tree(base: Path) -> dict[str, tuple[int, bytes | None]]:
    out: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(base.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        if content is not None:
            content = content.replace(base.name.encode(), b"<stamp>")
            if path.name == "status.csv":
                fields = content.split(b",", 1)
                content = b"<time>," + fields[1]
        out[str(path.relative_to(base))] = (stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode), content)
    return out


@pytest.mark.parametrize(
    "spec",
    [
        {"script": "true"},
        {
            "name": "n",
            "script": "#!/bin/sh\necho $X\n",
            "environment": {"X": "1"},
            "inherit_environment": False,
            "resources": {"duration": 3, "process_count": 2},
            "attributes": {"--mem": "1G"},
            "callback": "http://127.0.0.1:9/x",
            "cb_secret": "s",
        },
        {"script": "true", "directory": "<dir>"},
    ],
)
def test_create_sync_makes_the_directory_psik_makes(tmp_path: Path, spec: dict[str, object]) -> None:
    prefix = tmp_path / "jobs"
    prefix.mkdir()
    workdir = tmp_path / "wd"
    workdir.mkdir()
    spec = {k: (str(workdir) if v == "<dir>" else v) for k, v in spec.items()}
    backends = {"default": BackendConfig(type="local", attributes={"--mem": "2G", "--x": "y"})}
    manager = JobManager(Config(prefix=prefix, backends=backends))
    old = os.umask(0o022)
    try:
        theirs = asyncio.run(manager.create(PsikJobSpec.model_validate(spec)))
        ours = create_sync(manager, PsikJobSpec.model_validate(spec))
    finally:
        os.umask(old)
    assert ours != theirs.stamp
    assert _tree(prefix / ours) == _tree(prefix / theirs.stamp)

    # psik reads ours as its own.
    async def load(base: Path) -> Job:
        return await Job(base)

    job = asyncio.run(load(prefix / ours))
    assert job.spec == theirs.spec.model_copy(update={"directory": job.spec.directory})
    assert [(t.jobndx, t.state.value, t.info) for t in job.history] == [
        (t.jobndx, t.state.value, t.info) for t in theirs.history
    ]


def test_two_creates_in_one_millisecond_get_two_stamps(tmp_path: Path) -> None:
    prefix = tmp_path / "jobs"
    prefix.mkdir()
    manager = JobManager(Config(prefix=prefix, backends={"default": BackendConfig(type="local")}))
    ids = {create_sync(manager, PsikJobSpec(script="true")) for _ in range(20)}
    assert len(ids) == 20


def test_a_create_that_fails_leaves_no_directory(tmp_path: Path) -> None:
    prefix = tmp_path / "jobs"
    prefix.mkdir()
    manager = JobManager(Config(prefix=prefix, backends={"default": BackendConfig(type="local")}))
    with pytest.raises(NotADirectoryError):
        create_sync(manager, PsikJobSpec(script="true", directory=str(tmp_path / "missing")))
    assert list(prefix.iterdir()) == []
