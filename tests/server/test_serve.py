"""The server as users start it: `psik-api-server serve` on its embedded default, and
the seed README's `uvicorn psik_api_server.main:app` (the original answered 501 there)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from psik_api_server.settings import default_state_dir
from support import free_port, wait_healthy

BIN = Path(sys.executable).parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV", "PSIK_CONFIG"}}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # where the index and its lock go
    env.update(extra)
    return env


@contextmanager
def _running(argv: list[str], env: dict[str, str], url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, lambda: proc.stdout.read().decode() if proc.stdout else "")
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _run_a_job(url: str) -> dict[str, object]:
    r = httpx.post(f"{url}/v1/jobs", json={"name": "hello", "script": "echo hello"})
    assert r.status_code == 201, r.text
    jobid = r.json()["jobid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job: dict[str, object] = httpx.get(f"{url}/v1/jobs/{jobid}").json()
        if job["state"] == "completed":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {jobid} did not complete")


def test_serve_on_the_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _running([str(BIN / "psik-api-server"), "serve", "--port", str(port)], _env(tmp_path), url):
        job = _run_a_job(url)
        jobs_dir = tmp_path / "data" / "psik_api" / "jobs"
        assert (jobs_dir / str(job["jobid"]) / "log" / "stdout.1").read_text() == "hello\n"
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # as _env gave the server
        index = default_state_dir(jobs_dir) / "index.sqlite"  # the server's own state directory
        # Other users of a login node can read neither the jobs nor who owns them.
        assert stat.S_IMODE(jobs_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(index.stat().st_mode) == 0o600


def test_seed_readme_uvicorn_main_app_serves_job_routes(tmp_path: Path) -> None:
    cfg = tmp_path / "psik_api.json"
    prefix = tmp_path / "psik_jobs"
    cfg.write_text(
        json.dumps({"backends": {"default": {"prefix": str(prefix), "backend": {"type": "local"}}}})
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "uvicorn"), "psik_api_server.main:app", "--port", str(port), "--log-level", "warning"]
    with _running(argv, _env(tmp_path, PSIK_API_CONFIG=str(cfg)), url):
        job = _run_a_job(url)
        assert (prefix / str(job["jobid"]) / "spec.json").is_file()


def test_ignored_config_keys_are_reported_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "psik_api.json"
    seed = {"prefix": str(tmp_path / "jobs"), "psik_path": "/x/psik", "rc_path": "/x/rc", "backend": {}}
    cfg.write_text(json.dumps({"backends": {"default": seed}, "colour": "blue"}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "psik-api-server"), "serve", "--config", str(cfg), "--port", str(port)]
    with _running(argv, _env(tmp_path), url) as proc:
        proc.terminate()
        out = proc.stdout.read().decode() if proc.stdout else ""
    lines = [line for line in out.splitlines() if "psik_path" in line]
    assert len(lines) == 1, out
    assert str(cfg) in lines[0] and "rc_path" in lines[0] and "colour" in lines[0]


def test_broken_config_stops_start_up_with_file_and_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"backends": {"default": {"type": "local",}}}')
    proc = subprocess.run(
        [str(BIN / "psik-api-server"), "serve", "--config", str(cfg)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr and "not valid JSON" in proc.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_cli_help(flag: str) -> None:
    out = subprocess.run(
        [str(BIN / "psik-api-server"), "serve", flag], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--uds" in out.stdout


def test_a_port_in_use_fails_start_up_before_anything_is_on_disk(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(BIN / "psik-api-server"), "serve", "--port", str(port)],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 3, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists(), list((tmp_path / "data").rglob("*"))
    assert not (tmp_path / "state").exists(), list((tmp_path / "state").rglob("*"))


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701])
def test_a_prefix_others_can_enter_stops_start_up(tmp_path: Path, mode: int) -> None:
    prefix = tmp_path / "data" / "psik_api" / "jobs"
    prefix.mkdir(parents=True)
    prefix.chmod(mode)
    proc = subprocess.run(
        [str(BIN / "psik-api-server"), "serve", "--port", str(free_port())],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1, proc.stderr
    assert f"mode {mode:04o}" in lines[0] and f"chmod 700 {prefix}" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert stat.S_IMODE(prefix.stat().st_mode) == mode  # not "fixed" behind the user's back
    assert not (tmp_path / "state").exists(), list((tmp_path / "state").rglob("*"))  # no index made


def test_uvicorn_main_app_refuses_a_group_readable_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "psik_jobs"
    prefix.mkdir(mode=0o750)
    prefix.chmod(0o750)
    cfg = tmp_path / "psik_api.json"
    cfg.write_text(json.dumps({"prefix": str(prefix), "backends": {"default": {"type": "local"}}}))
    argv = [str(BIN / "uvicorn"), "psik_api_server.main:app", "--port", str(free_port())]
    proc = subprocess.run(
        argv, env=_env(tmp_path, PSIK_API_CONFIG=str(cfg)), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "mode 0750" in proc.stderr and f"chmod 700 {prefix}" in proc.stderr, proc.stderr


def _public_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_uvicorn_main_app_on_all_interfaces_answers_only_loopback(tmp_path: Path) -> None:
    # The app itself refuses a request that arrives on a public address, even when
    # uvicorn is told to believe X-Forwarded-For from anyone.
    public = _public_address()
    if public is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: this machine has no non-loopback address to test with")
        pytest.skip("this machine has no non-loopback address to connect to")
    cfg = tmp_path / "psik_api.json"
    cfg.write_text(json.dumps({"prefix": str(tmp_path / "jobs"), "backends": {"default": {"type": "local"}}}))
    port = free_port()
    argv = [
        str(BIN / "uvicorn"),
        "psik_api_server.main:app",
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--forwarded-allow-ips",
        "*",
        "--log-level",
        "warning",
    ]
    with _running(argv, _env(tmp_path, PSIK_API_CONFIG=str(cfg)), f"http://127.0.0.1:{port}"):
        for headers in [{}, {"X-Forwarded-For": "127.0.0.1", "Host": f"127.0.0.1:{port}"}]:
            r = httpx.post(f"http://{public}:{port}/v1/jobs", json={"script": "true"}, headers=headers)
            assert r.status_code == 403, r.text
            assert r.json()["code"] == "forbidden"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs").json()["items"] == []


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connections_serve_binds_get_tcp_nodelay(host: str) -> None:
    """The socket `serve` binds before uvicorn starts must be one asyncio knows for TCP:
    it sets TCP_NODELAY only then, and without it Nagle holds every response's body
    until the client's delayed ACK (40 ms per request on a keep-alive connection)."""
    import asyncio

    from psik_api_server.cli import _tcp_socket

    try:
        sock = _tcp_socket(host, 0)
    except Exception as e:  # a machine without IPv6 on loopback
        pytest.skip(f"cannot bind {host}: {e}")
    seen: list[int] = []

    async def main() -> None:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    try:
        asyncio.run(main())
    finally:
        sock.close()
    assert seen and seen[0] != 0, "accepted connections have Nagle on"


