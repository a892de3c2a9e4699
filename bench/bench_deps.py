"""Dependency release latency: ``python bench/bench_deps.py [--chains 100]`` (issue 18).

A live ``psik-api-server serve`` (local backend, no practical slot cap) on a fresh data
directory. For each of N chains, one after the other: a parent that runs until its gate
file exists, and a child submitted with ``after: [parent]`` (it waits, ``queued``, with
nothing launched); the gate is opened, and once the child ended, the latency is read off
the two jobs' own status rows: from the parent's final row to the child's ``queued`` row
with a PID (the launch). That spans the parent's end being seen (the watcher), recorded,
the child reconsidered, and launched. p50/p99 printed, and written to bench/results/deps.json
(``--slurm``: the same on a Slurm backend, the server's jobs sbatch'ed to the cluster that
``SLURM_CONF`` names, e.g. ``scripts/slurm_cluster.py up --state /tmp/psik-api-slurm``;
there the launch is the queued row with Slurm's job id, and Slurm's own scheduling is in
the figure; written to bench/results/deps_slurm.json).
Machines here are shared and noisy: read the figures as an order of magnitude.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_api import server

from psik_api_client import AsyncClient

UNCAPPED = {"backends": {"default": {"type": "local", "max_running": 100_000}}}
SLURM = {
    "backends": {
        "default": {"type": "slurm", "queue_name": "debug", "attributes": {"psik_python": sys.executable}}
    }
}


def _launched(job: Any) -> float:
    """The time of the job's queued row with a PID or Slurm job id (the backend took it)."""
    rows = [h for h in job.history if h.state == "queued" and h.info.isdigit()]
    assert len(rows) == 1, job.history
    return float(rows[0].time.timestamp())


def _ended(job: Any) -> float:
    return min(
        float(h.time.timestamp()) for h in job.history if h.state in ("completed", "failed", "canceled")
    )


async def chains(url: str, n: int, gates: Path) -> list[float]:
    """Latencies (seconds) of ``n`` chains, one after the other."""
    out: list[float] = []
    async with AsyncClient(url, timeout=120) as api:
        await api.wait((await api.submit({"script": "true"})).jobid, timeout=60)  # warm-up
        for i in range(n):
            gate = gates / f"g{i}"
            parent = await api.submit({"script": f"while [ ! -e {gate} ]; do sleep 0.005; done"})
            child = await api.submit({"script": "true", "after": [{"jobid": parent.jobid}]})
            assert child.state == "queued" and child.native_id is None, child.history
            gate.touch()
            done = await api.wait(child.jobid, timeout=60)
            assert done.state == "completed", done.history
            p = await api.get(parent.jobid)
            out.append(_launched(done) - _ended(p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=100)
    ap.add_argument("--slurm", action="store_true", help="a Slurm backend (SLURM_CONF's cluster)")
    args = ap.parse_args()
    backend = "slurm" if args.slurm else "local"
    with tempfile.TemporaryDirectory(prefix="bench-deps-") as tmp:
        root = Path(tmp)
        (root / "gates").mkdir()
        with server(root / "data", SLURM if args.slurm else UNCAPPED) as url:
            lat = asyncio.run(chains(url, args.chains, root / "gates"))
    lat.sort()
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    result = {
        "chains": len(lat),
        "release_p50_ms": round(p50 * 1000, 1),
        "release_p99_ms": round(p99 * 1000, 1),
        "release_max_ms": round(lat[-1] * 1000, 1),
        "backend": backend,
    }
    print(
        f"parent's final row -> child's launch (queued row with a PID), {len(lat)} chains, {backend}: "
        f"p50 {result['release_p50_ms']} ms, p99 {result['release_p99_ms']} ms, "
        f"max {result['release_max_ms']} ms"
    )
    out = Path(__file__).parent / "results" / ("deps_slurm.json" if args.slurm else "deps.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
