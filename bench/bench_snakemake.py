"""What a Snakemake run costs through psik-api: `python bench/bench_snakemake.py [--jobs 100]`
(the `workflows` nox environment has snakemake and the plugin).

One workflow of N independent jobs (each writes one small file), run twice in the same
run of this script, each on a fresh copy: with `snakemake --executor psik-api` against a
`psik-api-server serve` in local mode (its directory_roots the workflow's directory), and
with Snakemake's own local executor (`--cores` = the CPU count). Reports each wall time
and every API request the psik-api run made, by kind, counted from the server's access
log. Through psik-api each job is a process of its own that starts Snakemake again (as on
any cluster executor), where the local executor runs the jobs' shell commands itself:
the difference is mostly that start-up, not the API.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

SNAKEFILE = """
rule all:
    input: expand("out/{{i}}.txt", i=range({jobs}))

rule one:
    output: "out/{{i}}.txt"
    resources: runtime=5
    shell: "echo {{wildcards.i}} > {{output}}"
"""

REQUEST = re.compile(r'"(GET|POST|DELETE|PUT|PATCH) (/v1/[^ ]*) HTTP/[0-9.]+" (\d{3})')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kind(method: str, path: str) -> str:
    """A request's kind: its method and path, ids replaced by {id}."""
    route = re.sub(r"/v1/jobs/[0-9.]+", "/v1/jobs/{id}", urlsplit(path).path)
    return f"{method} {route}"


def run_snakemake(workdir: Path, *args: str) -> float:
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True
    )
    if run.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--seconds-between-status-checks", type=int, default=1)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-snakemake-") as tmp:
        home = Path(tmp)
        workflows = home / "workflows"
        for name in ("psik-api", "local"):
            (workflows / name).mkdir(parents=True)
            (workflows / name / "Snakefile").write_text(SNAKEFILE.format(jobs=args.jobs))
        port = free_port()
        config = {
            "prefix": str(home / "jobs"),
            "database": str(home / "index.sqlite"),
            "state_dir": str(home / "state"),
            "directory_roots": [str(workflows)],
        }
        (home / "psik_api.json").write_text(json.dumps(config))
        log = home / "server.log"
        argv = [sys.executable, "-m", "psik_api_server", "serve", "--config", str(home / "psik_api.json")]
        with open(log, "wb") as out:
            server = subprocess.Popen([*argv, "--port", str(port)], stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            mark = log.stat().st_size
            through_api = run_snakemake(
                workflows / "psik-api",
                *("--executor", "psik-api", "--psik-api-url", url, "--jobs", str(args.jobs)),
                *("--seconds-between-status-checks", str(args.seconds_between_status_checks)),
            )
            with open(log, "rb") as f:
                f.seek(mark)
                requests = REQUEST.findall(f.read().decode(errors="replace"))
        finally:
            server.terminate()
            server.wait(timeout=30)
        local = run_snakemake(workflows / "local", "--cores", str(cores))
        for name in ("psik-api", "local"):
            made = len(list((workflows / name / "out").iterdir()))
            assert made == args.jobs, f"{name}: {made} of {args.jobs} outputs"
    kinds = Counter(kind(m, p) for m, p, _ in requests)
    print(f"{args.jobs} jobs, {cores} CPUs, status checks every {args.seconds_between_status_checks} s")
    print(f"  snakemake --executor psik-api: {through_api:7.1f} s, {len(requests)} API requests")
    for k, n in kinds.most_common():
        print(f"      {n:5d}  {k}")
    print(f"  snakemake --cores {cores} (local):  {local:7.1f} s")
    print(f"  ratio: {through_api / local:.1f}x")


if __name__ == "__main__":
    main()
