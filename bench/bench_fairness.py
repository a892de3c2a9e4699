"""Fairness: does one identity's flood slow another's requests? ``python bench/bench_fairness.py
[--rounds 4] [--samples 150] [--flood-connections 16] [--only NAME ...]``.

One real ``certified serve`` server in token mode per setting of ``rate_limits`` (as
tests/tls_support.py runs it): ``off`` (none), ``rates`` (the default rates, no cap on
requests in progress: the default before ``concurrent``), ``default`` (the defaults:
rates and ``concurrent`` 4) and ``cap1`` (the rates, ``concurrent`` 1). Against each,
alice reads one of her jobs (``GET /v1/jobs/{id}``) 30 times a second over one
connection, in rounds, first unloaded, then while bob floods from another process over
``--flood-connections`` connections with his costliest read (``GET
/v1/jobs?view=full&limit=100`` over 40 jobs), as fast as answers come (the flood is
paused between rounds, not restarted). Prints alice's p50 and p99 in both phases per
setting (pooled over the rounds, and the median of the rounds' p99s), the ratio of the
loaded p99 to the unloaded one (the issue's goal: within 2x), and what bob got (answers
by status, per second); writes bench/results/fairness.json. The server shares the
machine's cores with the flood (and anything else running): compare settings within
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from tls_support import make_identities, tls_server

RATES = {"requests_per_second": 50, "burst": 100, "submits_per_second": 10}
#: Each setting's ``rate_limits`` (absent: the server's default in token mode).
SETTINGS: dict[str, dict[str, Any]] = {
    "off": {"rate_limits": None},
    "rates": {"rate_limits": {**RATES, "concurrent": 0}},
    "default": {},
    "cap1": {"rate_limits": {**RATES, "concurrent": 1}},
}

FLOOD = r"""
import asyncio, json, signal, ssl, sys, time
import httpx
url, cert, key, ca, path, n = sys.argv[1:7]
counts = {}
stop = asyncio.Event()
async def one():
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=url, verify=ctx, timeout=60, limits=limits) as c:
        while not stop.is_set():
            try:
                status = (await c.get(path)).status_code
            except httpx.TransportError:  # a connection idle while paused, closed by the server
                status = "error"
            counts[status] = counts.get(status, 0) + 1
async def main():
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await asyncio.gather(*(one() for _ in range(int(n))))
    print(json.dumps(counts), flush=True)
asyncio.run(main())
"""


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure(name: str, rounds: int, samples: int, interval: float, connections: int) -> dict[str, Any]:
    """alice's latencies (ms) unloaded and loaded against one server of setting ``name``."""
    root = Path(tempfile.mkdtemp(prefix=f"fair-{name}-"))
    (root / "ids").mkdir()
    ids = make_identities(root / "ids")
    with (
        tls_server(ids, root / "state", authz="token", **SETTINGS[name]) as server,
        server.client("alice") as alice,
        server.client("bob") as bob,
    ):
        jobid = alice.post("/v1/jobs/new", json={"script": "true"}).json()["jobid"]
        for _ in range(40):
            assert bob.post("/v1/jobs/new", json={"script": "true"}).status_code == 201
        u = ids.users["bob"]
        argv = [sys.executable, "-c", FLOOD, server.url, str(u / "id.crt"), str(u / "id.key")]
        argv += [str(ids.server / "CA.crt"), "/v1/jobs?view=full&limit=100", str(connections)]
        flood = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout is not None and flood.stdout.readline().strip() == "ready"
            os.kill(flood.pid, signal.SIGSTOP)
            lat: dict[str, list[list[float]]] = {"unloaded": [], "loaded": []}
            flooding = 0.0
            for _ in range(rounds):
                for phase in ("unloaded", "loaded"):
                    if phase == "loaded":
                        os.kill(flood.pid, signal.SIGCONT)
                        began = time.perf_counter()
                        time.sleep(0.5)  # the flood under way
                    lat[phase].append(_alice(alice, jobid, samples, interval))
                    if phase == "loaded":
                        os.kill(flood.pid, signal.SIGSTOP)
                        flooding += time.perf_counter() - began
            os.kill(flood.pid, signal.SIGCONT)
            flood.terminate()
            out = flood.communicate(timeout=60)[0]
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
    bob_counts: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    result: dict[str, Any] = {}
    for phase, runs in lat.items():
        pooled = [x for run in runs for x in run]
        result[f"{phase}_p50_ms"] = statistics.median(pooled) * 1000
        result[f"{phase}_p99_ms"] = quantile(pooled, 0.99) * 1000
        result[f"{phase}_p99_median_of_rounds_ms"] = statistics.median(quantile(r, 0.99) for r in runs) * 1000
    result["p99_loaded_over_unloaded"] = result["loaded_p99_ms"] / result["unloaded_p99_ms"]
    result["bob_per_s"] = {str(k): round(v / flooding, 1) for k, v in sorted(bob_counts.items())}
    return result


def _alice(client: Any, jobid: str, samples: int, interval: float) -> list[float]:
    lat = []
    next_at = time.perf_counter()
    for _ in range(samples):
        t = time.perf_counter()
        r = client.get(f"/v1/jobs/{jobid}")
        lat.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))
    return lat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--samples", type=int, default=150, help="alice's requests per phase of a round")
    p.add_argument("--interval", type=float, default=1 / 30, help="seconds between alice's requests")
    p.add_argument("--flood-connections", type=int, default=16)
    p.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "fairness.json")
    args = p.parse_args()
    results: dict[str, Any] = {"flood_connections": args.flood_connections, "rounds": args.rounds}
    for name in args.only:
        r = measure(name, args.rounds, args.samples, args.interval, args.flood_connections)
        results[name] = r
        print(
            f"{name:8} alice p50 {r['unloaded_p50_ms']:6.1f} -> {r['loaded_p50_ms']:6.1f} ms,"
            f" p99 {r['unloaded_p99_ms']:6.1f} -> {r['loaded_p99_ms']:6.1f} ms"
            f" (x{r['p99_loaded_over_unloaded']:.2f}; median of rounds"
            f" {r['unloaded_p99_median_of_rounds_ms']:.1f} -> {r['loaded_p99_median_of_rounds_ms']:.1f});"
            f" bob per s {r['bob_per_s']}",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
