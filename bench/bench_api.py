"""psik-api benchmarks: run with `python3 -m nox -s bench` (or `python bench/bench_api.py`).

Starts `psik-api-server serve` on a fresh data directory and measures, with the real
client over a real socket:

1. submit-to-final latency of a trivial job (POST /v1/jobs, then the client's wait()),
   against psik's own in-process create+submit+poll of the same job, in the same run;
2. GET /v1/jobs?limit=100 with 2,000 jobs in the index, against psik's JobManager.ls()
   (a full read of the prefix, which is what listing cost without an index);
3. throughput of 100 concurrent submits followed by wait_all, with the default job slots
   (local: max_running = the CPU count) and, on a second server, with no practical cap.

Machines here are shared and noisy: compare the ratios within one run, not absolute
times across runs. Results are printed and written to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from psik_api_client import AsyncClient, Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(data: Path, config: dict[str, object] | None = None) -> Iterator[str]:
    """A live `psik-api-server serve` on its own data directory: its URL."""
    with server_process(data, config) as (url, _):
        yield url


@contextmanager
def server_process(
    data: Path, config: dict[str, object] | None = None, port: int | None = None
) -> Iterator[tuple[str, int]]:
    """:func:`server`, with the server's process id (for its CPU time or memory);
    ``port``: that one (a server restarted where its clients expect it)."""
    port = port or _free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV"}}
    env["XDG_DATA_HOME"] = str(data)
    if config is not None:
        data.mkdir(parents=True, exist_ok=True)
        (data / "psik_api.json").write_text(json.dumps(config))
        env["PSIK_API_CONFIG"] = str(data / "psik_api.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "psik_api_server", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_latency(url: str, n: int) -> list[float]:
    out = []
    with Client(url) as api:
        api.wait(api.submit({"script": "true"}).jobid, timeout=60)  # warm-up
        for _ in range(n):
            t0 = time.perf_counter()
            job = api.submit({"script": "true"})
            done = api.wait(job.jobid, timeout=60)
            out.append(time.perf_counter() - t0)
            assert done.state == "completed", done
    return out


def bench_psik_latency(prefix: Path, n: int) -> list[float]:
    """psik alone, in this process: create + submit, then read status.csv until final."""
    from psik.config import Config
    from psik.job import Job
    from psik.manager import JobManager
    from psik.models import BackendConfig, JobSpec

    prefix.mkdir(parents=True, exist_ok=True)
    mgr = JobManager(Config(prefix=prefix, backends={"default": BackendConfig(type="local")}))

    async def one() -> float:
        t0 = time.perf_counter()
        job: Job = await mgr.create(JobSpec(script="true"))
        await job.submit()
        status = Path(str(job.base)) / "status.csv"
        while not any(
            line.split(",")[2] in {"completed", "failed"} for line in status.read_text().splitlines()
        ):
            await asyncio.sleep(0.001)
        return time.perf_counter() - t0

    async def run() -> list[float]:
        await one()
        return [await one() for _ in range(n)]

    return asyncio.run(run())


async def fill(url: str, count: int, concurrency: int = 8) -> float:
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(url, timeout=60) as api:

        async def one(i: int) -> None:
            async with sem:
                await api.create({"name": f"fill{i % 10}", "script": "true"})

        await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - t0


def _job_dirs(prefix: Path) -> int:
    """The job directories in ``prefix`` (not the server's ``.psik-api.lock`` beside them)."""
    return sum(1 for name in os.listdir(prefix) if not name.startswith("."))


def bench_list(
    url: str, rounds: int, filters: dict[str, str] | None = None, expect: int | None = 100
) -> list[float]:
    out = []
    with httpx.Client(base_url=url) as http:
        for _ in range(rounds):
            t0 = time.perf_counter()
            r = http.get("/v1/jobs", params={"limit": 100, **(filters or {})})
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["items"]
            assert expect is None or len(r.json()["items"]) == expect
    return out


def bench_psik_ls(prefix: Path, jobs: int = 2000) -> float:
    """psik's own listing of every job in ``prefix`` (at least ``jobs`` of them)."""
    from psik.config import Config
    from psik.manager import JobManager

    mgr = JobManager(Config(prefix=prefix))

    async def run() -> int:
        return len([j async for j in mgr.ls()])

    t0 = time.perf_counter()
    n = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert n >= jobs, n
    return elapsed


async def bench_burst(url: str, n: int) -> float:
    async with AsyncClient(url, timeout=60) as api:
        t0 = time.perf_counter()
        jobs = await asyncio.gather(*(api.submit({"script": f"echo {i}"}) for i in range(n)))
        done = await api.wait_all(jobs, timeout=300)
        elapsed = time.perf_counter() - t0
    assert all(j.state == "completed" for j in done)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--jobs", type=int, default=2000, help="jobs in the index for the list benchmark")
    p.add_argument("--burst", type=int, default=100)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    args = p.parse_args()
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="psik-api-bench-") as tmp:
        data = Path(tmp)
        with server(data) as url:
            lat = bench_latency(url, args.latency_runs)
            res["api_submit_to_final_median_s"] = statistics.median(lat)
            res["api_submit_to_final_p90_s"] = pct(lat, 0.9)
            base = bench_psik_latency(data / "psik-only", args.latency_runs)
            res["psik_submit_to_final_median_s"] = statistics.median(base)
            res["latency_ratio_api_over_psik"] = res["api_submit_to_final_median_s"] / statistics.median(base)

            res["burst_jobs"] = args.burst
            res["burst_seconds"] = asyncio.run(bench_burst(url, args.burst))
            res["burst_jobs_per_s"] = args.burst / res["burst_seconds"]

            # The list's cost should follow the page, not the number of jobs: measure it
            # with a tenth of the jobs and with all of them.
            have = _job_dirs(data / "psik_api" / "jobs")
            asyncio.run(fill(url, max(0, args.jobs // 10 - have)))
            # A full page, or every job where --jobs is under 1,000 (a smoke run).
            page = min(100, _job_dirs(data / "psik_api" / "jobs"))
            res["list_limit100_median_s_at_tenth"] = statistics.median(bench_list(url, 50, expect=page))
            have = _job_dirs(data / "psik_api" / "jobs")
            res["fill_seconds"] = asyncio.run(fill(url, max(0, args.jobs - have)))
            res["fill_creates_per_s"] = (args.jobs - have) / res["fill_seconds"]
            res["jobs_in_index"] = _job_dirs(data / "psik_api" / "jobs")
            lst = bench_list(url, 50, expect=min(100, int(res["jobs_in_index"])))
            res["list_limit100_median_s"] = statistics.median(lst)
            res["list_limit100_p90_s"] = pct(lst, 0.9)
            res["list_ratio_all_over_tenth"] = (
                res["list_limit100_median_s"] / res["list_limit100_median_s_at_tenth"]
            )
            filtered = bench_list(url, 50, {"state": "new", "name": "fill3"}, expect=None)
            res["list_filtered_median_s"] = statistics.median(filtered)
        uncapped = {"backends": {"default": {"type": "local", "max_running": 100_000}}}
        with server(data / "uncapped", uncapped) as url:
            res["burst_uncapped_seconds"] = asyncio.run(bench_burst(url, args.burst))
            res["burst_ratio_slots_over_uncapped"] = res["burst_seconds"] / res["burst_uncapped_seconds"]
        res["psik_ls_all_s"] = bench_psik_ls(data / "psik_api" / "jobs", args.jobs)
        res["list_ratio_psik_ls_over_api"] = res["psik_ls_all_s"] / res["list_limit100_median_s"]

    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
