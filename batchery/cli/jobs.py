"""`batchery jobs …` and `batchery logs`: the native job API from the shell."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchery.cli.client import print_warnings
from batchery.client import APIError, Client

jobs_app = typer.Typer(help="Submit, inspect, stop and collect jobs of your own predictors.",
                       no_args_is_help=True)
console = Console()
errors = Console(stderr=True)

ServerUrl = Annotated[str, typer.Option("--server", envvar="BATCHERY_SERVER",
                                        help="The server's URL.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="BATCHERY_API_KEY",
                                            help="API key (any value when the server "
                                                 "has none).")]
DEFAULT_SERVER = "http://127.0.0.1:8000"


@contextlib.contextmanager
def _client(server: str, api_key: str | None) -> Iterator[Client]:
    """A client whose errors end the command with a readable message."""
    try:
        with Client(server, api_key) as client:
            yield client
    except APIError as exc:
        where = f" (param: {exc.param})" if exc.param else ""
        errors.print(f"[red]error {exc.status_code}:[/red] {escape(exc.message + where)}")
        raise typer.Exit(1) from None
    except httpx.TransportError as exc:
        errors.print(f"[red]error:[/red] cannot reach {server}: {escape(str(exc))}")
        raise typer.Exit(1) from None


def _json_option(raw: str | None, name: str) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        errors.print(f"[red]error:[/red] {name} is not valid JSON: {escape(str(exc))}")
        raise typer.Exit(2) from None


def _input(items: str | None, items_file: Path | None, paths: list[str] | None,
           delimited: bool, include: list[str] | None, exclude: list[str] | None,
           batch_size: int | None) -> dict[str, Any]:
    if items is not None or items_file is not None:
        values = (_json_option(items, "--items") if items is not None
                  else _json_option(items_file.read_text() if items_file else None,
                                    "--items-file"))
        return {"item_list": {"items": values, "batch_size": batch_size}}
    if paths:
        kind = "delimited_files" if delimited else "file_path_lister"
        return {kind: {"paths": paths, "includes": include or [], "excludes": exclude or [],
                       "batch_size": batch_size}}
    return {}


@jobs_app.command("submit")
def submit(
    endpoint: str,
    items: Annotated[str | None, typer.Option(help="The items, as a JSON list.")] = None,
    items_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="A JSON file holding the list of items.")] = None,
    paths: Annotated[list[str] | None, typer.Option(
        "--paths", help="Files, directories, prefixes or globs (local or fsspec URLs).")] = None,
    delimited: Annotated[bool, typer.Option(
        help="Read records from the files (NDJSON, CSV, Parquet) instead of listing "
             "them.")] = False,
    include: Annotated[list[str] | None, typer.Option(help="Glob of files to keep.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of files to drop.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    deployment: str | None = None,
    workers: Annotated[int | None, typer.Option(min=1)] = None,
    config: Annotated[str | None, typer.Option(help="The job's config, as JSON.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds before timed_out.")] = None,
    max_retries: Annotated[int | None, typer.Option(min=0)] = None,
    error_threshold: Annotated[int | None, typer.Option(min=-1)] = None,
    output: Annotated[str | None, typer.Option(help="append_row or summary_only.")] = None,
    output_path: str | None = None,
    priority: Annotated[int | None, typer.Option(
        help="Extension: higher runs first (-1000 to 1000; default 0).")] = None,
    body: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="A whole submission as a JSON file; the other "
                                          "options override its keys.")] = None,
    dry_run: Annotated[bool, typer.Option(help="List files and batches; create "
                                               "nothing.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait with a progress bar; exit 1 unless the "
                                            "job succeeds.")] = False,
    server: ServerUrl = DEFAULT_SERVER,
    api_key: ApiKey = None,
) -> None:
    """Submit a job to an endpoint; prints its id."""
    submission: dict[str, Any] = _json_option(body.read_text(), "--body") if body else {}
    submission.update(_input(items, items_file, paths, delimited, include, exclude,
                             batch_size))
    options = {"deployment": deployment, "workers": workers,
               "config": _json_option(config, "--config"), "timeout": timeout,
               "max_retries": max_retries, "error_threshold": error_threshold,
               "output": output, "output_path": output_path, "priority": priority}
    submission.update({k: v for k, v in options.items() if v is not None})
    if dry_run:
        submission["dry_run"] = True
    with _client(server, api_key) as client:
        job = client.submit(endpoint, submission)
        if dry_run:
            for name in job["files"]:
                typer.echo(name)
            typer.echo(f"{job['total_items']} items in {job['total_batch_count']} batches")
            return
        typer.echo(job["id"])
        print_warnings(errors, job)
        if wait:
            _wait(client, job["id"])


def _wait(client: Client, job_id: str, timeout: float | None = None) -> None:
    """Follow the job with a progress bar until it ends; exit 1 unless it succeeded."""
    try:
        done = client.wait(job_id, progress=True, timeout=timeout)
    except TimeoutError as exc:
        errors.print(f"[yellow]{escape(str(exc))}[/yellow]")
        raise typer.Exit(3) from None
    errors.print(f"job {done['id']}: {done['status']}"
                 + (f" ({done['error']})" if done.get("error") else ""))
    if done["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("wait")
def wait_job(job_id: str, timeout: Annotated[float | None, typer.Option(
                 help="Give up (exit 3) after this many seconds.")] = None,
             server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """Follow a job with a progress bar until it ends (its warnings first). Exit code 0
    only if it succeeded."""
    with _client(server, api_key) as client:
        print_warnings(errors, client.get_job(job_id))
        _wait(client, job_id, timeout)


@jobs_app.command("get")
def get(job_id: str, server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """A job's status, counts and worker states, as JSON."""
    with _client(server, api_key) as client:
        console.print_json(json.dumps(client.get_job(job_id)))


