"""Every figure behind the README's performance sentences, in one run: ``nox -s bench``.

    python bench/run_all.py [--full | --smoke] [--only NAME ...]

Runs the bench/ scripts one after another as subprocesses (each measures its figure and
its floor side by side in the same run, on a fresh server and data directory), reads the
JSON each writes, and writes bench/results/summary.json and bench/results/summary.md: a
table of figure, ours, floor, ratio (ours / floor), goal, and the command that reproduces
the figure, with the machine (CPUs, Python, load average) and the date. The scripts'
own output goes to bench/results/logs/NAME.log.

Sizes: the default ones finish in about 15 minutes on 2 cores; ``--full`` takes larger
samples (more submits, latency runs, subscribers, transfers); ``--smoke`` tiny ones that only
show that every script still runs (a minute; not figures to quote: they go to
bench/results/smoke/ instead, beside no real ones). ``--only NAME`` runs
one benchmark (repeatable; ``store`` means every ``store-N``) and keeps the other rows
of an earlier summary.json. ``--out DIR`` writes all of it to DIR instead (the smoke
test's private directory, never the repository's). Machines here are shared and noisy:
compare the ratio, which is of two figures measured minutes apart, not absolute times
across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SIZES = ("smoke", "default", "full")


@dataclass(frozen=True)
class Row:
    """One line of the table; ``met`` is None where the figure has no stated goal."""

    figure: str
    ours: str
    floor: str
    ratio: str
    goal: str
    met: bool | None = None


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _arg(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def submit_rate_rows(r: dict[str, Any], argv: list[str]) -> list[Row]:
    clients = _arg(argv, "--clients", "8")
    rows = []
    for key in sorted((k for k in r if k.startswith("api_submits_per_s_backlog")), key=len):
        backlog = int(key.removeprefix("api_submits_per_s_backlog"))
        ratio = r[f"ratio_api_over_psik_backlog{backlog}"]
        rows.append(
            Row(
                f"submit rate, {clients} clients, {backlog:,} `new` jobs in the store",
                f"{r[key]:.0f}/s",
                f"psik in-process create+submit {r[f'psik_submits_per_s_backlog{backlog}']:.0f}/s",
                _x(ratio),
                ">= 1.0x",
                ratio >= 1.0,
            )
        )
    return rows


def latency_rows(r: dict[str, Any], argv: list[str]) -> list[Row]:
    runs = _arg(argv, "--latency-runs", "30")
    return [
        Row(
            f"submit to completed, trivial job (median of {runs}; p90)",
            f"{r['api_submit_to_final_median_s'] * 1e3:.0f} ms; "
            f"{r['api_submit_to_final_p90_s'] * 1e3:.0f} ms",
            f"psik in-process create+submit+poll {r['psik_submit_to_final_median_s'] * 1e3:.0f} ms",
            _x(r["latency_ratio_api_over_psik"]),
            "-",
        )
    ]


def store_rows(r: dict[str, Any], startup: bool) -> list[Row]:
    n = r["jobs"]
    first, first99 = r["app_first_page_ms"], r["app_first_page_p99_ms"]
    last, last99 = r["app_last_page_ms"], r["app_last_page_p99_ms"]
    rows = [
        Row(
            f"list, first page of 100 at {n:,} jobs (p50 / p99)",
            f"{first:.2f} / {first99:.2f} ms",
            f"JobStore.list alone {r['list_store']['none_first_ms']:.2f} ms",
            _x(first / r["list_store"]["none_first_ms"]),
            "-",
        ),
        Row(
            f"list, deepest page of 100 at {n:,} jobs (p50 / p99)",
            f"{last:.2f} / {last99:.2f} ms",
            f"first page {first:.2f} ms",
            _x(r["list_last_vs_first_app"]),
            "<= 1.5x",
            r["list_last_vs_first_app"] <= 1.5,
        ),
    ]
    if startup:
        rows += [
            Row(
                f"first start over {n:,} job directories",
                f"{r['first_start_s']:.1f} s",
                f"read + parse + one SQLite transaction {r['floor_s']:.1f} s",
                _x(r["first_start_vs_floor"]),
                "<= 2x",
                r["first_start_vs_floor"] <= 2,
            ),
            Row(
                f"restart over {n:,} jobs (index in line)",
                f"{r['restart_s']:.2f} s",
                "-",
                "-",
                "< 1 s",
                r["restart_s"] < 1,
            ),
        ]
    return rows


def events_rows(r: dict[str, Any], argv: list[str]) -> list[Row]:
    ratio = r["wait_p50_ms"] / r["push_p50_ms"]
    return [
        Row(
            f"`wait()` returns after the final status row, {r['push_jobs']} jobs (p50 / p99)",
            f"{r['wait_p50_ms']:.1f} / {r['wait_p99_ms']:.1f} ms",
            f"its event read off a raw SSE stream {r['push_p50_ms']:.1f} / {r['push_p99_ms']:.1f} ms",
            _x(ratio),
            "p50 < 20 ms, p99 < 100 ms",
            r["wait_p50_ms"] < 20 and r["wait_p99_ms"] < 100,
        ),
        Row(
            f"`wait_all` on {r['wait_all_jobs']} jobs: after the last final row; requests made",
            f"{r['wait_all_after_last_final_ms']:.0f} ms; {r['wait_all_requests']} requests",
            "-",
            "-",
            "O(1) requests",
            None,
        ),
    ]


def transfer_rows(r: dict[str, Any], argv: list[str]) -> list[Row]:
    size = f"{r['size_mib'] / 1024:g} GiB" if r["size_mib"] >= 1024 else f"{r['size_mib']} MiB"
    cp, sync = min(r["cp_s"]), min(r["cp_fsync_s"])
    rows = []
    for way in ("upload", "download"):
        ratio = r[f"{way}_ratio_over_cp"]
        rows.append(
            Row(
                f"{size} {way} through `Client` (best of {len(r['cp_s'])})",
                f"{min(r[f'{way}_s']):.2f} s ({r[f'{way}_mb_s']:.0f} MB/s)",
                f"`cp` on the same disk {cp:.2f} s (with fsync {sync:.2f} s)",
                _x(ratio),
                "<= 3x",
                ratio <= 3,
            )
        )
    rows.append(
        Row(
            f"server peak RSS growth during a {size} transfer",
            f"{r['server_peak_rss_growth_mib']:.1f} MiB",
            f"idle server {r['server_rss_mib_idle']:.0f} MiB",
            "-",
            "flat",
            r["server_peak_rss_growth_mib"] < 64,
        )
    )
    return rows


def fanout_rows(r: dict[str, Any], argv: list[str]) -> list[Row]:
    ratio = r["ratio_api_over_psik"]
    return [
        Row(
            f"{r['jobs']:,} jobs submitted at once from one AsyncClient, `wait_all`",
            f"{r['api_seconds']:.1f} s",
            f"psik in-process create+submit, status files {r['psik_seconds']:.1f} s",
            _x(ratio),
            "<= 1.3x",
            ratio <= 1.3,
        )
    ]


def groups_rows(r: dict[str, Any], argv: list[str]) -> list[Row]:
    n = int(r["jobs"])
    ratio = r["group_s"] / r["single_posts_s"]
    return [
        Row(
            f"{n} jobs created and queued by one `POST /v1/groups`",
            f"{r['group_s']:.2f} s",
            f"{n} single `POST /v1/jobs` {r['single_posts_s']:.2f} s",
            _x(ratio),
            "<= 0.2x (5x faster)",
            ratio <= 0.2,
        )
    ]


@dataclass(frozen=True)
class Bench:
    """A script, its arguments at each size, and how its JSON becomes rows."""

    name: str
    script: str
    sizes: dict[str, list[str]]
    rows: Callable[[dict[str, Any], list[str]], list[Row]]


def _store(n: int, smoke: int, startup: bool) -> Bench:
    args = ["--requests", "200"]  # p99 of 200 requests per page
    return Bench(
        f"store-{n}",
        "bench_store.py",
        {"smoke": ["--jobs", str(smoke), "--requests", "5"], "default": ["--jobs", str(n), *args]}
        | {"full": ["--jobs", str(n), *args]},
        lambda r, argv: store_rows(r, startup),
    )


BENCHES = [
    Bench(
        "submit_rate",
        "bench_submit_rate.py",
        {
            "smoke": ["--clients", "2", "--submits", "4", "--backlog", "10"],
            "default": ["--clients", "8", "--submits", "400", "--backlog", "2000"],
            "full": ["--clients", "8", "--submits", "800", "--backlog", "2000"],
        },
        submit_rate_rows,
    ),
    Bench(
        "latency",
        "bench_api.py",
        {
            "smoke": ["--latency-runs", "3", "--jobs", "100", "--burst", "5"],
            "default": ["--latency-runs", "30", "--jobs", "2000", "--burst", "100"],
            "full": ["--latency-runs", "100", "--jobs", "2000", "--burst", "100"],
        },
        latency_rows,
    ),
    _store(100, 100, False),
    _store(10_000, 300, False),
    _store(100_000, 500, True),
    Bench(
        "events",
        "bench_events.py",
        {
            "smoke": ["--jobs", "5", "--subscribers", "5", "--wait-all-jobs", "5"],
            "default": ["--jobs", "200", "--subscribers", "200", "--wait-all-jobs", "300"],
            "full": ["--jobs", "200", "--subscribers", "1000", "--wait-all-jobs", "300"],
        },
        events_rows,
    ),
    Bench(
        "transfer",
        "bench_transfer.py",
        {
            "smoke": ["--size-mib", "4", "--repeat", "1"],
            "default": ["--size-mib", "1024", "--repeat", "2"],
            "full": ["--size-mib", "1024", "--repeat", "3"],
        },
        transfer_rows,
    ),
    Bench(
        "fanout",
        "bench_fanout.py",
        {"smoke": ["--jobs", "10"], "default": ["--jobs", "1000"], "full": ["--jobs", "1000"]},
        fanout_rows,
    ),
    Bench(
        "groups",
        "bench_groups.py",
        {"smoke": ["--jobs", "10"], "default": ["--jobs", "300"], "full": ["--jobs", "300"]},
        groups_rows,
    ),
]


def _json_option(bench: Bench) -> str:
    return "--out" if bench.script == "bench_transfer.py" else "--json"


def _selected(only: list[str]) -> list[Bench]:
    names = {n for item in only for n in item.split(",") if n}
    chosen = [b for b in BENCHES if not names or b.name in names or b.name.split("-")[0] in names]
    unknown = names - {b.name for b in BENCHES} - {b.name.split("-")[0] for b in BENCHES}
    if unknown:
        raise SystemExit(f"unknown benchmark {sorted(unknown)}: one of {[b.name for b in BENCHES]}")
    return chosen


def _commit() -> str:
    """The commit measured, ``+changes`` where the packages or bench/ differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "packages", "bench")
    return head + ("+changes" if changed else "")


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": _commit(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


