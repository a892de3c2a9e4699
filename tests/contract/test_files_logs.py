"""Job files and logs, the real client against the real server running real jobs, in all
four client modes (see tests/conftest.py): stage inputs, run, read the logs, fetch the
outputs. Then the README's staging examples (curl, Python, the command line), as written."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from psik_api_client import (
    Client,
    FileInfo,
    FileListing,
    InvalidRequestError,
    JobState,
    NotFoundError,
    PreconditionFailedError,
)
from psik_api_client.cli import main as psik_api
from psik_api_server.settings import Settings
from support import LiveServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def local(tmp_path: Path) -> Path:
    """The client's side: a directory apart from the server's prefix and index."""
    path = tmp_path / "local"
    path.mkdir()
    return path


README = Path(__file__).parents[2] / "README.md"
EXAMPLE_JOBID = "1693992878.203"

#: Reads its staged input, writes outputs in a subdirectory, and says so on both streams.
STAGED = """\
cat data.txt
mkdir -p out
wc -c < data.txt > out/count.txt
head -c 3000000 /dev/urandom > out/noise.bin
echo done >&2
"""


async def test_stage_start_wait_read_download_list(api: Any, settings: Settings, local: Path) -> None:
    job = await api.create({"name": "staged", "script": STAGED})
    assert job.state is JobState.new
    (local / "data.txt").write_bytes(b"hello from data.txt\n")
    info = await api.upload(job.jobid, local / "data.txt", "data.txt")
    assert isinstance(info, FileInfo)
    assert (info.name, info.path, info.type, info.size) == ("data.txt", "data.txt", "file", 20)
    await api.start(job.jobid)
    done = await api.wait(job.jobid, timeout=60)
    assert done.state is JobState.completed, await api.logs(job.jobid)

    assert await api.read_log(job.jobid, "stdout") == b"hello from data.txt\n"
    assert await api.read_log(job.jobid, "stdout.1", offset=6) == b"from data.txt\n"
    logs = await api.logs(job.jobid)
    assert logs["stdout.1"] == "hello from data.txt\n" and logs["stderr.1"] == "done\n"

    count = await api.download(job.jobid, "out/count.txt", local / "count.txt")
    assert count == local / "count.txt" and count.read_text().strip() == "20"
    noise = await api.download(job.jobid, "out/noise.bin", local)
    assert noise == local / "noise.bin" and noise.stat().st_size == 3_000_000
    on_server = (settings.prefix / job.jobid / "work" / "out" / "noise.bin").read_bytes()
    assert hashlib.sha256(noise.read_bytes()).digest() == hashlib.sha256(on_server).digest()
    assert sorted(p.name for p in local.iterdir()) == ["count.txt", "data.txt", "noise.bin"]  # no .part

    top = await api.list_files(job.jobid)
    assert isinstance(top, FileListing) and top.path == ""
    assert [(e.path, e.type) for e in top.entries] == [("data.txt", "file"), ("out", "dir")]
    everything = await api.list_files(job.jobid, recursive=True)
    assert [e.path for e in everything.entries] == ["data.txt", "out", "out/count.txt", "out/noise.bin"]
    assert next(e for e in everything.entries if e.path == "out/noise.bin").size == 3_000_000
    sub = await api.list_files(job.jobid, "out")
    assert [e.name for e in sub.entries] == ["count.txt", "noise.bin"]


async def test_upload_no_overwrite_and_delete(api: Any, local: Path) -> None:
    job = await api.create({"script": "true"})
    created = await api.upload(job.jobid, b"first", "in/a.txt", overwrite=False)
    assert created.size == 5
    with pytest.raises(PreconditionFailedError):
        await api.upload(job.jobid, b"second", "in/a.txt", overwrite=False)
    assert (await api.download(job.jobid, "in/a.txt", local / "a")).read_bytes() == b"first"
    replaced = await api.upload(job.jobid, b"third!", "in/a.txt")  # overwrite=True, the default
    assert replaced.size == 6
    await api.delete_file(job.jobid, "in/a.txt")
    with pytest.raises(NotFoundError):
        await api.download(job.jobid, "in/a.txt", local / "gone")
    assert not (local / "gone").exists() and not (local / "gone.part").exists()
    await api.delete_file(job.jobid, "in", recursive=True)
    assert (await api.list_files(job.jobid)).entries == []


async def test_upload_dir_keeps_the_tree(api: Any, local: Path) -> None:
    (local / "inputs" / "sub").mkdir(parents=True)
    (local / "inputs" / "a.txt").write_text("a")
    (local / "inputs" / "sub" / "b.txt").write_text("bb")
    job = await api.create({"script": "cat stage/a.txt stage/sub/b.txt"})
    infos = await api.upload_dir(job.jobid, local / "inputs", "stage")
    assert [(i.path, i.size) for i in infos] == [("stage/a.txt", 1), ("stage/sub/b.txt", 2)]
    await api.start(job.jobid)
    assert (await api.wait(job.jobid, timeout=60)).state is JobState.completed
    assert await api.read_log(job.jobid, "stdout") == b"abb"


async def test_a_stale_part_is_replaced_by_the_file_as_it_is_now(api: Any, local: Path) -> None:
    job = await api.create({"script": "true"})
    await api.upload(job.jobid, b"0123456789" * 1000, "data.bin")
    (local / "data.bin.part").write_bytes(b"junk")
    (local / "data.bin.part.etag").write_text('"not-the-etag"\n')
    path = await api.download(job.jobid, "data.bin", local / "data.bin")  # If-Range fails: 200
    assert path.read_bytes() == b"0123456789" * 1000
    assert sorted(p.name for p in local.iterdir()) == ["data.bin"]


async def test_a_directory_is_not_downloaded_as_a_file(api: Any, local: Path) -> None:
    job = await api.create({"script": "true"})
    await api.upload(job.jobid, b"x", "out/a.txt")
    with pytest.raises(InvalidRequestError, match="'out' is a directory"):
        await api.download(job.jobid, "out", local / "out")
    with pytest.raises(InvalidRequestError, match="ends with '/'"):  # refused before sending
        await api.download(job.jobid, "out/", local / "out")
    assert list(local.iterdir()) == []


async def test_a_large_file_not_hashed_yet_is_checked_by_its_size(
    api: Any, settings: Settings, local: Path
) -> None:
    """The job wrote it (nothing hashed it yet): the first download has no checksum to
    check, and still arrives whole."""
    job = await api.create({"script": "true"})
    await api.upload(job.jobid, b"", "big.bin")
    data = os.urandom(3 << 20)
    (settings.prefix / job.jobid / "work" / "big.bin").write_bytes(data)
    path = await api.download(job.jobid, "big.bin", local / "big.bin")
    assert path.read_bytes() == data
    assert sorted(p.name for p in local.iterdir()) == ["big.bin"]


async def test_follow_log_until_the_job_ends(api: Any) -> None:
    job = await api.submit({"script": "echo one; sleep 0.5; echo two; sleep 0.3; echo three"})
    chunks = await api.follow_log(job.jobid, "stdout")  # from before the log exists to the job's end
    assert b"".join(chunks) == b"one\ntwo\nthree\n"
    assert (await api.state(job.jobid)).state is JobState.completed
    assert b"".join(await api.follow_log(job.jobid, "stdout.1", offset=4)) == b"two\nthree\n"
    assert b"".join(await api.follow_log(job.jobid, "stdout", tail=1)) == b"three\n"


async def test_read_log_tail_and_bad_names(api: Any) -> None:
    job = await api.submit({"script": "for i in 1 2 3 4 5; do echo line $i; done"})
    await api.wait(job.jobid, timeout=60)
    assert await api.read_log(job.jobid, "stdout", tail=2) == b"line 4\nline 5\n"
    with pytest.raises(NotFoundError):
        await api.read_log(job.jobid, "stderr.7")
    with pytest.raises(InvalidRequestError):  # refused before it could become another route
        await api.read_log(job.jobid, "../status.csv")


# ---- the README's staging examples, as written ----


def _blocks(fence: str) -> list[str]:
    """The README's code blocks opened by ``fence`` (e.g. "```python")."""
    blocks: list[str] = []
    current: list[str] | None = None  # the lines of an open block, if it is one of ours
    opened = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if opened and current is not None:
                blocks.append("\n".join(current))
            opened = not opened
            current = [] if opened and line.strip() == fence else None
        elif current is not None:
            current.append(line)
    return blocks


