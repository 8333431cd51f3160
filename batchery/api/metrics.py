"""`/metrics` for Prometheus: queue and worker state read from the store at scrape time,
and request counts by route."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchery.model.batches import BatchStatus
from batchery.model.chunks import ChunkState
from batchery.model.jobs import BatchState, JobStatus
from batchery.ports.jobs import JobRecords
from batchery.ports.store import Registry


class MetricsStore(Registry, JobRecords, Protocol):
    """What the metrics read: counts, demand and workers."""

#: A worker whose last heartbeat is older than this counts as gone, in seconds.
STALE_WORKER_S = 60.0


class StoreCollector(Collector):
    def __init__(self, store: MetricsStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        batches = GaugeMetricFamily("batchery_batches", "Batches by status", labels=["status"])
        for status in BatchStatus:
            batches.add_metric([status.value], counts["batches"].get(status.value, 0))
        yield batches
        chunks = GaugeMetricFamily("batchery_chunks", "Chunks of running batches by state",
                                   labels=["state"])
        for state in ChunkState:
            chunks.add_metric([state.value], counts["chunks"].get(state.value, 0))
        yield chunks
        workers = GaugeMetricFamily("batchery_workers", "Live workers by state",
                                    labels=["state"])
        hosts = GaugeMetricFamily("batchery_workers_by_host",
                                  "Live workers by host (a Ray worker's node) and state",
                                  labels=["host", "state"])
        live: dict[str, int] = {}
        where: dict[tuple[str, str], int] = {}
        for info in self.store.list_workers():
            if time.time() - info.last_heartbeat < STALE_WORKER_S and info.state != "stopped":
                live[info.state] = live.get(info.state, 0) + 1
                where[info.host, info.state] = where.get((info.host, info.state), 0) + 1
        for name, n in sorted(live.items()):
            workers.add_metric([name], n)
        for (host, doing), n in sorted(where.items()):
            hosts.add_metric([host, doing], n)
        yield workers
        yield hosts
        yield from self._jobs()

    def _jobs(self) -> Iterator[Metric]:
        counts = self.store.job_counts()
        jobs = GaugeMetricFamily("batchery_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts["jobs"].get(status.value, 0))
        yield jobs
        batches = GaugeMetricFamily("batchery_job_batches", "Job batches by state",
                                    labels=["state"])
        for state in BatchState:
            batches.add_metric([state.value], counts["job_batches"].get(state.value, 0))
        yield batches
        demand = GaugeMetricFamily("batchery_job_worker_demand",
                                   "Workers each deployment's jobs could use now",
                                   labels=["deployment"])
        for name, n in sorted(self.store.job_demand().items()):
            demand.add_metric([name], n)
        yield demand


def _route_label(scope: Scope) -> str:
    """The path with its ids replaced by their names, so labels stay few."""
    if scope.get("route") is None:
        return "unmatched"
    path: str = scope["path"]
    for name, value in scope.get("path_params", {}).items():
        path = path.replace(str(value), "{" + name + "}")
    return path


class CountRequests:
    """Counts requests by method, route and status: a plain ASGI middleware (no task group
    around the app, nothing read or written but the counter)."""

    def __init__(self, app: ASGIApp, *, requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            # The error handler answers 500 further out; count it here.
            self.requests.labels(scope["method"], _route_label(scope), "500").inc()
            raise
        self.requests.labels(scope["method"], _route_label(scope), str(status)).inc()


def install(app: FastAPI, store: MetricsStore) -> None:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    requests = Counter("batchery_http_requests", "HTTP requests by route and status",
                       ["method", "route", "status"], registry=registry)

    app.add_middleware(CountRequests, requests=requests)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
