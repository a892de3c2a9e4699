"""Large-file transfer through ``Client`` against ``cp`` on the same disk (issue 16).

Starts ``psik-api-server serve`` on a fresh data directory, writes a file of
``--size-mib`` random MiB, then in one run: ``cp`` of it (the floor), an upload to a
job's files through ``Client.upload``, a download back through ``Client.download``
(checksums compared), and how much the server's peak RSS (``VmHWM``) grew during each. The
server's files and the local ones are on the same disk (one temp directory).

Machines here are shared and noisy: compare the ratios within one run. Results are
printed and written to bench/results/transfer.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from psik_api_client import Client

sys.path.insert(0, str(Path(__file__).parent))
from bench_api import server_process


def rss_mib(pid: int, what: str = "VmHWM") -> float:
    """The process's peak resident set (``VmHWM``) or the current one (``VmRSS``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{what}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> float:
    """Start a new peak-RSS measurement (Linux: ``5 > clear_refs``); the RSS now, MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_mib(pid, "VmRSS")


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.write(block[: size & ((1 << 20) - 1)])
        f.flush()
        os.fsync(f.fileno())


def timed(fn: object, *args: object) -> float:
    assert callable(fn)
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def cp(src: Path, dst: Path) -> None:
    subprocess.run(["cp", str(src), str(dst)], check=True)


def cp_fsync(src: Path, dst: Path) -> None:
    """``cp`` then ``fsync``, as an upload is on disk before it is answered."""
    cp(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=2, help="best of this many of each")
    p.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "transfer.json"))
    args = p.parse_args()
    size = args.size_mib << 20
    res: dict[str, object] = {"size_mib": args.size_mib}
    with tempfile.TemporaryDirectory(prefix="psik-bench-transfer-", dir=args.dir) as tmp:
        base = Path(tmp)
        src = base / "source.bin"
        make_file(src, size)
        expected = sha256_of(src)
        with server_process(base / "data") as (url, pid), Client(url, timeout=600) as api:
            jobid = api.create({"script": "true"}).jobid
            res["server_rss_mib_idle"] = rss_mib(pid, "VmRSS")
            cps, syncs, ups, downs, grew = [], [], [], [], []
            for i in range(args.repeat):
                copy = base / f"copy{i}.bin"
                cps.append(timed(cp, src, copy))
                copy.unlink()
                syncs.append(timed(cp_fsync, src, copy))
                copy.unlink()
                before = reset_peak(pid)
                ups.append(timed(api.upload, jobid, src, "big.bin"))
                grew.append(rss_mib(pid) - before)
                back = base / f"back{i}.bin"
                before = reset_peak(pid)
                downs.append(timed(api.download, jobid, "big.bin", back))
                grew.append(rss_mib(pid) - before)
                if sha256_of(back) != expected:
                    raise SystemExit(f"the downloaded file differs from the uploaded one ({back})")
                back.unlink()
            res["server_peak_rss_mib"] = rss_mib(pid)
            res["server_peak_rss_growth_mib"] = max(grew)  # during a transfer, over its start
    best_cp, best_up, best_down = min(cps), min(ups), min(downs)
    res |= {
        "cp_s": cps,
        "cp_fsync_s": syncs,
        "upload_s": ups,
        "download_s": downs,
        "upload_mb_s": size / min(ups) / 1e6,
        "download_mb_s": size / min(downs) / 1e6,
        "upload_ratio_over_cp": best_up / best_cp,
        "download_ratio_over_cp": best_down / best_cp,
    }
    for key, value in res.items():
        shown = [round(v, 3) for v in value] if isinstance(value, list) else value
        print(f"{key:28} {round(shown, 3) if isinstance(shown, float) else shown}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
