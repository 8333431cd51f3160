"""`batchery jobs …` and `batchery logs`: the native job API from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from batchery.cli.common import (
    Api,
    AsJson,
    Col,
    command,
    errors,
    fail,
    print_json,
    print_table,
    print_warnings,
    when,
)
from batchery.client import Client

jobs_app = typer.Typer(help="Submit, inspect, stop and collect jobs of your own predictors.",
                       no_args_is_help=True)


def _json_option(raw: str | None, name: str) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"{name} is not valid JSON: {exc}", code=2)


def _input(items: str | None, items_file: Path | None, paths: list[str] | None,
           file_ids: list[str] | None, delimited: bool, include: list[str] | None,
           exclude: list[str] | None, batch_size: int | None) -> dict[str, Any]:
    if items is not None or items_file is not None:
        values = (_json_option(items, "--items") if items is not None
                  else _json_option(items_file.read_text() if items_file else None,
                                    "--items-file"))
        return {"item_list": {"items": values, "batch_size": batch_size}}
    if paths or file_ids:
        kind = "delimited_files" if delimited else "file_path_lister"
        found: dict[str, Any] = {"includes": include or [], "excludes": exclude or [],
                                 "batch_size": batch_size}
        if paths:
            found["paths"] = paths
        if file_ids:
            found["file_ids"] = file_ids
        return {kind: found}
    return {}


def batch_counts(job: dict[str, Any]) -> tuple[int, int]:
    """The job's batches done (succeeded or dead-lettered), and its dead letters."""
    metrics = job.get("batch_metrics") or {}
    succeeded = metrics.get("batches_succeeded", metrics.get("succeeded", 0)) or 0
    dead = metrics.get("batches_dead_lettered", metrics.get("dead_letters", 0)) or 0
    return int(succeeded) + int(dead), int(dead)


