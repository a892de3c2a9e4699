"""Event streams: ``python bench/bench_events.py [--jobs 200] [--subscribers 1000]``.

Against a live ``psik-api-server serve`` (local backend):

1. **Push latency**: one SSE stream (``GET /v1/events``) open while ``--jobs`` trivial jobs
   run, a few at a time; for each job's final event, the time from the job writing its
   final status row (the row's own time) to the event being read off the socket. p50/p99.
2. **wait by the stream**: ``Client.wait`` of each of ``--jobs`` jobs, from its final row to
   the call returning (p50/p99); ``wait_all`` on ``--wait-all-jobs`` (300) at once, from the last final row
   to its return, and the requests it made.
3. **Many subscribers**: ``--subscribers`` SSE streams held open over raw sockets; the
   server's memory per subscriber (RSS growth / subscribers), the time from one job's
   final row to the last subscriber reading its event, and meanwhile the p99 of
   ``GET /v1/jobs?limit=10`` from an ordinary client (against the same with no streams).

4. **kill -9**: 8 clients watch while 40 jobs run; the server is SIGKILLed midway and
   restarted; each watcher must end with every event exactly once, in id order.

Writes bench/results/events.json. Ratios within one run: the machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from bench_api import pct, server_process

from psik_api_client import Client

FINAL = {"completed", "failed", "canceled"}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _row_time(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()


def push_latency(url: str, jobs: int, concurrency: int = 4) -> list[float]:
    """Seconds from each job's final row (its time) to its final event read off the stream."""
    latencies: dict[str, float] = {}
    ready = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        sse = {"Accept": "text/event-stream"}
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=120)) as http,
            http.stream("GET", f"{url}/v1/events", headers=sse) as r,
        ):
            ready.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    now = time.time()
                    event = json.loads(line[6:])
                    if event["state"] in FINAL:
                        latencies[event["jobid"]] = now - _row_time(event)
                if stop.is_set() and len(latencies) >= jobs:
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    ready.wait(10)
    with Client(url) as api:
        submitted: list[str] = []
        for i in range(0, jobs, concurrency):
            batch = [api.submit({"script": "true"}).jobid for _ in range(min(concurrency, jobs - i))]
            submitted += batch
            deadline = time.monotonic() + 60
            while not all(j in latencies for j in batch) and time.monotonic() < deadline:
                time.sleep(0.005)
    stop.set()
    t.join(5)
    return [latencies[j] for j in submitted if j in latencies]


async def _subscriber(
    host: str, port: int, opened: asyncio.Event, counter: list[int], got: dict[int, float]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /v1/events HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    counter[0] += 1
    if counter[0] == counter[1]:
        opened.set()
    me = id(writer)
    while True:
        line = await reader.readline()
        if not line:
            break
        if line.startswith(b"data: ") and b'"state":"completed"' in line:
            got[me] = time.time()
            break
    writer.close()


async def _ordinary_p99(url: str, n: int) -> float:
    out = []
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = await http.get(f"{url}/v1/jobs", params={"limit": 10})
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return pct(out, 0.99)


def many_subscribers(url: str, pid: int, subscribers: int) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")

    async def run() -> dict[str, float]:
        quiet_p99 = await _ordinary_p99(url, 200)
        rss0 = _rss_mib(pid)
        opened = asyncio.Event()
        counter = [0, subscribers]
        got: dict[int, float] = {}
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(_subscriber(host, int(port), opened, counter, got))
            for _ in range(subscribers)
        ]
        await asyncio.wait_for(opened.wait(), 120)
        open_s = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        rss1 = _rss_mib(pid)
        busy_p99 = await _ordinary_p99(url, 200)
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{url}/v1/jobs", json={"script": "true"})
            r.raise_for_status()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        async with httpx.AsyncClient(timeout=30) as http:
            job = (await http.get(f"{url}/v1/jobs/{r.json()['jobid']}")).json()
        final_row = max(_row_time({"time": h["time"]}) for h in job["history"])
        return {
            "subscribers": subscribers,
            "open_all_s": open_s,
            "server_rss_growth_mib": rss1 - rss0,
            "server_kib_per_subscriber": (rss1 - rss0) * 1024 / subscribers,
            "deliver_to_all_s": max(got.values()) - final_row,
            "deliver_p50_s": statistics.median(got.values()) - final_row,
            "ordinary_p99_ms_without_streams": quiet_p99 * 1000,
            "ordinary_p99_ms_with_streams": busy_p99 * 1000,
        }

    return asyncio.run(run())