def _when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


@jobs_app.command("list")
def list_jobs(endpoint: str | None = None, status: str | None = None, limit: int = 20,
              server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """Jobs, newest first."""
    with _client(server, api_key) as client:
        page = client.list_jobs(endpoint=endpoint, status=status, limit=limit)
    table = Table("endpoint", "status", "batches", "dead letters", "created", "ended")
    table.add_column("id", no_wrap=True)
    for job in page["data"]:
        metrics = job["batch_metrics"]
        table.add_row(job["endpoint"], job["status"],
                      f"{metrics['succeeded'] + metrics['dead_letters']}/"
                      f"{job['total_batch_count']}", str(metrics["dead_letters"]),
                      _when(job["created_at"]), _when(job["ended_at"]), job["id"])
    console.print(table)


@jobs_app.command("stop")
def stop(job_id: str, server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """Stop a job: batches in flight end, no new batch starts."""
    with _client(server, api_key) as client:
        typer.echo(f"{job_id}: {client.stop(job_id)['status']}")


@jobs_app.command("pause")
def pause(job_id: str, server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """Pause a job (extension): batches in flight finish, no new batch starts until it is
    resumed. Its timeout keeps running."""
    with _client(server, api_key) as client:
        typer.echo(f"{job_id}: {client.pause_job(job_id)['status']}")


@jobs_app.command("resume")
def resume(job_id: str, server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """Resume a paused job (extension)."""
    with _client(server, api_key) as client:
        typer.echo(f"{job_id}: {client.resume_job(job_id)['status']}")


# `batchery jobs results` and `retry`: in `reruns` (extension: results while a job runs).


@jobs_app.command("workers")
def workers(job_id: str, server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """The workers of a job and their states."""
    with _client(server, api_key) as client:
        found = client.workers(job_id)
    table = Table("id", "host", "pid", "state", "batch", "done", "last heartbeat")
    for w in found:
        table.add_row(w["id"], w["host"], str(w["pid"]), w["state"],
                      "-" if w["current_batch"] is None else str(w["current_batch"]),
                      str(w["batches_done"]), _when(w["last_heartbeat"]))
    console.print(table)


@jobs_app.command("failed")
def failed(job_id: str, server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """The job's dead letters, with their last error."""
    with _client(server, api_key) as client:
        for dead in client.failed_batches(job_id):
            typer.echo(f"== {dead['batch_id']} (items {dead['first_item']}.."
                       f"{dead['first_item'] + dead['item_count'] - 1}, "
                       f"{dead['attempts']} attempts)\n{dead['error']}")


def logs(job_id: str,
         follow: Annotated[bool, typer.Option("-f", "--follow",
                                              help="Stream until the job ends.")] = False,
         server: ServerUrl = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """A job's log in time order: enqueuing, workers, batches, your predictor's logging."""
    with _client(server, api_key) as client:
        for line in client.logs(job_id, follow=follow):
            typer.echo(line)
