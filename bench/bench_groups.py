"""Groups: ``python bench/bench_groups.py [--jobs 300]``.

Against a live ``psik-api-server serve`` (local backend, its default job slots: most
jobs wait for one), the time to have ``--jobs`` trivial jobs created and queued:

* one ``POST /v1/groups`` with ``--jobs`` specs, against
* ``--jobs`` single ``POST /v1/jobs`` from one client, one after another,

each on a fresh server, in the same run; and the ratio (goal: the group at least 5x
faster). The jobs are then canceled. Writes bench/results/groups.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx
from bench_api import server_process


def _cancel_all(url: str, gid: str | None, ids: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        if gid is not None:
            http.delete(f"/v1/groups/{gid}")
        else:
            for jobid in ids:
                http.delete(f"/v1/jobs/{jobid}")


def one_group(url: str, jobs: int) -> float:
    body = {"jobs": [{"script": "sleep 30"} for _ in range(jobs)]}
    with httpx.Client(base_url=url, timeout=600) as http:
        http.post("/v1/groups", json={"jobs": [{"script": "true"}]}).raise_for_status()  # warm-up
        t0 = time.perf_counter()
        r = http.post("/v1/groups", json=body)
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
    _cancel_all(url, r.json()["group"], [])
    return elapsed


def single_posts(url: str, jobs: int) -> float:
    with httpx.Client(base_url=url, timeout=600) as http:
        http.post("/v1/jobs", json={"script": "true"}).raise_for_status()  # warm-up
        t0 = time.perf_counter()
        ids = []
        for _ in range(jobs):
            r = http.post("/v1/jobs", json={"script": "sleep 30"})
            r.raise_for_status()
            ids.append(r.json()["jobid"])
        elapsed = time.perf_counter() - t0
    _cancel_all(url, None, ids)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "groups.json")
    args = p.parse_args()
    results: dict[str, float] = {"jobs": args.jobs}
    with tempfile.TemporaryDirectory() as tmp:
        with server_process(Path(tmp) / "a") as (url, _):
            results["group_s"] = one_group(url, args.jobs)
        with server_process(Path(tmp) / "b") as (url, _):
            results["single_posts_s"] = single_posts(url, args.jobs)
    results["group_speedup"] = results["single_posts_s"] / results["group_s"]
    for key, value in results.items():
        print(f"{key:20s} {value:10.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