class Counting(httpx.BaseTransport):
    """httpx's own transport, counting the requests made through it."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def _final_row(job: object) -> float:
    history = getattr(job, "history", [])
    return max(h.time.timestamp() for h in history if h.state.value in FINAL)


def wait_latency(url: str, jobs: int) -> list[float]:
    """Seconds from a job's final row to ``Client.wait`` (by the stream) returning it."""
    out = []
    with Client(url, events=True) as api:
        for _ in range(jobs):
            job = api.wait(api.submit({"script": "true"}).jobid, timeout=60)
            out.append(time.time() - _final_row(job))
    return out


def wait_all_figures(url: str, jobs: int) -> dict[str, float]:
    """``wait_all`` on ``jobs`` jobs at once: seconds from the last final row to its
    return, and the requests it made (counted at the transport)."""
    with Client(url) as api:
        ids = [api.submit({"script": "sleep 1"}).jobid for _ in range(jobs)]
    counting = Counting()
    with Client(url, transport=counting, events=True) as api:
        done = api.wait_all(ids, timeout=300)
        returned = time.time()
    last = max(_final_row(j) for j in done)
    kinds: dict[str, int] = {}
    for r in counting.requests:
        kind = r.split(" ")[0] + (
            " /v1/events" if "/events" in r else " /v1/jobs..." if "/jobs" in r else " other"
        )
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "wait_all_jobs": jobs,
        "wait_all_after_last_final_ms": (returned - last) * 1000,
        "wait_all_requests": len(counting.requests),
        **{f"wait_all_requests[{k}]": v for k, v in sorted(kinds.items())},
    }


def kill_and_resume(tmp: Path, watchers: int, jobs: int) -> dict[str, float]:
    """``watchers`` clients watch from event 0 while ``jobs`` jobs run; the server is
    killed (SIGKILL) midway and restarted on the same port and data. Every watcher must
    then hold every event exactly once, in id order (checked against a replay)."""
    import os
    import signal

    config = {"backends": {"default": {"type": "local", "max_running": 100000}}}
    data = tmp / "resume"
    from bench_api import _free_port

    port = _free_port()
    seen: list[list[int]] = [[] for _ in range(watchers)]
    stop = threading.Event()

    def watch(k: int) -> None:
        with Client(f"http://127.0.0.1:{port}", timeout=5) as api:
            try:
                for event in api.watch(after=0):
                    seen[k].append(event.id)
                    if stop.is_set():
                        return
            except Exception as e:  # reported below as a shortfall
                print(f"watcher {k}: {type(e).__name__}: {e}", file=sys.stderr)

    with server_process(data, config, port) as (url, pid):
        threads = [threading.Thread(target=watch, args=(k,), daemon=True) for k in range(watchers)]
        for t in threads:
            t.start()
        with Client(url) as api:
            ids = [api.submit({"script": "sleep 0.5"}).jobid for _ in range(jobs // 2)]
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)  # the jobs end while the server is down
    with server_process(data, config, port) as (url, _):
        with Client(url) as api:
            ids += [api.submit({"script": "sleep 0.2"}).jobid for _ in range(jobs - jobs // 2)]
            api.wait_all(ids, timeout=120)
            everything = httpx.get(
                f"{url}/v1/events",
                params={"after": 0, "limit": 10000, "timeout": 0},
                headers={"Accept": "application/json"},
            ).json()
        want = [e["id"] for e in everything]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(s[-1:] == want[-1:] for s in seen):
            time.sleep(0.1)
        stop.set()
        exact = sum(s == want for s in seen)
    return {"resume_watchers": watchers, "resume_events": len(want), "resume_watchers_exact": exact}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--wait-all-jobs", type=int, default=300, help="jobs for wait_all at once")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "events.json")
    args = p.parse_args()
    config = {
        "backends": {"default": {"type": "local", "max_running": 100000}},
        "max_connections": args.subscribers + 200,
    }
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp) / "data", config) as (url, pid):
        lat = push_latency(url, args.jobs)
        results |= {
            "push_jobs": len(lat),
            "push_p50_ms": statistics.median(lat) * 1000,
            "push_p99_ms": pct(lat, 0.99) * 1000,
            "push_max_ms": max(lat) * 1000,
        }
        lat = wait_latency(url, args.jobs)
        results |= {
            "wait_p50_ms": statistics.median(lat) * 1000,
            "wait_p99_ms": pct(lat, 0.99) * 1000,
        }
        results |= wait_all_figures(url, args.wait_all_jobs)
        results |= many_subscribers(url, pid, args.subscribers)
    with tempfile.TemporaryDirectory() as tmp:
        results |= kill_and_resume(Path(tmp), 8, 40)
    for key, value in results.items():
        print(f"{key:36s} {value:10.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
