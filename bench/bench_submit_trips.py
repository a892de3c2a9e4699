"""How many worker-thread trips and job-directory reads does one ``POST /v1/jobs`` cost?

Builds the app in-process on the real local backend (jobs are real processes running
``true``) in a temporary prefix and state directory, wraps ``anyio.to_thread.run_sync``,
``asyncio.to_thread`` and the job-directory readers (``read_job``/``read_job_settled``:
whole-job reads; ``read_history``/``read_spec`` outside one: partial reads;
``open_job_file``: every file open) with counters, and sends sequential submits after a
few warm-up ones. A call is charged to a request when it runs in the request's own
context (its task, the tasks and worker threads it starts) while the request is in
flight; "window" also counts the background tasks' calls (the watcher's) meanwhile.
psik's own flocks go through ``loop.run_in_executor`` and are not counted.
Works on the current layout (``jobs.directory``) and the old one (``jobdir``). Run:

    python bench/bench_submit_trips.py [--submits 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
from asgi_lifespan import LifespanManager

import psik_api_server
from psik_api_server.app import create_app
from psik_api_server.settings import BackendSettings, Settings

KEYS = ("thread_trips", "job_reads", "partial_reads", "file_opens")
_request: contextvars.ContextVar[Counter[str] | None] = contextvars.ContextVar("request", default=None)
_window: Counter[str] | None = None  # set while a request is in flight
_depth = threading.local()  # read_spec inside read_job is part of that read, not one more


def _count(key: str) -> None:
    for counts in (_request.get(), _window):
        if counts is not None:
            counts[key] += 1


def _counting(fn: Any, key: str, family: bool = False) -> Any:
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def trip(*args: Any, **kwargs: Any) -> Any:
            _count(key)
            return await fn(*args, **kwargs)

        return trip

    @functools.wraps(fn)
    def read(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_depth, "n", 0)
        if depth == 0 or not family:
            _count(key)
        _depth.n = depth + (1 if family else 0)
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n = depth

    return read


def _patch(old: Any, new: Any, prefixes: tuple[str, ...]) -> None:
    """Replace ``old`` by ``new`` wherever a loaded module of ``prefixes`` holds it: as a
    module attribute (``from .directory import read_job``) or a default argument."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)
            for fn in [value, *vars(value).values()] if isinstance(value, type) else [value]:
                fn = getattr(fn, "__func__", fn)
                if any(d is old for d in getattr(fn, "__defaults__", None) or ()):
                    fn.__defaults__ = tuple(new if d is old else d for d in fn.__defaults__)


def instrument() -> str:
    """Wrap the counted functions; returns the file of the job-directory module."""
    try:
        directory = importlib.import_module("psik_api_server.jobs.directory")
    except ImportError:
        directory = importlib.import_module("psik_api_server.jobdir")
    ours = ("psik_api_server",)
    run_sync = anyio.to_thread.run_sync
    _patch(run_sync, _counting(run_sync, "thread_trips"), ("anyio", "starlette", *ours))
    _patch(asyncio.to_thread, _counting(asyncio.to_thread, "thread_trips"), ("asyncio", *ours))
    for name, key in [("read_job", "job_reads"), ("read_job_settled", "job_reads"),
                      ("read_history", "partial_reads"), ("read_spec", "partial_reads")]:  # fmt: skip
        _patch(getattr(directory, name), _counting(getattr(directory, name), key, family=True), ours)
    _patch(directory.open_job_file, _counting(directory.open_job_file, "file_opens"), ours)
    return str(directory.__file__)


async def bench(submits: int, warmup: int) -> dict[str, Any]:
    global _window
    own, window, latency = Counter[str](), Counter[str](), []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_STATE_HOME"] = f"{tmp}/state"
        backends = {"default": BackendSettings(type="local")}
        app = create_app(
            Settings(prefix=Path(tmp, "jobs"), database=Path(tmp, "index.sqlite"), backends=backends)
        )
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
                for i in range(warmup + submits):
                    counts, _window = Counter[str](), Counter[str]()
                    token = _request.set(counts)
                    start = time.perf_counter()
                    response = await http.post("/v1/jobs", json={"script": "true"})
                    latency.append(time.perf_counter() - start)
                    _request.reset(token)
                    seen, _window = _window, None  # a later call counts nowhere
                    assert response.status_code == 201, response.text
                    if i >= warmup:
                        own.update(counts)  # added now: its own tasks may go on counting into it
                        window.update(seen)
    return {
        "submits": submits,
        "per_submit": {k: own[k] / submits for k in KEYS},
        "per_submit_window": {k: window[k] / submits for k in KEYS},
        "latency_median_ms": round(statistics.median(latency[warmup:]) * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "submit_trips.json")
    args = parser.parse_args()
    server = str(Path(psik_api_server.__file__).parent)
    print(f"psik_api_server from {server}\njob directory module: {instrument()}")
    result = {"server": server, **asyncio.run(bench(args.submits, args.warmup))}
    for label in ("per_submit", "per_submit_window"):
        print(f"{label:18}", "  ".join(f"{k}={v:.2f}" for k, v in result[label].items()))
    print(f"latency median     {result['latency_median_ms']:.2f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
