"""Parsl benchmark: 50 trivial apps through a HighThroughputExecutor whose block
psik-api starts (PsikApiProvider on a local server) against the same executor on
Parsl's own LocalProvider, alternately in one run.

    python bench/bench_parsl.py [--runs 3] [--apps 50]

Each run times, from ``parsl.load`` on: the block's start and every app's result
("apps"), then the DFK's cleanup, which cancels the block ("cleanup"); and counts the
requests the provider sent. Needs the workflows group (parsl). Medians are printed and
written to bench/results/parsl.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import parsl
from bench_api import server_process
from parsl.app.app import python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider
from parsl.providers.base import ExecutionProvider

from psik_api_client.parsl import PsikApiProvider

BIN = Path(sys.executable).parent
WORKER_INIT = f"export PATH={BIN}:$PATH"


@python_app
def double(x: int) -> int:
    return 2 * x


class Counting(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return super().handle_request(request)


def one_run(provider: ExecutionProvider, apps: int, run_dir: Path) -> dict[str, float]:
    config = Config(
        executors=[
            HighThroughputExecutor(
                label="htex",
                address="127.0.0.1",
                max_workers_per_node=4,
                interchange_launch_cmd=[str(BIN / "interchange.py")],
                provider=provider,
            )
        ],
        run_dir=str(run_dir),
        strategy="none",
        initialize_logging=False,
    )
    t0 = time.perf_counter()
    dfk = parsl.load(config)
    try:
        results = [f.result(timeout=300) for f in [double(i) for i in range(apps)]]
        t1 = time.perf_counter()
        assert results == [2 * i for i in range(apps)]
    finally:
        dfk.cleanup()
        parsl.clear()
    t2 = time.perf_counter()
    return {"apps": t1 - t0, "cleanup": t2 - t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--apps", type=int, default=50)
    args = parser.parse_args()

    times: dict[str, list[dict[str, float]]] = {"psik-api": [], "local": []}
    requests: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        config = {"backends": {"default": {"type": "local"}}, "watch_interval": 0.05}
        with server_process(data / "server", config) as (url, _):
            for run in range(args.runs):
                counter = Counting()
                psik = PsikApiProvider(
                    url, worker_init=WORKER_INIT, status_polling_interval=1, transport=counter
                )
                times["psik-api"].append(one_run(psik, args.apps, data / f"psik{run}"))
                psik.close()
                requests.append(counter.requests)
                local = LocalProvider(worker_init=WORKER_INIT)
                times["local"].append(one_run(local, args.apps, data / f"local{run}"))
                print(
                    f"run {run + 1}: psik-api {times['psik-api'][-1]}, local {times['local'][-1]}", flush=True
                )

    summary: dict[str, Any] = {"apps": args.apps, "runs": args.runs, "provider_requests": requests}
    for name, rows in times.items():
        summary[name] = {k: round(statistics.median(r[k] for r in rows), 3) for k in ("apps", "cleanup")}
    summary["ratio_apps"] = round(summary["psik-api"]["apps"] / summary["local"]["apps"], 2)
    print(json.dumps(summary, indent=2))
    out = Path(__file__).parent / "results" / "parsl.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
