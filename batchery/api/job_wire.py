"""Jobs as the job API renders them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchery.jobs.service import JobView
from batchery.model.jobs import BatchState, InputKind, Job, JobInput, JobStage


def job_json(job: Job, view: JobView | None = None) -> dict[str, Any]:
    """A job as the API shows it; with its `view`, also its queue and worker states."""
    shown: dict[str, Any] = {
        "id": job.id, "object": "job", "endpoint": job.endpoint,
        "deployment": job.deployment, "status": job.status.value,
        "input": {job.input.kind.value: _input_summary(job.input)},
        "workers": job.options.workers, "config": job.options.config,
        "timeout": job.options.timeout_s, "batch_timeout": job.options.batch_timeout_s,
        "max_retries": job.options.max_retries, "error_threshold": job.options.error_threshold,
        "output": job.options.output.value, "output_path": job.output_path,
        "total_batch_count": job.total_batch_count,
        "enqueuing_done": job.stage is not JobStage.ENQUEUE,
        "batch_metrics": batch_metrics(job),
        "item_counts": {"total": job.total_items, "succeeded": job.items_succeeded,
                        "failed": job.items_failed},
        "error": job.error, "results_url": job.results_url,
        "created_at": job.created_at, "started_at": job.started_at,
        "ended_at": job.ended_at,
        # Extensions: the claim order, a pause, and what the caller should know.
        "priority": job.priority, "paused_at": job.paused_at, "warnings": job.warnings,
        # Extension: the job whose dead letters this one reruns (POST …/retry).
        "retry_of": job.retry_of,
    }
    if view is not None:
        shown |= {"batches_in_queue": view.batch_states.get(BatchState.QUEUED.value, 0),
                  "batches_in_flight": view.batch_states.get(BatchState.LEASED.value, 0),
                  "worker_counts": view.worker_counts}
    return shown


def batch_metrics(job: Job) -> dict[str, Any]:
    """The job's `batch_metrics`: Cortex's names (`succeeded`, `failed`,
    `avg_time_per_batch`) and ours before, kept for the clients that read them, and names
    that say whether they count batches, attempts or items."""
    metrics = job.metrics
    average = metrics.average_time_per_batch
    return {"succeeded": metrics.succeeded, "failed": metrics.failed,
            "dead_letters": metrics.dead_letters, "average_time_per_batch": average,
            "avg_time_per_batch": average,
            "batches_succeeded": metrics.succeeded,
            "batch_attempts_failed": metrics.failed,
            "batches_dead_lettered": metrics.dead_letters,
            "items_succeeded": job.items_succeeded, "items_failed": job.items_failed,
            "seconds_per_succeeded_batch": average}


def _input_summary(job_input: JobInput) -> Mapping[str, Any]:
    if job_input.kind is InputKind.ITEM_LIST:
        return {"item_count": len(job_input.items or []), "batch_size": job_input.batch_size}
    return job_input.to_dict()
