"""``GET /metrics``: what the server is doing, in Prometheus' text format (prometheus-client).

Each app has its own registry (:class:`ServerMetrics`, built by ``create_app``): tests
build many apps in one process, and the global registry would mix them. Two kinds of
figure:

* kept as they happen, by prometheus-client's own types: each request (told by
  :class:`~..serving.request_log.RequestLog` once its answer is over) and each status
  row's watcher lag (told by :class:`~..jobs.records.JobRecords` once it is in the index);
* read when scraped (:class:`_ScrapeCollector`, in a worker thread): jobs by backend
  and state (one ``GROUP BY`` on the index), job slots in use (the index's slot column),
  open event subscriptions and events sent, liveness rounds and the jobs they failed,
  the launcher's unanswered submits, whether the prefix or the index is full, and how
  long start-up took.

Label values are bounded: a route is its template (never the raw path: no job ids),
``unmatched`` when no route took it; a method is one of HTTP's, else ``other``; a
backend is a configured one, else ``other``; no label names a user or a job.

Who may read: local mode, the owner (as every route); token mode, the callers named in
``metrics_readers`` (none by default), and never with a token narrowed to jobs (the
token authenticator refuses it, ``auth.token``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from psik_api_core import JobState, ProblemCode

from ..aio import in_thread
from ..auth.authenticator import principal
from ..context import context
from ..errors import ApiError
from ..jobs.diskfull import INDEX, PREFIX
from ..serving.request_log import route_template

if TYPE_CHECKING:
    from ..backends.local.launcher import LocalLauncher
    from ..jobs.service import JobService
    from ..jobs.store import JobStore

#: What ``GET /metrics`` answers with: the text format 0.0.4, which every scraper reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Every metric's name starts with it.
NAMESPACE = "psik_api"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Seconds; a request is a millisecond (a state) to minutes (a stream, a large upload).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: Seconds; the watcher's tick is 50 ms, a busy or full index holds changes for longer.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ServerMetrics:
    """One app's registry and the figures it keeps (building it does no I/O)."""

    def __init__(self, service: JobService) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            f"{NAMESPACE}_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{NAMESPACE}_http_request_duration_seconds",
            "Seconds from a request's arrival to the end of its answer (an event stream: its"
            " whole life), by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.watcher_lag = Histogram(
            f"{NAMESPACE}_watcher_lag_seconds",
            "Seconds from a status row's own time (as the job wrote it) to its change being in the index.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        #: Seconds the job service took to start (index opened and reconciled with the job
        #: directories, a dead server's work finished); None until it has started.
        self.startup_seconds: float | None = None
        # No describe(): the registry must not call collect() (a query) while building.
        self.registry.register(_ScrapeCollector(self))
        service.records.observe_lag = self.watcher_lag.observe

    def observe_request(self, scope: Scope, status: int, seconds: float) -> None:
        """One request answered (the :class:`RequestLog` callback)."""
        route = route_template(scope)
        method = str(scope.get("method", ""))
        method = method if method in _METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in the text format (blocking: it reads the index)."""
        return generate_latest(self.registry)


def _index_counts(store: JobStore) -> tuple[list[Any], list[Any]]:
    """Jobs by backend and state, and slots held by backend. The first reads every job
    row (~0.1 s at 100,000 jobs), so it runs on a connection of its own, read-only:
    SQLite's WAL lets it read beside the server's writes, and the store's lock (which
    every request's index work takes) is not held meanwhile."""
    by_state = "SELECT backend, state, count(*) FROM jobs GROUP BY backend, state"
    slots = "SELECT backend, count(*) FROM jobs WHERE slot IS NOT NULL GROUP BY backend"
    if str(store.path) == ":memory:":  # tests: no file to open twice
        return list(store.db.execute(by_state)), list(store.db.execute(slots))
    conn = sqlite3.connect(f"{Path(store.path).absolute().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(by_state).fetchall(), conn.execute(slots).fetchall()
    finally:
        conn.close()


def _launcher(service: JobService) -> LocalLauncher | None:
    """The local jobs' launcher, if a backend runs jobs on this host."""
    for driver in service.backend.drivers.values():
        if driver.runs_here:
            return driver.ctx.launcher
    return None


class _ScrapeCollector(Collector):
    """The figures read at each scrape (the module doc)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        service = self.metrics.service
        backends = sorted(service.backend.settings)
        known = set(backends)

        def backend(name: str) -> str:
            return name if name in known else "other"

        jobs = GaugeMetricFamily(
            f"{NAMESPACE}_jobs", "Jobs in the index, by backend and state.", labels=["backend", "state"]
        )
        counts = {(b, s.value): 0 for b in backends for s in JobState}
        by_state, slots = _index_counts(service.store)
        for name, state, n in by_state:
            key = (backend(str(name)), str(state))
            counts[key] = counts.get(key, 0) + int(n)
        for (b, s), n in sorted(counts.items()):
            jobs.add_metric([b, s], n)
        yield jobs

        limits = service.submitter.slots.limits
        held = dict.fromkeys(limits, 0)
        for name, n in slots:
            held[backend(str(name))] = held.get(backend(str(name)), 0) + int(n)
        in_use = GaugeMetricFamily(
            f"{NAMESPACE}_job_slots_in_use",
            "Job slots held (jobs queued with the backend or running), per backend with a slot limit.",
            labels=["backend"],
        )
        limit = GaugeMetricFamily(
            f"{NAMESPACE}_job_slots_limit",
            "Jobs a backend runs at once at most (max_running).",
            labels=["backend"],
        )
        for b in sorted(held):
            in_use.add_metric([b], held[b])
            if b in limits:
                limit.add_metric([b], limits[b])
        yield in_use
        yield limit

        hub = service.events
        yield GaugeMetricFamily(
            f"{NAMESPACE}_event_subscribers",
            "Open event subscriptions: event streams, and long polls waiting.",
            value=hub.streams,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_events_sent", "Events sent to readers (streams and long polls).", value=hub.sent
        )
        liveness = service.liveness
        yield CounterMetricFamily(
            f"{NAMESPACE}_liveness_rounds", "Rounds of the liveness check done.", value=liveness.rounds
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_liveness_failed_jobs",
            "Jobs the liveness check recorded failed (their process or scheduler job had vanished).",
            value=liveness.failed,
        )
        launcher = _launcher(service)
        if launcher is not None:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_launcher_pending",
                "Local-job submits sent to the launcher process and not answered yet.",
                value=launcher.pending,
            )
        full = GaugeMetricFamily(
            f"{NAMESPACE}_disk_full",
            "1 while the filesystem of the place (the job prefix, the index) is full, else 0.",
            labels=["place"],
        )
        for place in (PREFIX, INDEX):
            full.add_metric([place], 1 if service.disk.is_full(place) else 0)
        yield full
        if self.metrics.startup_seconds is not None:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_startup_reconcile_seconds",
                "Seconds the job service took to start: the index opened and reconciled with the"
                " job directories, what a dead server left finished.",
                value=self.metrics.startup_seconds,
            )


async def get_metrics(request: Request) -> Response:
    """``GET /metrics`` (see the module doc for who may read it)."""
    ctx = context(request.app)
    who = principal(request)
    if ctx.settings.authz != "local" and who.user not in ctx.settings.metrics_readers:
        raise ApiError(
            ProblemCode.forbidden,
            f"{who.user} may not read the metrics; a server's operator lists who may in the "
            "config's metrics_readers",
        )
    body = await in_thread(ctx.metrics.exposition)
    return Response(body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})
