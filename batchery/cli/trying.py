"""`batchery try MODEL "prompt"`: one request through the batch queue at top priority, for
a quick look at a model; prints the answer."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from batchery.cli.common import (
    BATCH_TERMINAL,
    Api,
    command,
    fail,
    print_json,
    print_warnings,
)

#: The endpoints `try` can call, in the order it prefers them.
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
#: The start of the warning a batch gets when no worker is alive (`batchapi.outlook`).
NO_WORKER = "No worker is running"
#: How many values of an embedding are shown.
SHOWN_VALUES = 5


def register(app: typer.Typer) -> None:
    command(app, "try")(try_model)


def _line(model: str, endpoint: str, prompt: str, max_tokens: int | None) -> dict[str, Any]:
    if endpoint == "/v1/embeddings":
        body: dict[str, Any] = {"model": model, "input": prompt}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
    return {"custom_id": "try", "method": "POST", "url": endpoint, "body": body}


def _endpoint(api: Api, model: str) -> str:
    served = api.get(f"/v1/models/{model}")["endpoints"]
    for endpoint in ENDPOINTS:
        if endpoint in served:
            return endpoint
    fail(f"the model '{model}' serves none of {', '.join(ENDPOINTS)} (it serves "
         f"{', '.join(served) or 'nothing'}), so `batchery try` cannot call it")


def _cancel(api: Api, batch_id: str) -> None:
    """Best effort: the batch should not run once nobody waits for it."""
    try:
        with api.http(timeout=10) as http:
            http.post(f"/v1/batches/{batch_id}/cancel")
    except Exception:  # the command fails for its own reason already
        pass


def _wait(api: Api, batch: dict[str, Any], timeout: float, interval: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while batch["status"] not in BATCH_TERMINAL:
        if time.monotonic() > deadline:
            _cancel(api, batch["id"])
            fail(f"no answer within {timeout:g} s: the batch {batch['id']} was still "
                 f"{batch['status']} (cancelled now); raise --timeout or see "
                 "`batchery status`", code=3)
        time.sleep(interval)
        batch = api.get(f"/v1/batches/{batch['id']}")
    return batch


def _result_line(api: Api, batch: dict[str, Any]) -> dict[str, Any]:
    file_id = batch.get("output_file_id") or batch.get("error_file_id")
    if file_id is None:
        fail(f"the batch {batch['id']} ended {batch['status']} without an answer"
             + _batch_errors(batch))
    with api.reaching(), api.http() as http:
        response = http.get(f"/v1/files/{file_id}/content")
    if not response.is_success:
        fail(f"cannot read the answer file {file_id}: HTTP {response.status_code}")
    line: dict[str, Any] = json.loads(response.content.splitlines()[0])
    return line


def _batch_errors(batch: dict[str, Any]) -> str:
    found = (batch.get("errors") or {}).get("data") or []
    return (": " + "; ".join(e.get("message", "") for e in found)) if found else ""


def try_model(
    model: Annotated[str, typer.Argument(help="The model (see `batchery models`).")],
    prompt: Annotated[str, typer.Argument(help="The user message (or the text to embed).")],
    api: Api,
    max_tokens: Annotated[int | None, typer.Option(
        min=1, help="The most tokens of the answer (chat models).")] = None,
    priority: Annotated[int, typer.Option(
        min=-1000, max=1000, help="The batch's priority (extension); the top by "
                                  "default, ahead of all queued work.")] = 1000,
    timeout: Annotated[float, typer.Option(
        min=0.1, help="Give up (exit 3, and cancel the batch) after this many seconds.")
    ] = 600.0,
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls.")] = 0.2,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the batch's result line as JSON (response or error) instead "
                       "of the answer.")] = False,
) -> None:
    """Send PROMPT to MODEL through the batch queue and print the answer.

    A one-line batch at top priority, to /v1/chat/completions (or /v1/embeddings for a
    model that serves only embeddings). Prints a chat model's text, or an embedding's length
    and first values. Exit 1 at once if no worker is alive, 1 if the request failed, 3 past
    --timeout."""
    endpoint = _endpoint(api, model)
    data = json.dumps(_line(model, endpoint, prompt, max_tokens)).encode() + b"\n"
    uploaded = api.request("POST", "/v1/files", data={"purpose": "batch"},
                           files={"file": ("try.jsonl", data, "application/jsonl")})
    batch = api.request("POST", "/v1/batches", json={
        "input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h",
        "priority": priority, "metadata": {"batchery": "try"}})
    warnings = batch.get("warnings") or []
    if any(w.startswith(NO_WORKER) for w in warnings):
        _cancel(api, batch["id"])
        fail("no worker is alive, so nothing would answer: start one (`batchery worker`, "
             "or `batchery serve` with --workers above 0) and try again")
    print_warnings(batch)
    batch = _wait(api, batch, timeout, interval)
    line = _result_line(api, batch)
    if as_json:
        print_json(line, plain=True)
    response, error = line.get("response") or {}, line.get("error")
    status = response.get("status_code")
    if error or status != 200:
        body = response.get("body") or {}
        message = (error or {}).get("message") or (body.get("error") or {}).get("message") \
            or json.dumps(body)[:300]
        fail(f"the request to {model} failed (HTTP {status}): {message}")
    if not as_json:
        _print_answer(endpoint, response["body"])


def _print_answer(endpoint: str, body: dict[str, Any]) -> None:
    if endpoint == "/v1/embeddings":
        vector = body["data"][0]["embedding"]
        if isinstance(vector, str):  # base64, if the model was asked for it
            typer.echo(f"embedding (base64): {vector[:60]}…")
            return
        first = ", ".join(f"{v:.4g}" for v in vector[:SHOWN_VALUES])
        more = ", …" if len(vector) > SHOWN_VALUES else ""
        typer.echo(f"embedding of {len(vector)} values: [{first}{more}]")
        return
    message = body["choices"][0]["message"]
    text = message.get("content")
    if text is None:
        text = message.get("refusal") or json.dumps(message)
    typer.echo(text)
