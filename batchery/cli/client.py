"""`batchery files …` and `batchery batches …`: a client of a running server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from batchery.cli.common import (
    BATCH_TERMINAL,
    Api,
    AsJson,
    Col,
    check,
    command,
    errors,
    print_json,
    print_table,
    print_warnings,
    when,
)
from batchery.cli.progress import BatchProgress

files_app = typer.Typer(help="Upload, list, download and delete files.", no_args_is_help=True)
batches_app = typer.Typer(help="Create, inspect, wait for and cancel batches.",
                          no_args_is_help=True)


@command(files_app, "upload")
def upload(path: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                help="A JSONL file of batch lines.")],
           api: Api,
           purpose: Annotated[str, typer.Option(help="The file's purpose.")] = "batch") -> None:
    """Upload a file; prints the file object."""
    with path.open("rb") as f:
        data = api.request("POST", "/v1/files", data={"purpose": purpose},
                           files={"file": (path.name, f, "application/jsonl")})
    print_json(data)


@command(files_app, "list")
def list_files(api: Api,
               purpose: Annotated[str | None, typer.Option(help="Only files of this "
                                                                "purpose.")] = None,
               limit: Annotated[int, typer.Option(min=1, help="The most files to list.")]
               = 100, as_json: AsJson = False) -> None:
    """List files, newest first."""
    data = api.get("/v1/files", limit=limit, purpose=purpose)
    if as_json:
        print_json(data, plain=True)
        return
    print_table([Col("id", "id"), Col("filename"), Col("purpose", "status"),
                 Col("bytes", "fixed", "right"), Col("created", "fixed")],
                [(f["id"], f["filename"], f["purpose"], str(f["bytes"]), when(f["created_at"]))
                 for f in data["data"]])


@command(files_app, "get")
def get_file(file_id: Annotated[str, typer.Argument(help="The file's id.")], api: Api,
             as_json: AsJson = False) -> None:
    """Show a file object (JSON)."""
    print_json(api.get(f"/v1/files/{file_id}"), plain=as_json)


@command(files_app, "download")
def download(file_id: Annotated[str, typer.Argument(help="The file's id.")],
             output: Annotated[Path, typer.Option("-o", "--output",
                                                  help="Where to write the content.")],
             api: Api) -> None:
    """Download a file's content to OUTPUT (written whole or not at all)."""
    partial = output.with_name(output.name + ".part")
    with api.reaching(), api.http() as http, \
            http.stream("GET", f"/v1/files/{file_id}/content") as response:
        if not response.is_success:
            response.read()
            check(response)
        with partial.open("wb") as out:
            for block in response.iter_bytes(1 << 20):
                out.write(block)
    partial.replace(output)
    errors.print(f"wrote {output}")


@command(files_app, "cost-estimate")
def cost_estimate(file_id: Annotated[str, typer.Argument(help="The file's id.")], api: Api,
                  model: Annotated[str | None, typer.Option(
                      help="Price every line at this model (default: each line's own).")
                  ] = None) -> None:
    """Extension: estimate a batch input file's input tokens and cost before a batch."""
    print_json(api.get(f"/v1/files/{file_id}/cost_estimate", model=model))


@command(files_app, "delete")
def delete(file_id: Annotated[str, typer.Argument(help="The file's id.")], api: Api) -> None:
    """Delete a file."""
    print_json(api.request("DELETE", f"/v1/files/{file_id}"))


@command(batches_app, "create")
def create(input_file_id: Annotated[str, typer.Option("--input-file-id", "-i",
                                                      help="The uploaded file's id.")],
           api: Api,
           endpoint: Annotated[str, typer.Option(help="The endpoint every line calls.")]
           = "/v1/chat/completions",
           completion_window: Annotated[str, typer.Option(
               help="How long the batch may take (24h, or an extension: 1h to 7d).")] = "24h",
           metadata: Annotated[list[str] | None, typer.Option(
               "--metadata", "-m", help="key=value, may repeat")] = None,
           priority: Annotated[int | None, typer.Option(
               help="Extension: higher runs first (-1000 to 1000; default 0).")] = None,
           idempotency_key: Annotated[str | None, typer.Option(
               help="Extension: run the command again with the same key and parameters to "
                    "get the same batch, not a second one (kept 24 h).")] = None,
           max_cost: Annotated[float | None, typer.Option(
               help="Extension: stop the batch once its lines cost this many US dollars.")
           ] = None,
           max_total_tokens: Annotated[int | None, typer.Option(
               help="Extension: stop the batch once its lines used this many tokens.")] = None,
           ) -> None:
    """Create a batch from an uploaded file; prints the batch."""
    body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint,
                            "completion_window": completion_window}
    if metadata:
        pairs = [item.split("=", 1) for item in metadata]
        if any(len(p) != 2 for p in pairs):
            errors.print("[red]error:[/red] --metadata takes key=value")
            raise typer.Exit(2)
        body["metadata"] = dict(pairs)
    for name, value in (("priority", priority), ("max_cost", max_cost),
                        ("max_total_tokens", max_total_tokens)):
        if value is not None:
            body[name] = value
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    batch = api.request("POST", "/v1/batches", json=body, headers=headers)
    print_json(batch)
    print_warnings(batch)


