"""Token mode: does another user's job answer 404 as fast as a job that does not exist?

Builds the app in token mode in-process (a stand-in TLS transport names the caller, as
``certified serve`` would), creates a job as alice, then asks for it as bob and for a
job id nobody has, interleaved, and prints the median time of each 404 at the ASGI level
(no network noise), for each route that looks a job up by id. Run:

    python bench/bench_owner_404.py [--samples 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from asgi_lifespan import LifespanManager

from psik_api_server.app import create_app
from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.settings import BackendSettings, Settings


class _Peer:
    """What certified's TLS transport answers: a peer certificate, here the user's name."""

    def __init__(self, user: str) -> None:
        self.user = user

    def get_extra_info(self, name: str) -> Any:
        return self if name == "ssl_object" else None

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.user.encode()


class _Names:
    def identity(self, der: bytes) -> str:
        return f"uid:{der.decode()}"


async def call(app: Any, user: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    headers = [(b"host", b"localhost")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "https", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": headers, "server": ("127.0.0.1", 8443),
        "client": ("127.0.0.1", 50000), "transport": _Peer(user),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


async def main(samples: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(
            prefix=root / "jobs",
            database=root / "index.sqlite",
            state_dir=root / "state",
            backends={"default": BackendSettings(type="local")},
            authz="token",
        )
        app = create_app(settings, launcher=LocalLauncher(root / "launcher.log", eager=False))
        async with LifespanManager(app):
            app.state.context.client_names = _Names()
            status, body = await call(
                app, "alice", "POST", "/v1/jobs/new", json.dumps({"script": "true"}).encode()
            )
            assert status == 201, body
            theirs = json.loads(body)["jobid"]
            nobodys = "1000000000.001"
            results: dict[str, dict[str, float]] = {}
            for route in ("", "/state", "/logs", "/files"):
                times: dict[str, list[int]] = {"another user's": [], "no such job": []}
                for i in range(samples * 2):
                    which, jobid = [("another user's", theirs), ("no such job", nobodys)][i % 2]
                    start = time.perf_counter_ns()
                    status, body = await call(app, "bob", "GET", f"/v1/jobs/{jobid}{route}")
                    elapsed = time.perf_counter_ns() - start
                    assert status == 404, body
                    if i >= 200:  # warmed up
                        times[which].append(elapsed)
                medians = {k: statistics.median(v) / 1000 for k, v in times.items()}
                results[f"GET /v1/jobs/{{id}}{route}"] = medians
                theirs_us, none_us = medians["another user's"], medians["no such job"]
                print(
                    f"GET /v1/jobs/{{id}}{route:7}  another user's job {theirs_us:7.1f} us   "
                    f"no such job {none_us:7.1f} us   difference {theirs_us - none_us:+6.1f} us"
                )
            return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    asyncio.run(main(parser.parse_args().samples))