def run(bench: Bench, size: str, results: Path) -> dict[str, Any]:
    """Run one script at ``size``, its JSON into ``results``; its rows, or the error that
    stopped it."""
    out = results / f"{bench.name}.json"
    out.unlink(missing_ok=True)  # never read an earlier run's figures as this one's
    argv = bench.sizes[size]
    shown = shlex.join(["python", f"bench/{bench.script}", *argv])
    log = results / "logs" / f"{bench.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {bench.name}: {shown}", flush=True)
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(
            [sys.executable, str(HERE / bench.script), *argv, _json_option(bench), str(out)],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            check=False,
        )
    entry: dict[str, Any] = {
        "command": shown,
        "size": size,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if done.returncode != 0 or not out.exists():
        tail = log.read_text().splitlines()[-5:]
        entry["error"] = f"exit {done.returncode}: " + " | ".join(tail)
        print(f"   failed after {entry['seconds']} s: see {log}", flush=True)
        return entry
    result = json.loads(out.read_text())
    entry["result"] = result
    entry["rows"] = [asdict(row) for row in bench.rows(result, argv)]
    print(f"   {entry['seconds']} s", flush=True)
    return entry


def markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "# psik-api benchmarks",
        "",
        f"{summary['date'][:16].replace('T', ' ')} UTC, `{summary['command']}` at commit {m['commit']}, "
        f"{summary['seconds']:.0f} s. "
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['system']}, Python {m['python']}; "
        f"load average {m['load_average_at_start']} at the start, {m['load_average_at_end']} at the end "
        "(a shared machine: compare the ratios, each of two figures from the same run).",
        "",
        "| figure | ours | floor (same run) | ratio | goal | command |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in summary["benches"].items():
        if "error" in entry:
            lines.append(f"| {name}: **failed** ({entry['error'][:120]}) | | | | | `{entry['command']}` |")
            continue
        for row in entry["rows"]:
            met = {True: " (met)", False: " (**not met**)", None: ""}[row["met"]]
            lines.append(
                f"| {row['figure']} | {row['ours']} | {row['floor']} | {row['ratio']} "
                f"| {row['goal']}{met} | `{entry['command']}` |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="the sizes the goals are stated at (slower)")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: only that every script runs")
    names = ", ".join(b.name for b in BENCHES)
    p.add_argument("--only", action="append", default=[], metavar="NAME", help=names)
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write the summary, JSON and logs here (default: bench/results/, with --smoke its smoke/)",
    )
    args = p.parse_args()
    size = "full" if args.full else "smoke" if args.smoke else "default"
    chosen = _selected(args.only)
    # A smoke run's figures mean nothing: never let them replace a real run's.
    results = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    summary_path = results / "summary.json"
    benches: dict[str, Any] = {}
    if args.only and summary_path.exists():  # keep the rows this run does not redo
        benches = json.loads(summary_path.read_text()).get("benches", {})
    info = machine()
    started = time.perf_counter()
    for bench in chosen:
        benches[bench.name] = run(bench, size, results)
    info["load_average_at_end"] = round(os.getloadavg()[0], 2)
    order = [b.name for b in BENCHES]
    summary: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/run_all.py", *sys.argv[1:]]),
        "size": size,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": info,
        "benches": {name: benches[name] for name in order if name in benches},
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    (results / "summary.md").write_text(markdown(summary))
    print((results / "summary.md").read_text())
    failed = [name for name, entry in summary["benches"].items() if "error" in entry]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (logs in {results / 'logs'})")


if __name__ == "__main__":
    main()
