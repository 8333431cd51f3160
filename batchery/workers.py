"""The composition of a worker process: the handlers its loop runs, in order.

Batch phases come first (they unblock whole batches), then chunks, then jobs' work; a
worker that runs batches also sends webhook deliveries, in a thread of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from batchery.batchapi.handlers import BatchPhases, ChunkRunner, Deployments
from batchery.jobs.runner import JobRunner
from batchery.ports.doorbell import Doorbell
from batchery.ports.filestore import FileStore
from batchery.ports.store import Store
from batchery.ports.webhooks import WebhookOutbox
from batchery.queue.worker import Handler, Worker, WorkerConfig, WorkerContext
from batchery.webhooks.delivery import WebhookDelivery


class WebhookSender:
    """Sends webhook deliveries from the outbox in a thread beside the worker's loop."""

    def __init__(self, delivery: WebhookDelivery) -> None:
        self.delivery = delivery

    def start(self) -> None:
        self.delivery.start()

    def run_once(self) -> bool:
        return False  # the thread does the work

    def housekeeping(self) -> None:
        pass

    def close(self) -> None:
        self.delivery.stop()


def handlers(store: Store, files: FileStore, ctx: WorkerContext) -> Sequence[Handler]:
    config = ctx.config
    found: list[Handler] = []
    if config.batches:
        deployments = Deployments(store)
        found += [BatchPhases(store, files, ctx, deployments),
                  ChunkRunner(store, files, ctx, deployments)]
    if config.jobs:
        found.append(JobRunner(store, files, ctx))
    if config.webhooks and config.batches and isinstance(store, WebhookOutbox):
        found.append(WebhookSender(WebhookDelivery(store, ctx.id)))
    return found


def worker(store: Store, files: FileStore, config: WorkerConfig | None = None, *,
           worker_id: str | None = None, doorbell: Doorbell | None = None) -> Worker:
    """A worker running every kind of work `config` asks for, on `store` and `files`;
    idle, it waits on `doorbell` (if any) between polls."""
    return Worker(store, lambda ctx: handlers(store, files, ctx), config,
                  worker_id=worker_id, doorbell=doorbell)
