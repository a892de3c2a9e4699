"""Submit rate: ``python bench/bench_submit_rate.py [--clients 8] [--submits 400] [--backlog 2000]``.

Against a live ``psik-api-server serve`` (local backend, job slots high enough that every
submit launches its job, as psik's does), ``--clients`` clients each submit their share
of ``--submits`` trivial jobs (``POST /v1/jobs``) as fast as answers come; against that,
psik's own create+submit of the same jobs in this process, ``--clients`` at a time. Both
with an empty store and with ``--backlog`` jobs created but never started (``new``) in it
first, so a cost that grows with the store shows. Prints submits per second and the
ratio server/psik for each, and the server's CPU time per submit (from /proc); writes
bench/results/submit_rate.json. Compare ratios within one run: the machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_api import fill, server_process

from psik_api_client import Client

CONFIG = {"backends": {"default": {"type": "local", "max_running": 100000}}}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_rate(url: str, pid: int, clients: int, submits: int) -> tuple[float, float]:
    """Submits per second through ``clients`` sync clients, and server CPU ms per submit."""
    share = submits // clients

    def one(_: int) -> None:
        with Client(url, timeout=120) as api:
            for _ in range(share):
                api.submit({"script": "true"})

    with Client(url) as api:  # warm-up
        api.submit({"script": "true"})
    cpu0 = _cpu_seconds(pid)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    elapsed = time.perf_counter() - t0
    return share * clients / elapsed, (_cpu_seconds(pid) - cpu0) * 1000 / (share * clients)


def psik_rate(prefix: Path, clients: int, submits: int, backlog: int) -> float:
    """psik alone, in this process: create + submit, ``clients`` at a time."""
    from psik.config import Config
    from psik.manager import JobManager
    from psik.models import BackendConfig, JobSpec

    prefix.mkdir(parents=True, exist_ok=True)
    mgr = JobManager(Config(prefix=prefix, backends={"default": BackendConfig(type="local")}))
    share = submits // clients

    async def run() -> float:
        for _ in range(backlog):
            await mgr.create(JobSpec(script="true"))
        await (await mgr.create(JobSpec(script="true"))).submit()  # warm-up

        async def one() -> None:
            for _ in range(share):
                await (await mgr.create(JobSpec(script="true"))).submit()

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        rate = share * clients / (time.perf_counter() - t0)
        # Let the jobs end before their directory goes (a job process psik forked from
        # here that loses its status.csv raises back into this process's stack).
        deadline = time.monotonic() + 120
        for status in prefix.glob("*/status.csv"):
            while time.monotonic() < deadline and not any(
                ",completed," in line or ",failed," in line for line in status.read_text().splitlines()
            ):
                if ",queued," not in status.read_text():
                    break  # never submitted (the backlog)
                await asyncio.sleep(0.01)
        return rate

    return asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--submits", type=int, default=400)
    p.add_argument("--backlog", type=int, default=2000)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "submit_rate.json")
    args = p.parse_args()
    results: dict[str, float] = {}
    for backlog in (0, args.backlog):
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            with server_process(data, CONFIG) as (url, pid):
                if backlog:
                    asyncio.run(fill(url, backlog))
                rate, cpu_ms = api_rate(url, pid, args.clients, args.submits)
            floor = psik_rate(Path(tmp) / "psik", args.clients, args.submits, backlog)
        results[f"api_submits_per_s_backlog{backlog}"] = rate
        results[f"api_server_cpu_ms_per_submit_backlog{backlog}"] = cpu_ms
        results[f"psik_submits_per_s_backlog{backlog}"] = floor
        results[f"ratio_api_over_psik_backlog{backlog}"] = rate / floor
    for key, value in results.items():
        print(f"{key:42s} {value:10.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