@command(jobs_app, "submit")
def submit(
    endpoint: Annotated[str, typer.Argument(help="The endpoint's name.")],
    api: Api,
    items: Annotated[str | None, typer.Option(
        help="Input item_list: the items, as a JSON list.")] = None,
    items_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Input item_list: a JSON file holding the list of "
                                          "items.")] = None,
    paths: Annotated[list[str] | None, typer.Option(
        "--paths", help="Input file_path_lister (or delimited_files): files, directories, "
                        "prefixes or globs (local or fsspec URLs); may repeat.")] = None,
    file_ids: Annotated[list[str] | None, typer.Option(
        "--file-id", help="Input file_path_lister (or delimited_files): an uploaded file's "
                          "id; may repeat.")] = None,
    delimited: Annotated[bool, typer.Option(
        "--delimited", help="Read records from the files (NDJSON, CSV, Parquet) instead of "
                            "listing them.")] = False,
    include: Annotated[list[str] | None, typer.Option(
        help="Glob of files to keep; may repeat.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Glob of files to drop; may repeat.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Items in a batch.")] = None,
    deployment: Annotated[str | None, typer.Option(
        help="The deployment to run (default: the endpoint's default).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="The most workers to run the job's batches at once.")] = None,
    config: Annotated[str | None, typer.Option(
        help="The job's config, a JSON object your predictor receives.")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds the job may run before it is timed_out.")] = None,
    batch_timeout: Annotated[float | None, typer.Option(
        help="Seconds one batch may run before the attempt fails.")] = None,
    max_retries: Annotated[int | None, typer.Option(
        min=0, help="Retries of a failing batch before it becomes a dead letter.")] = None,
    error_threshold: Annotated[int | None, typer.Option(
        min=-1, help="Dead letters after which the job fails (-1: never).")] = None,
    output: Annotated[str | None, typer.Option(
        help="append_row (a results file) or summary_only.")] = None,
    output_path: Annotated[str | None, typer.Option(
        help="Where the results file goes (a local path or fsspec URL).")] = None,
    priority: Annotated[int | None, typer.Option(
        help="Extension: higher runs first (-1000 to 1000; default 0).")] = None,
    webhook_url: Annotated[str | None, typer.Option(
        help="Extension: a receiver of the job's end event.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Extension: submit again with the same key and options to get the same job, "
             "not a second one.")] = None,
    body: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="A whole submission as a JSON file; the other "
                                          "options override its keys.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List files and batches; create nothing.")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait with a progress bar; exit 1 unless the job succeeds.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the job (or the dry run's plan) as JSON, not its id.")] = False,
) -> None:
    """Submit a job to an endpoint; prints its id."""
    submission: dict[str, Any] = _json_option(body.read_text(), "--body") if body else {}
    if not isinstance(submission, dict):
        fail("--body must hold a JSON object", code=2)
    submission.update(_input(items, items_file, paths, file_ids, delimited, include, exclude,
                             batch_size))
    options = {"deployment": deployment, "workers": workers,
               "config": _json_option(config, "--config"), "timeout": timeout,
               "batch_timeout": batch_timeout, "max_retries": max_retries,
               "error_threshold": error_threshold, "output": output,
               "output_path": output_path, "priority": priority, "webhook_url": webhook_url}
    submission.update({k: v for k, v in options.items() if v is not None})
    if dry_run:
        submission["dry_run"] = True
    with api.client() as client:
        job = client.submit(endpoint, submission, idempotency_key=idempotency_key)
        if as_json:
            print_json(job, plain=True)
        if dry_run:
            if not as_json:
                for name in job["files"]:
                    typer.echo(name)
                typer.echo(f"{job['total_items']} items in {job['total_batch_count']} "
                           "batches")
            return
        if not as_json:
            typer.echo(job["id"])
        print_warnings(job)
        if wait:
            _wait(client, job["id"])


def _wait(client: Client, job_id: str, timeout: float | None = None) -> None:
    """Follow the job with a progress bar until it ends; exit 1 unless it succeeded."""
    try:
        done = client.wait(job_id, progress=True, timeout=timeout)
    except TimeoutError as exc:
        errors.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(3) from None
    errors.print(f"job {done['id']}: {done['status']}"
                 + (f" ({done['error']})" if done.get("error") else ""), markup=False)
    if done["status"] != "succeeded":
        raise typer.Exit(1)


JobId = Annotated[str, typer.Argument(help="The job's id.")]


@command(jobs_app, "wait")
def wait_job(job_id: JobId, api: Api, timeout: Annotated[float | None, typer.Option(
                 help="Give up (exit 3) after this many seconds.")] = None) -> None:
    """Follow a job with a progress bar until it ends (its warnings first).

    Exit code 0 only if it succeeded, 1 if it ended otherwise, 3 past --timeout."""
    with api.client() as client:
        print_warnings(client.get_job(job_id))
        _wait(client, job_id, timeout)


@command(jobs_app, "get")
def get(job_id: JobId, api: Api, as_json: AsJson = False) -> None:
    """A job's status, counts and worker states (JSON)."""
    print_json(api.get(f"/api/v1/jobs/{job_id}"), plain=as_json)


JOB_COLUMNS = [Col("id", "id"), Col("endpoint"), Col("status", "status"),
               Col("batches", "fixed", "right"), Col("dead", "fixed", "right"),
               Col("created", "fixed")]


def job_rows(jobs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for job in jobs:
        done, dead = batch_counts(job)
        total = job.get("total_batch_count")
        rows.append((job["id"], job["endpoint"], job["status"],
                     f"{done}/{'?' if total is None else total}", str(dead),
                     when(job["created_at"])))
    return rows


@command(jobs_app, "list")
def list_jobs(api: Api,
              endpoint: Annotated[str | None, typer.Option(
                  help="Only the jobs of this endpoint.")] = None,
              status: Annotated[str | None, typer.Option(
                  help="Only the jobs in this status.")] = None,
              limit: Annotated[int, typer.Option(min=1, max=100,
                                                 help="The most jobs to list.")] = 20,
              as_json: AsJson = False) -> None:
    """Jobs, newest first."""
    page = api.get("/api/v1/jobs", endpoint=endpoint, status=status, limit=limit)
    if as_json:
        print_json(page, plain=True)
        return
    print_table(JOB_COLUMNS, job_rows(page["data"]))


@command(jobs_app, "stop")
def stop(job_id: JobId, api: Api) -> None:
    """Stop a job: batches in flight end, no new batch starts."""
    typer.echo(f"{job_id}: {api.request('DELETE', f'/api/v1/jobs/{job_id}')['status']}")


@command(jobs_app, "pause")
def pause(job_id: JobId, api: Api) -> None:
    """Pause a job (extension): no new batch starts until it is resumed.

    Batches in flight finish. Its timeout keeps running."""
    typer.echo(f"{job_id}: {api.request('POST', f'/api/v1/jobs/{job_id}/pause')['status']}")


@command(jobs_app, "resume")
def resume(job_id: JobId, api: Api) -> None:
    """Resume a paused job (extension)."""
    typer.echo(f"{job_id}: {api.request('POST', f'/api/v1/jobs/{job_id}/resume')['status']}")


# `batchery jobs results` and `retry`: in `reruns` (extension: results while a job runs).


@command(jobs_app, "workers")
def workers(job_id: JobId, api: Api, as_json: AsJson = False) -> None:
    """The workers of a job and their states."""
    found = api.get(f"/api/v1/jobs/{job_id}/workers")
    if as_json:
        print_json(found, plain=True)
        return
    print_table([Col("id", "id"), Col("host"), Col("pid", "fixed", "right"),
                 Col("state", "status"), Col("batch", "fixed", "right"),
                 Col("done", "fixed", "right"), Col("heartbeat", "fixed")],
                [(w["id"], w["host"], str(w["pid"]), w["state"],
                  "-" if w["current_batch"] is None else str(w["current_batch"]),
                  str(w["batches_done"]), when(w["last_heartbeat"])) for w in found["data"]])


@command(jobs_app, "failed")
def failed(job_id: JobId, api: Api, as_json: AsJson = False) -> None:
    """The job's dead letters, with their last error."""
    found = api.get(f"/api/v1/jobs/{job_id}/failed_batches")
    if as_json:
        print_json(found, plain=True)
        return
    for dead in found["data"]:
        typer.echo(f"== {dead['batch_id']} (items {dead['first_item']}.."
                   f"{dead['first_item'] + dead['item_count'] - 1}, "
                   f"{dead['attempts']} attempts)\n{dead['error']}")


def logs(job_id: JobId, api: Api,
         follow: Annotated[bool, typer.Option("-f", "--follow",
                                              help="Stream until the job ends.")] = False,
         ) -> None:
    """A job's log in time order: enqueuing, workers, batches, your predictor's logging."""
    with api.client() as client:
        for line in client.logs(job_id, follow=follow):
            typer.echo(line)
