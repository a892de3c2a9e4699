"""Slurm benchmark: submit-to-completed of a trivial job through the API vs plain sbatch.

    python bench/bench_slurm.py [--runs 5] [--state /tmp/psik-api-slurm]

Brings up the single-node cluster of scripts/slurm_cluster.py (root; installs Debian's
Slurm packages if missing; stops it at the end if it started it), starts
`psik-api-server serve` with a `slurm` backend on a fresh prefix, and times, alternately:

* API: `POST /v1/jobs` of `echo hello`, then the client's wait() until `completed`;
* sbatch: `sbatch` of the same script (`#!/bin/bash`), then polling `squeue`/`scontrol`
  every 20 ms until Slurm says COMPLETED.

Both run on the same cluster, one job at a time. The API job runs through psik's batch
script (a Python that imports psik on the "compute node", then the script), so the
difference is psik's own cost on the node plus the server's. Medians are printed with
their ratio and written to bench/results/slurm.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from psik_api_client import Client

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "#!/bin/bash\necho hello"


def harness() -> object:
    spec = importlib.util.spec_from_file_location("slurm_cluster", ROOT / "scripts" / "slurm_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def slurm_state(jobid: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True, check=False
    ).stdout
    for word in out.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return ""


def time_sbatch(workdir: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        ["sbatch", "--parsable", "-o", str(workdir / "slurm-%j.out"), "--exclusive"],
        input=SCRIPT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobid = out.strip().split(";")[0]
    while slurm_state(jobid) != "COMPLETED":
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"sbatch job {jobid} did not complete: {slurm_state(jobid)}")
        time.sleep(0.02)
    return time.perf_counter() - t0


def time_api(api: Client) -> float:
    t0 = time.perf_counter()
    job = api.submit({"backend": "slurm", "script": SCRIPT, "resources": {"duration": 2}})
    done = api.wait(job.jobid, timeout=120, poll_interval=0.02)
    elapsed = time.perf_counter() - t0
    if done.state.value != "completed":
        raise RuntimeError(f"API job {job.jobid} ended {done.state.value}: {done.history[-1].info}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--state", type=Path, default=Path("/tmp/psik-api-slurm"))
    args = parser.parse_args()

    sc: object = harness()
    cluster = sc.Cluster(args.state)  # type: ignore[attr-defined]
    started = sc.up(cluster)  # type: ignore[attr-defined]
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        with tempfile.TemporaryDirectory(prefix="psik-bench-") as tmp:
            data = Path(tmp)
            config = {
                "prefix": str(data / "jobs"),
                "backends": {
                    "slurm": {
                        "type": "slurm",
                        "queue_name": "debug",
                        "attributes": {"psik_python": sys.executable},
                    }
                },
            }
            (data / "psik_api.json").write_text(json.dumps(config))
            env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
            env["PSIK_API_CONFIG"] = str(data / "psik_api.json")
            port = free_port()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "psik_api_server",
                    "serve",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                env=env,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        httpx.get(url + "/healthz", timeout=1).raise_for_status()
                        break
                    except httpx.HTTPError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                api_times: list[float] = []
                sbatch_times: list[float] = []
                with Client(url) as api:
                    time_api(api)  # warm-up: imports, first scheduling
                    for _ in range(args.runs):
                        api_times.append(time_api(api))
                        sbatch_times.append(time_sbatch(data))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    finally:
        if started:
            sc.down(cluster)  # type: ignore[attr-defined]

    api_med, sb_med = statistics.median(api_times), statistics.median(sbatch_times)
    result = {
        "runs": args.runs,
        "api_submit_to_completed_s": [round(t, 3) for t in api_times],
        "sbatch_submit_to_completed_s": [round(t, 3) for t in sbatch_times],
        "api_median_s": round(api_med, 3),
        "sbatch_median_s": round(sb_med, 3),
        "ratio_api_over_sbatch": round(api_med / sb_med, 2),
    }
    print(f"submit -> completed, trivial job, median of {args.runs}:")
    print(f"  through the API (psik batch script): {api_med:.3f} s  {result['api_submit_to_completed_s']}")
    print(f"  sbatch directly:                     {sb_med:.3f} s  {result['sbatch_submit_to_completed_s']}")
    print(f"  ratio API / sbatch: {api_med / sb_med:.2f}")
    out = ROOT / "bench" / "results" / "slurm.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