def _interrupt(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Ctrl-C as a terminal sends it: SIGINT to the server's whole process group (its
    launcher included); its exit status and what it wrote."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    return proc.returncode, err.decode(errors="replace")


def test_ctrl_c_ends_a_serving_server_without_a_traceback(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "psik-api-server"), "serve", "--port", str(port)]
    proc = subprocess.Popen(
        argv, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_healthy(url, proc, lambda: "")
        _run_a_job(url)  # the launcher runs: it gets the Ctrl-C too
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        raise
    status, err = _interrupt(proc)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert status == 130, err  # ended by the Ctrl-C it was sent, and said so to the shell
    assert "Application shutdown complete" in err, err


@pytest.mark.parametrize("after", ["limits:", "starting on", "Waiting for application startup"])
def test_ctrl_c_during_start_up_ends_it_without_a_traceback(tmp_path: Path, after: str) -> None:
    proc = subprocess.Popen(
        [str(BIN / "psik-api-server"), "serve", "--port", str(free_port())],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    # Once start-up has said `after` (the settings read, the socket bound, the lifespan
    # begun: the index and the prefix next). Earlier, the interpreter itself may still be
    # starting, and a Ctrl-C there is Python's to report, not ours.
    assert proc.stderr is not None
    said = b""
    while after.encode() not in said:
        line = proc.stderr.readline()
        if not line:
            break
        said += line
    status, err = _interrupt(proc)
    err = said.decode(errors="replace") + err
    assert after in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert status == 130, (status, err)


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (the job launcher runs in its own session,
    out of reach of a Ctrl-C sent to the server's process group)."""
    found = set()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(stat_file.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie nobody has reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _interrupt_twice(proc: subprocess.Popen[bytes], gap: float) -> tuple[int, str]:
    """Two quick Ctrl-Cs, ``gap`` seconds apart: the impatient user's."""
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(gap)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    return _interrupt_wait(proc)


def _interrupt_wait(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for the server's children")
@pytest.mark.parametrize("gap", [0.05, 0.1, 0.3])
def test_two_quick_ctrl_cs_end_a_serving_server_without_a_traceback(tmp_path: Path, gap: float) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "psik-api-server"), "serve", "--port", str(port)]
    proc = subprocess.Popen(
        argv, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_healthy(url, proc, lambda: "")
        _run_a_job(url)  # the launcher runs
        children = _children(proc.pid)
        assert children, "the server has no launcher process"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        raise
    status, err = _interrupt_twice(proc, gap)
    assert "Traceback" not in err and "CancelledError" not in err and "KeyboardInterrupt" not in err, err
    assert status == 130, (status, err)
    deadline = time.monotonic() + 10
    while (left := {pid for pid in children if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("gap", [0.1, 0.3])
@pytest.mark.parametrize("after", ["starting on", "Waiting for application startup"])
def test_two_quick_ctrl_cs_during_start_up_end_it_without_a_traceback(
    tmp_path: Path, after: str, gap: float
) -> None:
    proc = subprocess.Popen(
        [str(BIN / "psik-api-server"), "serve", "--port", str(free_port())],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stderr is not None
    said = b""
    while after.encode() not in said:
        line = proc.stderr.readline()
        if not line:
            break
        said += line
    status, err = _interrupt_twice(proc, gap)
    err = said.decode(errors="replace") + err
    assert after in err, err
    assert "Traceback" not in err and "CancelledError" not in err and "KeyboardInterrupt" not in err, err
    assert status == 130, (status, err)
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(proc.pid, 0)


SERVE_AND_LOOK = """
import gc, json, os, signal, sys, threading, time
import httpx
from uvicorn.protocols.http.h11_impl import H11Protocol
from psik_api_server import cli
from psik_api_server.serving.peer_tag import WithConnection
from psik_api_server.serving.uvicorn_seam import ServedProtocol, installed

HOOKED = ("connection_made", "data_received", "on_response_complete", "connection_lost")
originals = {name: H11Protocol.__dict__[name] for name in HOOKED}
port = sys.argv[1]
seen = {}

def look():
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            seen["status"] = http.get("/v1/jobs").status_code
            served = [o for o in gc.get_objects() if isinstance(o, ServedProtocol)]
            seen["served"] = len(served)
            mro = {c for p in served for c in type(p).__mro__[1:]}
            seen["bases"] = sorted(c.__name__ for c in mro if c.__module__.startswith("uvicorn."))
            seen["tagged"] = all(isinstance(p.app, WithConnection) for p in served)
        seen["patched"] = [n for n in HOOKED if H11Protocol.__dict__[n] is not originals[n]]
        seen["installed"] = installed(H11Protocol) is not None
    finally:
        os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=look, daemon=True).start()
code = cli.main(["serve", "--port", port])
print(json.dumps({**seen, "code": code}))
"""


def test_serve_uses_its_own_protocol_class_and_leaves_uvicorns_unpatched(tmp_path: Path) -> None:
    # One seam into uvicorn: `serve` passes uvicorn_protocol's class as Config(http=...);
    # the run-time patch is only for launchers we do not control (main:app).
    argv = [sys.executable, "-c", SERVE_AND_LOOK, str(free_port())]
    out = subprocess.run(argv, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip(), out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["status"] == 200, seen
    assert seen["served"] >= 1 and "H11Protocol" in seen["bases"] and seen["tagged"], seen
    assert seen["patched"] == [] and seen["installed"] is False, seen
    assert seen["code"] == 130, out.stderr[-3000:]
