"""`batchery message-batches …`: Anthropic Message Batches (`/v1/messages/batches`) on a
running server."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from batchery.cli.common import (
    Api,
    AsJson,
    Col,
    check,
    command,
    fail,
    print_json,
    print_table,
    print_warnings,
    when,
)

message_batches_app = typer.Typer(
    help="Anthropic Message Batches: create from a file of requests, list, show, cancel, "
         "read results.", no_args_is_help=True)
BatchId = Annotated[str, typer.Argument(help="The message batch's id (msgbatch_…).")]


def read_requests(path: Path) -> list[Any]:
    """The requests in `path`: a JSON list, a JSON object with `requests`, or JSON lines
    (one `{"custom_id", "params"}` a line)."""
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("requests"), list):
        requests: list[Any] = whole["requests"]
        return requests
    if isinstance(whole, list):
        return whole
    if isinstance(whole, dict) and "params" in whole:
        return [whole]  # a JSONL file of one line
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError as exc:
            fail(f"{path} line {number} is not valid JSON ({exc.msg}): expected one "
                 "request a line, or a JSON list of requests", code=2)
    if not found:
        fail(f"{path} holds no request", code=2)
    return found


@command(message_batches_app, "create")
def create(
    path: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False,
        help='The requests: JSON lines of {"custom_id", "params"}, a JSON list of them, or '
             'a JSON object with "requests".')],
    api: Api,
    priority: Annotated[int | None, typer.Option(
        help="Extension: higher runs first (-1000 to 1000; default 0).")] = None,
    webhook_url: Annotated[str | None, typer.Option(
        help="Extension: a receiver of the batch's message_batch.ended event.")] = None,
    max_cost: Annotated[float | None, typer.Option(
        help="Extension: stop the batch once its requests cost this many US dollars.")
    ] = None,
    max_total_tokens: Annotated[int | None, typer.Option(
        help="Extension: stop the batch once its requests used this many tokens.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Extension: run the command again with the same key and requests to get the "
             "same batch, not a second one.")] = None,
) -> None:
    """Create a message batch from a file of requests; prints it."""
    body: dict[str, Any] = {"requests": read_requests(path)}
    for name, value in (("priority", priority), ("webhook_url", webhook_url),
                        ("max_cost", max_cost), ("max_total_tokens", max_total_tokens)):
        if value is not None:
            body[name] = value
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    batch = api.request("POST", "/v1/messages/batches", json=body, headers=headers)
    print_json(batch)
    print_warnings(batch)


def _counts(batch: dict[str, Any]) -> tuple[str, ...]:
    counts = batch["request_counts"]
    total = sum(counts.values())
    return (f"{total - counts.get('processing', 0)}/{total}", str(counts.get("succeeded", 0)),
            str(counts.get("errored", 0)))


@command(message_batches_app, "list")
def list_batches(api: Api,
                 limit: Annotated[int, typer.Option(min=1, max=1000,
                                                    help="The most batches to list.")] = 20,
                 as_json: AsJson = False) -> None:
    """List message batches, newest first."""
    data = api.get("/v1/messages/batches", limit=limit)
    if as_json:
        print_json(data, plain=True)
        return
    print_table([Col("id", "id"), Col("status", "status"), Col("done", "fixed", "right"),
                 Col("succeeded", "fixed", "right"), Col("errored", "fixed", "right"),
                 Col("created", "fixed")],
                [(b["id"], b["processing_status"], *_counts(b), _created(b))
                 for b in data["data"]])


def _created(batch: dict[str, Any]) -> str:
    try:
        return when(datetime.fromisoformat(batch["created_at"]).timestamp())
    except (KeyError, TypeError, ValueError):
        return "-"



@command(message_batches_app, "get")
def get(batch_id: BatchId, api: Api, as_json: AsJson = False) -> None:
    """Show a message batch (JSON)."""
    print_json(api.get(f"/v1/messages/batches/{batch_id}"), plain=as_json)


@command(message_batches_app, "cancel")
def cancel(batch_id: BatchId, api: Api) -> None:
    """Cancel a message batch; finished requests are kept."""
    print_json(api.request("POST", f"/v1/messages/batches/{batch_id}/cancel"))


@command(message_batches_app, "results")
def results(batch_id: BatchId, api: Api,
            output: Annotated[Path | None, typer.Option(
                "-o", "--output", help="Write to this file instead of stdout.")] = None,
            ) -> None:
    """An ended message batch's results: one JSON line a request, as the server wrote them."""
    with api.reaching(), api.http() as http, \
            http.stream("GET", f"/v1/messages/batches/{batch_id}/results") as response:
        if not response.is_success:
            response.read()
            check(response)
        out = output.open("wb") if output is not None else sys.stdout.buffer
        try:
            for block in response.iter_bytes(1 << 20):
                out.write(block)
            out.flush()
        finally:
            if output is not None:
                out.close()