def _staging_block(fence: str, marker: str) -> str:
    return next(b for b in _blocks(fence) if marker in b)


def _wait_final(url: str, jobid: str) -> None:
    with Client(url) as api:
        api.wait(jobid, timeout=60)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_staging_with_curl(live_app: LiveServer, tmp_path: Path) -> None:
    lines = [line.split("  # ")[0].strip() for line in _staging_block("```", "--upload-file").splitlines()]
    assert len(lines) == 6
    (tmp_path / "data.txt").write_text("hello from data.txt\n")
    jobid = ""
    for line in lines:
        cmd = line.replace("http://127.0.0.1:8000", live_app.url).replace(EXAMPLE_JOBID, jobid)
        if "/logs/" in cmd:
            _wait_final(live_app.url, jobid)
        out = subprocess.run(
            ["bash", "-c", cmd + " -sS -w '\\n%{http_code}'"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert out.returncode == 0, (cmd, out.stderr)
        body, _, status = out.stdout.rpartition("\n")
        assert status in {"200", "201"}, (cmd, status, body)
        if "/jobs/new" in cmd:
            jobid = json.loads(body)["jobid"]
        elif "--upload-file" in cmd:
            assert json.loads(body)["path"] == "data.txt"
        elif "/logs/" in cmd:
            assert body == "hello from data.txt\n"
        elif cmd.rstrip().endswith("/files"):
            assert [e["path"] for e in json.loads(body)["entries"]] == ["data.txt"]
    assert (tmp_path / "copy.txt").read_text() == "hello from data.txt\n"


def test_readme_staging_in_python(live_app: LiveServer, tmp_path: Path) -> None:
    source = _staging_block("```python", "api.upload(")
    env = {**os.environ, "PSIK_API_URL": live_app.url}
    env.pop("PSIK_API_UDS", None)
    source = source.replace("http://127.0.0.1:8000", live_app.url)
    out = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "hello from data.txt"
    assert (tmp_path / "count.txt").read_text().strip() == "20"


def test_readme_staging_with_the_cli(
    live_app: LiveServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PSIK_API_URL", live_app.url)
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    (tmp_path / "data.txt").write_text("hello from data.txt\n")
    (tmp_path / "job.json").write_text(json.dumps({"name": "staged", "script": "cat data.txt"}))
    block = _staging_block("```", "$ psik-api upload")
    jobid = ""
    seen: dict[str, bytes] = {}
    for line in block.splitlines():
        argv = shlex.split(line.removeprefix("$ ").split("  # ")[0])
        assert argv[0] == "psik-api"
        argv = [jobid if arg == EXAMPLE_JOBID else arg for arg in argv[1:]]
        status = psik_api(argv)
        out = capsysbinary.readouterr().out
        assert status == 0, (argv, out)
        if argv[0] == "create":
            jobid = out.decode().strip()
        seen[argv[0]] = out
    assert seen["wait"] == f"{jobid} completed\nhello from data.txt\n".encode()
    assert seen["logs"] == b"hello from data.txt\n"
    assert b"data.txt" in seen["files"]
    assert (tmp_path / "copy.txt").read_text() == "hello from data.txt\n"
