"""The index at scale: deep list pages, a first start and a restart over many jobs.

(a) list: the first page against the last one, at N jobs, through ``JobStore.list``
    (rows inserted directly in one transaction) and through the real app
    (``httpx.ASGITransport``, on the index the first start built); goal: the last page
    within 1.5x of the first.
(b) first start: the app's lifespan (``LifespanManager`` entering: what a user waits for)
    over N job directories written as psik writes them, against the floor measured in
    the same run: list the prefix, read and parse every directory (spec.json, status.csv,
    owner record) and insert every row in one SQLite transaction; goal: within 2x.
(c) restart: the lifespan again over the same N, the index already in line; goal < 1 s.

Ratios are of figures measured in this run; results go to bench/results/store.json. Run:

    python bench/bench_store.py [--jobs 100000] [--requests 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from psik_api_core import JobState
from psik_api_core.authz import LOCAL_USER
from psik_api_server.app import create_app
from psik_api_server.jobs import directory as jobdir
from psik_api_server.jobs.reconcile import index_row
from psik_api_server.jobs.store import JobRow, JobStore, encode_cursor
from psik_api_server.settings import BackendSettings, Settings

T0 = 1_700_000_000
PAGE = 100


def _jobid(i: int) -> str:
    return f"{T0 + i}.{i % 1000:03d}"


def write_jobs(prefix: Path, n: int) -> None:
    """``n`` job directories as psik leaves them (spec.json, status.csv, work/, log/);
    most completed or failed, one in 1,000 still ``new``; every other one with the
    server's owner record, the rest as made by the psik command line."""
    prefix.mkdir(mode=0o700, parents=True)
    for i in range(n):
        base = prefix / _jobid(i)
        os.mkdir(base)
        os.mkdir(base / "work")
        os.mkdir(base / "log")
        spec = {"name": f"n{i % 7}", "script": "true", "backend": "default", "directory": str(base / "work")}
        (base / "spec.json").write_text(json.dumps(spec))
        t = float(T0 + i)
        rows = [f"{t},0,new,"]
        if i % 1000 != 999:
            end = "failed,3" if i % 10 == 0 else "completed,"
            rows += [f"{t + 0.1},1,queued,{1000 + i}", f"{t + 0.2},1,active,", f"{t + 0.3},1,{end}"]
        (base / "status.csv").write_text("\n".join(rows) + "\n")
        if i % 2 == 0:
            (base / jobdir.OWNER_NAME).write_text(LOCAL_USER)


def floor(prefix: Path, database: Path) -> float:
    """Seconds to list, read and parse every job directory and index them in one
    SQLite transaction: what a first start cannot go below."""
    store = JobStore(database).open()
    start = time.perf_counter()
    rows = []
    for jobid in sorted(jobdir.list_jobids(prefix)):
        base = prefix / jobid
        rows.append(index_row(jobdir.read_job(base), jobdir.read_owner(base) or LOCAL_USER))
    with store.transaction():
        for row in rows:
            store.put(row)
    took = time.perf_counter() - start
    store.close()
    return took


def _settings(prefix: Path, database: Path) -> Settings:
    return Settings(
        prefix=prefix,
        database=database,
        state_dir=database.parent / "state",
        backends={"default": BackendSettings(type="local")},
    )


def _median(fn: Callable[[], Any], times: int) -> float:
    fn()  # warm
    took = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        took.append(time.perf_counter() - start)
    return statistics.median(took)


def store_pages(database: Path, n: int, requests: int) -> dict[str, float]:
    """(a) through JobStore.list: first and last pages, unfiltered and per filter (ms)."""
    store = JobStore(database).open()
    with store.transaction():
        for i in range(n):
            t = float(T0 + i)
            store.put(
                JobRow(
                    jobid=_jobid(i),
                    backend="default" if i % 2 else "other",
                    owner=LOCAL_USER,
                    name=f"n{i % 7}",
                    state=JobState.failed if i % 10 == 0 else JobState.completed,
                    jobndx=1,
                    created=t,
                    updated=t + 0.3,
                    exit_code=3 if i % 10 == 0 else 0,
                )
            )
    out: dict[str, float] = {}
    filters: dict[str, dict[str, Any]] = {
        "none": {},
        "state": {"states": [JobState.completed]},
        "backend": {"backend": "default"},
        "name": {"name": "n3"},
    }
    for label, kw in filters.items():
        last = _last_cursor(lambda cursor, kw=kw: store.list(LOCAL_USER, limit=1000, cursor=cursor, **kw))
        out[f"{label}_first_ms"] = 1e3 * _median(
            lambda kw=kw: store.list(LOCAL_USER, limit=PAGE, **kw), requests
        )
        out[f"{label}_last_ms"] = 1e3 * _median(
            lambda kw=kw, last=last: store.list(LOCAL_USER, limit=PAGE, cursor=last, **kw), requests
        )
    store.close()
    return out


