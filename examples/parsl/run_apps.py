"""A Parsl program whose workers run in a block psik-api starts.

Start a server (local mode, jobs on this machine), then the program, in the same
environment (the client with its ``parsl`` extra, and the server)::

    pip install './packages/psik-api-client[parsl]' ./packages/psik-api-server
    python -m psik_api_server serve &          # http://127.0.0.1:8000
    python examples/parsl/run_apps.py           # or --url, --backend slurm, --apps 200

The provider submits one job (Parsl's worker pool, under bash) to the server's backend;
the apps run in it; at the end Parsl's cleanup cancels the job. ``psik-api ls --label
parsl-provider=<id>`` (the id is printed) shows the block's job and its logs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import parsl
from parsl.app.app import bash_app, python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor

from psik_api_client.parsl import PsikApiProvider


@python_app
def square(x: int) -> int:
    return x * x


@python_app
def node() -> str:
    import platform

    return platform.node()


@bash_app
def hello(stdout: str) -> str:
    return "echo hello from $(hostname)"


def config(url: str | None, backend: str | None, run_dir: str) -> tuple[Config, PsikApiProvider]:
    # The block's shell finds Parsl's worker pool where this interpreter has it.
    bin_dir = Path(sys.executable).parent
    provider = PsikApiProvider(
        url,  # None: $PSIK_API_UDS, $PSIK_API_URL, else http://127.0.0.1:8000
        backend=backend,  # None: the server's "default"
        walltime="00:10:00",
        spec={"labels": {"example": "parsl"}},
        worker_init=f"export PATH={bin_dir}:$PATH",
        status_polling_interval=2,
    )
    htex = HighThroughputExecutor(
        label="psik_htex",
        # The workers connect back to this program: loopback while the server runs its
        # jobs on this machine; a cluster's blocks need an address their nodes reach.
        address="127.0.0.1",
        max_workers_per_node=4,
        provider=provider,
    )
    return Config(executors=[htex], run_dir=run_dir, strategy="none"), provider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="the psik-api server (default: the client's)")
    parser.add_argument("--backend", help="the server's backend to run the block on")
    parser.add_argument("--apps", type=int, default=50)
    parser.add_argument("--run-dir", default="runinfo")
    args = parser.parse_args()

    cfg, provider = config(args.url, args.backend, args.run_dir)
    print(f"blocks are labelled parsl-provider={provider.instance_id}")
    t0 = time.perf_counter()
    with parsl.load(cfg):  # exit_mode "cleanup": the DFK cancels the block at the end
        results = [f.result() for f in [square(i) for i in range(args.apps)]]
        assert results == [i * i for i in range(args.apps)]
        where = node().result()
        # An absolute path: the worker's directory is the block's job directory.
        hello(stdout=str(Path("hello.out").resolve())).result()
    parsl.clear()
    print(f"{args.apps} apps in {time.perf_counter() - t0:.1f} s on {where} (this is {platform.node()})")
    print(Path("hello.out").read_text().strip())


if __name__ == "__main__":
    main()
