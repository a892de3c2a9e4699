"""Client fan-out: ``python bench/bench_fanout.py [--jobs 1000]`` (issue 16).

In one run, on a fresh data directory each:

1. ``psik-api-server serve`` (a live server over a real socket; config below): N jobs
   submitted at once from one ``AsyncClient`` (``asyncio.gather`` of N ``submit``), then
   awaited with ``wait_all``;
2. psik alone, in this process: the same N jobs created and submitted with psik's own
   API (``JobManager.create`` + ``Job.submit``, also gathered), then awaited by reading
   their ``status.csv`` files until every one is final.

The server's local backend gets ``max_running: 100000``: psik's in-process local backend
caps nothing, so the server must not hold jobs back in slots that psik would have run.
Goal: the API within 1.3x of psik. Printed, and written to bench/results/fanout.json.
Machines here are shared and noisy: compare the ratio within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_api import server

from psik_api_client import AsyncClient

#: psik's in-process local backend runs every job it is given: so does the server's.
UNCAPPED = {"backends": {"default": {"type": "local", "max_running": 100_000}}}
FINAL = {"completed", "failed", "canceled"}


async def api_fanout(url: str, n: int, args_timeout: float, cpu: list[float]) -> float:
    """Seconds to submit ``n`` jobs at once from one AsyncClient and wait_all of them;
    the client's CPU seconds (this process: the server is another) go in ``cpu``."""
    async with AsyncClient(url, timeout=300) as api:
        await api.wait((await api.submit({"script": "true"})).jobid, timeout=60)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        jobs = await asyncio.gather(*(api.submit({"script": f"echo {i}"}) for i in range(n)))
        done = await api.wait_all(jobs, timeout=args_timeout)
        elapsed = time.perf_counter() - t0
        cpu.append(time.process_time() - c0)
    bad = [j for j in done if j.state != "completed"]
    assert not bad, bad[:3]
    return elapsed


def _final(status: Path) -> bool:
    try:
        text = status.read_text()
    except FileNotFoundError:
        return False
    return any(line.split(",")[2] in FINAL for line in text.splitlines() if line.count(",") >= 2)


async def psik_fanout(prefix: Path, n: int) -> float:
    """Seconds for psik alone: create + submit ``n`` jobs at once, then poll their
    status files until every one is final."""
    from psik.config import Config
    from psik.manager import JobManager
    from psik.models import BackendConfig, JobSpec

    prefix.mkdir(parents=True, exist_ok=True)
    mgr = JobManager(Config(prefix=prefix, backends={"default": BackendConfig(type="local")}))

    async def one(i: int) -> Path:
        job = await mgr.create(JobSpec(script=f"echo {i}"))
        await job.submit()
        return Path(str(job.base)) / "status.csv"

    warm = await one(-1)  # warm-up, as the API's run has one
    while not _final(warm):
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    pending = list(await asyncio.gather(*(one(i) for i in range(n))))
    while pending:
        pending = [s for s in pending if not _final(s)]
        if pending:
            await asyncio.sleep(0.02)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=600, help="wait_all's timeout (s)")
    p.add_argument("--keep", type=Path, help="data directory to use and keep (default: a temporary one)")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "fanout.json")
    args = p.parse_args()
    res: dict[str, float | int] = {"jobs": args.jobs, "server_local_max_running": 100_000}
    with tempfile.TemporaryDirectory(prefix="psik-api-fanout-") as tmp:
        data = args.keep or Path(tmp)
        with server(data / "api", UNCAPPED) as url:
            cpu: list[float] = []
            res["api_seconds"] = asyncio.run(api_fanout(url, args.jobs, args.timeout, cpu))
            res["api_client_cpu_seconds"] = cpu[0]
        res["psik_seconds"] = asyncio.run(psik_fanout(data / "psik-only", args.jobs))
    res["api_jobs_per_s"] = args.jobs / res["api_seconds"]
    res["psik_jobs_per_s"] = args.jobs / res["psik_seconds"]
    res["ratio_api_over_psik"] = res["api_seconds"] / res["psik_seconds"]
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