def batch_rows(batches: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for b in batches:
        counts = b["request_counts"]
        rows.append((b["id"], b["status"], b["endpoint"].removeprefix("/v1/"),
                     str(counts["total"]),
                     str(counts["completed"]), str(counts["failed"]), when(b["created_at"])))
    return rows


BATCH_COLUMNS = [Col("id", "id"), Col("status", "status"), Col("endpoint"),
                 Col("total", "fixed", "right"), Col("done", "fixed", "right"),
                 Col("failed", "fixed", "right"), Col("created", "fixed")]


@command(batches_app, "list")
def list_batches(api: Api,
                 limit: Annotated[int, typer.Option(min=1, max=100,
                                                    help="The most batches to list.")] = 20,
                 as_json: AsJson = False) -> None:
    """List batches, newest first."""
    data = api.get("/v1/batches", limit=limit)
    if as_json:
        print_json(data, plain=True)
        return
    print_table(BATCH_COLUMNS, batch_rows(data["data"]))


@command(batches_app, "get")
def get(batch_id: Annotated[str, typer.Argument(help="The batch's id.")], api: Api,
        as_json: AsJson = False) -> None:
    """Show a batch (JSON)."""
    print_json(api.get(f"/v1/batches/{batch_id}"), plain=as_json)


@command(batches_app, "cancel")
def cancel(batch_id: Annotated[str, typer.Argument(help="The batch's id.")], api: Api) -> None:
    """Cancel a batch; finished lines are kept."""
    print_json(api.request("POST", f"/v1/batches/{batch_id}/cancel"))


@command(batches_app, "pause")
def pause(batch_id: Annotated[str, typer.Argument(help="The batch's id.")], api: Api) -> None:
    """Pause a batch (extension): no new chunk starts until it is resumed.

    Chunks running finish. Its completion window keeps running."""
    print_json(api.request("POST", f"/v1/batches/{batch_id}/pause"))


@command(batches_app, "resume")
def resume(batch_id: Annotated[str, typer.Argument(help="The batch's id.")], api: Api) -> None:
    """Resume a paused batch (extension)."""
    print_json(api.request("POST", f"/v1/batches/{batch_id}/resume"))


def follow(api: Api, batch_id: str, interval: float, timeout: float | None,
           progress: bool = True) -> dict[str, Any]:
    """Poll the batch until it ends (its warnings first); exit 3 past `timeout`."""
    deadline = time.monotonic() + timeout if timeout else None
    warned = False
    with BatchProgress(console=errors, enabled=progress) as bar:
        while True:
            batch: dict[str, Any] = api.get(f"/v1/batches/{batch_id}")
            if not warned:
                warned = True
                print_warnings(batch)
            counts = batch["request_counts"]
            bar.update(batch["status"], counts["total"], counts["completed"],
                       counts["failed"])
            if batch["status"] in BATCH_TERMINAL:
                return batch
            if deadline is not None and time.monotonic() > deadline:
                errors.print(f"[yellow]timed out waiting: the batch {batch_id} is still "
                             f"{batch['status']}[/yellow]")
                raise typer.Exit(3)
            time.sleep(interval)


@command(batches_app, "wait")
def wait(batch_id: Annotated[str, typer.Argument(help="The batch's id.")], api: Api,
         interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
         timeout: Annotated[float | None, typer.Option(
             help="Give up (exit 3) after this many seconds.")] = None) -> None:
    """Follow a batch with a progress bar until it ends; prints it.

    Exit code 0 only if it completed, 1 if it ended otherwise, 3 past --timeout."""
    batch = follow(api, batch_id, interval, timeout)
    print_json(batch)
    if batch["status"] != "completed":
        raise typer.Exit(1)
