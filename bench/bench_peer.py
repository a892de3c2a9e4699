"""The cost of knowing who calls (authz: local): run with `python bench/bench_peer.py`.

1. One uid lookup of a loopback TCP connection, both ways the server can do it:
   sock_diag netlink (the exact socket, asked of the kernel; what the server uses) and
   the /proc/net/tcp + tcp6 tables (the fallback where netlink is not allowed), with
   0, 1,000 and 4,000 other open loopback connections on the machine. The server does
   one lookup per connection, when it accepts the connection.
2. What that adds to a request over HTTP, measured on a live uvicorn: a new connection
   with one GET each (one lookup per request), against one keep-alive connection (one
   lookup in all), with the real lookup and with a no-op one.

Machines here are shared and noisy: compare within one run. Results are printed and
written to bench/results/peer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from psik_api_server.app import create_app
from psik_api_server.auth.peer import PeerLookup
from psik_api_server.settings import Settings
from support import LiveServer


def _lookup_us(lookup: PeerLookup, accepted: socket.socket, n: int) -> float:
    peer, local = accepted.getpeername(), accepted.getsockname()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        uid = lookup.tcp_uid(peer, local)
        times.append(time.perf_counter() - t)
        assert uid == os.geteuid(), uid
    return statistics.median(times) * 1e6


def bench_lookup(counts: list[int], n: int) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0), backlog=4096) as server:
        pairs: list[tuple[socket.socket, socket.socket]] = []
        try:
            for count in counts:
                while len(pairs) < count + 1:
                    client = socket.create_connection(server.getsockname())
                    pairs.append((client, server.accept()[0]))
                accepted = pairs[-1][1]
                rows = sum(1 for _ in open("/proc/net/tcp")) - 1  # noqa: SIM115
                out[f"lookup_sock_diag_us_{count}_others"] = _lookup_us(PeerLookup(), accepted, n)
                out[f"lookup_proc_tables_us_{count}_others"] = _lookup_us(
                    PeerLookup(sock_diag=False), accepted, max(5, n // 10)
                )
                out[f"proc_net_tcp_rows_{count}_others"] = rows
        finally:
            for client, accepted in pairs:
                client.close()
                accepted.close()
    return out


class NoLookup(PeerLookup):
    def tcp_uid(self, client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
        return os.geteuid()


def bench_http(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lookups = {"real": PeerLookup(), "noop": NoLookup()}
    times: dict[str, list[float]] = {f"{kind}_{name}": [] for kind in ("new", "kept") for name in lookups}
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(prefix=Path(tmp) / "jobs", database=Path(tmp) / "index.sqlite"))
        with (
            LiveServer(app) as live,
            httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as fresh,
            httpx.Client() as kept,
        ):
            url = f"{live.url}/healthz"
            for _ in range(10):  # warm up
                fresh.get(url)
            for _ in range(n):  # interleaved, so that noise hits both alike
                for name, lookup in lookups.items():
                    app.state.context.peer_lookup = lookup
                    t = time.perf_counter()
                    fresh.get(url).raise_for_status()  # a new connection: one lookup
                    times[f"new_{name}"].append(time.perf_counter() - t)
            kept.get(url)
            for name, lookup in lookups.items():
                app.state.context.peer_lookup = lookup
                for _ in range(n):
                    t = time.perf_counter()
                    kept.get(url).raise_for_status()  # one connection: no further lookup
                    times[f"kept_{name}"].append(time.perf_counter() - t)
    for key, values in times.items():
        kind, name = key.split("_")
        label = "new_connection_get" if kind == "new" else "keepalive_get"
        out[f"{label}_ms_{name}_lookup"] = statistics.median(values) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="repetitions per figure")
    p.add_argument("--others", type=int, nargs="*", default=[0, 1000, 4000])
    args = p.parse_args()
    res = {**bench_lookup(args.others, args.n), **bench_http(args.n)}
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.1f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "peer.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
