"""`batchery files …` and `batchery batches …`: a client of a running server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchery.cli.progress import BatchProgress

files_app = typer.Typer(help="Upload, list, download and delete files.", no_args_is_help=True)
batches_app = typer.Typer(help="Create, inspect, wait for and cancel batches.",
                          no_args_is_help=True)
console = Console()
errors = Console(stderr=True)

BaseUrl = Annotated[str, typer.Option("--base-url", envvar="BATCHERY_BASE_URL",
                                      help="The server's /v1 URL.")]
ApiKey = Annotated[str, typer.Option("--api-key", envvar="BATCHERY_API_KEY",
                                     help="API key (any value when the server has none).")]
DEFAULT_URL = "http://127.0.0.1:8000/v1"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _client(base_url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url.rstrip("/") + "/",
                        headers={"Authorization": f"Bearer {api_key}"}, timeout=600.0)


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json() if "json" in response.headers.get("content-type", "") else None
    try:
        error = response.json()["error"]
        message = error["message"]
        where = f" (param: {error['param']})" if error.get("param") else ""
    except Exception:
        message, where = response.text, ""
    errors.print(f"[red]error {response.status_code}:[/red] {escape(message + where)}")
    raise typer.Exit(1)


def request(base_url: str, api_key: str, method: str, path: str, **kwargs: Any) -> Any:
    """Call the API; an error becomes one line on stderr and exit status 1."""
    try:
        with _client(base_url, api_key) as client:
            return _check(client.request(method, path, **kwargs))
    except httpx.TransportError as exc:
        errors.print(f"[red]error:[/red] cannot reach {base_url}: {escape(str(exc))}")
        raise typer.Exit(1) from None


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


def print_warnings(out: Console, found: dict[str, Any]) -> None:
    """A batch's or job's `warnings` (extension), a line each, on `out`."""
    for warning in found.get("warnings") or []:
        out.print(f"[yellow]warning:[/yellow] {escape(warning)}")


@files_app.command("upload")
def upload(path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
           purpose: str = "batch", base_url: BaseUrl = DEFAULT_URL,
           api_key: ApiKey = "batchery") -> None:
    """Upload a file."""
    with path.open("rb") as f:
        data = request(base_url, api_key, "POST", "files", data={"purpose": purpose},
                        files={"file": (path.name, f, "application/jsonl")})
    _print_json(data)


@files_app.command("list")
def list_files(purpose: str | None = None, limit: int = 100, base_url: BaseUrl = DEFAULT_URL,
               api_key: ApiKey = "batchery") -> None:
    """List files, newest first."""
    params: dict[str, Any] = {"limit": limit, **({"purpose": purpose} if purpose else {})}
    data = request(base_url, api_key, "GET", "files", params=params)
    table = Table("filename", "purpose", "bytes", "created")
    table.add_column("id", no_wrap=True, min_width=27)
    for f in data["data"]:
        table.add_row(f["filename"], f["purpose"], str(f["bytes"]),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["created_at"])),
                      f["id"])
    console.print(table)


@files_app.command("download")
def download(file_id: str, output: Annotated[Path, typer.Option("-o", "--output")],
             base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Download a file's content to OUTPUT (written whole or not at all)."""
    partial = output.with_name(output.name + ".part")
    try:
        with _client(base_url, api_key) as client, \
                client.stream("GET", f"files/{file_id}/content") as response:
            if not response.is_success:
                response.read()
                _check(response)
            with partial.open("wb") as out:
                for block in response.iter_bytes(1 << 20):
                    out.write(block)
    except httpx.TransportError as exc:
        errors.print(f"[red]error:[/red] cannot reach {base_url}: {escape(str(exc))}")
        raise typer.Exit(1) from None
    partial.replace(output)
    errors.print(f"wrote {output}")


@files_app.command("cost-estimate")
def cost_estimate(file_id: str, model: Annotated[str | None, typer.Option(
                      help="Price every line at this model (default: each line's own).")
                  ] = None,
                  base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Extension: estimate a batch input file's input tokens and cost before a batch."""
    params = {"model": model} if model is not None else None
    _print_json(request(base_url, api_key, "GET", f"files/{file_id}/cost_estimate",
                        params=params))


@files_app.command("delete")
def delete(file_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Delete a file."""
    _print_json(request(base_url, api_key, "DELETE", f"files/{file_id}"))


@batches_app.command("create")
def create(input_file_id: Annotated[str, typer.Option("--input-file-id", "-i")],
           endpoint: str = "/v1/chat/completions", completion_window: str = "24h",
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
           base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Create a batch from an uploaded file."""
    body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint,
                            "completion_window": completion_window}
    if metadata:
        body["metadata"] = dict(item.split("=", 1) for item in metadata)
    if priority is not None:
        body["priority"] = priority
    for name, value in (("max_cost", max_cost), ("max_total_tokens", max_total_tokens)):
        if value is not None:
            body[name] = value
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    _print_json(request(base_url, api_key, "POST", "batches", json=body, headers=headers))


@batches_app.command("list")
def list_batches(limit: int = 20, base_url: BaseUrl = DEFAULT_URL,
                 api_key: ApiKey = "batchery") -> None:
    """List batches, newest first."""
    data = request(base_url, api_key, "GET", "batches", params={"limit": limit})
    table = Table()
    table.add_column("id", no_wrap=True, min_width=38)
    for name in ("status", "endpoint", "total", "completed", "failed"):
        table.add_column(name)
    for b in data["data"]:
        counts = b["request_counts"]
        table.add_row(b["id"], b["status"], b["endpoint"], str(counts["total"]),
                      str(counts["completed"]), str(counts["failed"]))
    console.print(table)


@batches_app.command("get")
def get(batch_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Show a batch."""
    _print_json(request(base_url, api_key, "GET", f"batches/{batch_id}"))


@batches_app.command("cancel")
def cancel(batch_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Cancel a batch; finished lines are kept."""
    _print_json(request(base_url, api_key, "POST", f"batches/{batch_id}/cancel"))


@batches_app.command("pause")
def pause(batch_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Pause a batch (extension): no new chunk starts until it is resumed; chunks running
    finish. Its completion window keeps running."""
    _print_json(request(base_url, api_key, "POST", f"batches/{batch_id}/pause"))


@batches_app.command("resume")
def resume(batch_id: str, base_url: BaseUrl = DEFAULT_URL,
           api_key: ApiKey = "batchery") -> None:
    """Resume a paused batch (extension)."""
    _print_json(request(base_url, api_key, "POST", f"batches/{batch_id}/resume"))


@batches_app.command("wait")
def wait(batch_id: str, interval: float = 1.0, timeout: float | None = None,
         base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery") -> None:
    """Follow a batch with a progress bar until it ends. Exit code 0 only if completed."""
    deadline = time.monotonic() + timeout if timeout else None
    warned = False
    with BatchProgress(console=errors) as progress:
        while True:
            batch = request(base_url, api_key, "GET", f"batches/{batch_id}")
            if not warned:
                warned = True
                print_warnings(errors, batch)
            counts = batch["request_counts"]
            progress.update(batch["status"], counts["total"], counts["completed"],
                            counts["failed"])
            if batch["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                errors.print("[yellow]timed out waiting[/yellow]")
                raise typer.Exit(3)
            time.sleep(interval)
    _print_json(batch)
    if batch["status"] != "completed":
        raise typer.Exit(1)