def _last_cursor(page: Callable[[str | None], tuple[list[JobRow], str | None]]) -> str | None:
    """The cursor of the last page of ``PAGE`` rows, found by following big pages."""
    cursor: str | None = None
    seen: list[JobRow] = []
    while True:
        rows, nxt = page(cursor)
        seen = (seen + rows)[-(PAGE + 1) :]
        if nxt is None:
            break
        cursor = nxt
    return encode_cursor(seen[0]) if len(seen) > PAGE else None


async def app_runs(prefix: Path, database: Path, requests: int) -> dict[str, float]:
    """(b) the first start, (c) a restart, and (a) list pages through the restarted app."""
    out: dict[str, float] = {}
    app = create_app(_settings(prefix, database))
    start = time.perf_counter()
    async with LifespanManager(app, startup_timeout=3600, shutdown_timeout=60):
        out["first_start_s"] = time.perf_counter() - start
    app = create_app(_settings(prefix, database))
    start = time.perf_counter()
    async with LifespanManager(app, startup_timeout=3600, shutdown_timeout=60):
        out["restart_s"] = time.perf_counter() - start
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as http:

            async def get(params: dict[str, Any]) -> dict[str, Any]:
                r = await http.get("/v1/jobs", params=params)
                r.raise_for_status()
                body: dict[str, Any] = r.json()
                return body

            last_cursor = await _cursor_before_last_page(get)

            async def timed(params: dict[str, Any]) -> list[float]:
                took = []
                await get(params)
                for _ in range(requests):
                    t = time.perf_counter()
                    await get(params)
                    took.append(time.perf_counter() - t)
                return took

            last = {"limit": PAGE, **({"cursor": last_cursor} if last_cursor else {})}
            pages = {"first": {"limit": PAGE}, "last": last}
            for page, params in pages.items():
                took = sorted(await timed(params))
                out[f"app_{page}_page_ms"] = 1e3 * statistics.median(took)
                # p99 of the same requests (meaningful with --requests 100 or more).
                out[f"app_{page}_page_p99_ms"] = 1e3 * took[min(len(took) - 1, int(0.99 * len(took)))]
    return out


async def _cursor_before_last_page(get: Callable[[dict[str, Any]], Any]) -> str | None:
    """The next_cursor whose page is the last ``PAGE`` jobs, found through the app in
    pages of 1000 (count them, then skip all but the last ``PAGE``)."""
    cursor = None
    pages: list[dict[str, Any]] = []
    while True:
        body = await get({"limit": 1000, **({"cursor": cursor} if cursor else {})})
        pages.append(body)
        if body["next_cursor"] is None:
            break
        cursor = body["next_cursor"]
    total = sum(len(p["items"]) for p in pages)
    # Skip total - PAGE jobs in pages of at most 1000 from the start; the cursor after them.
    skip, cursor = total - PAGE, None
    while skip > 0:
        body = await get({"limit": min(1000, skip), **({"cursor": cursor} if cursor else {})})
        skip -= len(body["items"])
        cursor = body["next_cursor"]
    # None: at most one page of jobs (--jobs 100), whose last page is its first.
    return None if cursor is None else str(cursor)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=15, help="list requests per median")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "store.json")
    args = parser.parse_args()
    n = args.jobs
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_jobs(root / "jobs", n)
        print(f"wrote {n} job directories in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        pages = store_pages(root / "pages.sqlite", n, args.requests)
        floor_s = floor(root / "jobs", root / "floor.sqlite")
        runs = asyncio.run(app_runs(root / "jobs", root / "index.sqlite", args.requests))
    result = {
        "jobs": n,
        "python": sys.version.split()[0],
        "list_store": pages,
        "list_last_vs_first_store": {
            k: pages[f"{k}_last_ms"] / pages[f"{k}_first_ms"] for k in ("none", "state", "backend", "name")
        },
        **runs,
        "list_last_vs_first_app": runs["app_last_page_ms"] / runs["app_first_page_ms"],
        "floor_s": floor_s,
        "first_start_vs_floor": runs["first_start_s"] / floor_s,
    }
    print(f"jobs: {n}")
    for k in ("none", "state", "backend", "name"):
        print(
            f"(a) JobStore.list filter={k:8s} first {pages[f'{k}_first_ms']:.2f} ms, "
            f"last {pages[f'{k}_last_ms']:.2f} ms: "
            f"{result['list_last_vs_first_store'][k]:.2f}x (goal <= 1.5x)"
        )
    print(
        f"(a) through the app: first page {runs['app_first_page_ms']:.2f} ms, last page "
        f"{runs['app_last_page_ms']:.2f} ms: {result['list_last_vs_first_app']:.2f}x (goal <= 1.5x)"
    )
    print(
        f"(b) first start {runs['first_start_s']:.2f} s vs floor (read + parse + one transaction) "
        f"{floor_s:.2f} s: {result['first_start_vs_floor']:.2f}x (goal <= 2x)"
    )
    print(f"(c) restart {runs['restart_s']:.2f} s (goal < 1 s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
