"""`batchery webhooks …`: manage a project's webhook endpoints on a running server (the
API key's project), send test events and read delivery attempts.

Errors are one line on stderr and exit status 1. `create` and `rotate` print the endpoint as
JSON with its signing secret, which the server shows only then."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchery.cli.client import DEFAULT_URL, ApiKey, BaseUrl, request

webhooks_app = typer.Typer(help="Webhook endpoints: create, list, rotate secrets, send test "
                                "events, read delivery attempts.", no_args_is_help=True)
console = Console()

AsJson = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer.")]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _when(seconds: Any) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S",
                                                     time.localtime(seconds))


@webhooks_app.command("create")
def create(
    url: Annotated[str, typer.Option(help="The receiver's http(s) URL.")],
    event_types: Annotated[list[str], typer.Option(
        "--event-type", "-e", help="An event type to receive; may repeat (see "
                                   "GET /v1/webhook_event_types).")],
    name: Annotated[str | None, typer.Option(help="A name; default: the URL's host.")] = None,
    base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery",
) -> None:
    """Create an endpoint: prints it with its signing secret (shown this once)."""
    body = {"name": name or httpx.URL(url).host or url, "url": url,
            "event_types": event_types}
    _print_json(request(base_url, api_key, "POST", "webhook_endpoints", json=body))


@webhooks_app.command("list")
def list_endpoints(limit: int = 100, as_json: AsJson = False, base_url: BaseUrl = DEFAULT_URL,
                   api_key: ApiKey = "batchery") -> None:
    """List the project's endpoints, newest first."""
    data = request(base_url, api_key, "GET", "webhook_endpoints", params={"limit": limit})
    if as_json:
        _print_json(data)
        return
    table = Table("name", "url", "event types", "status", "secret")
    table.add_column("id", no_wrap=True)
    for e in data["data"]:
        status = e["status"] + (f" ({e['disabled_reason']})" if e["disabled_reason"] else "")
        table.add_row(escape(e["name"]), escape(e["url"]), ", ".join(e["event_types"]),
                      escape(status), e["signing_secret_hint"], e["id"])
    console.print(table)


@webhooks_app.command("rotate")
def rotate(
    endpoint_id: str,
    keep_old: Annotated[bool, typer.Option(
        "--keep-old", help="Sign with the previous secret too for 24 hours.")] = False,
    base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery",
) -> None:
    """Rotate an endpoint's signing secret: prints the new one (shown this once)."""
    body = {"keep_old_secret_active_for_24_hours": keep_old}
    _print_json(request(base_url, api_key, "POST", f"webhook_endpoints/{endpoint_id}/"
                                                 "rotate_secret", json=body))


@webhooks_app.command("test")
def test(
    endpoint_id: str,
    event_type: Annotated[str, typer.Option("--event-type", "-e",
                                            help="The sample event's type.")] =
    "batch.completed",
    base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery",
) -> None:
    """Send a sample event through a worker; print the receiver's status (exit 1 if not 2xx)."""
    result = request(base_url, api_key, "POST", f"webhook_endpoints/{endpoint_id}/test",
                   json={"event_type": event_type})
    code = result["status_code"]
    typer.echo(f"{event_type} -> {endpoint_id}: HTTP {code}")
    if not 200 <= code < 300:
        raise typer.Exit(1)


@webhooks_app.command("deliveries")
def deliveries(
    endpoint_id: str,
    event_id: Annotated[str | None, typer.Option(help="Only this event's attempts.")] = None,
    limit: int = 20, as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "batchery",
) -> None:
    """The endpoint's recent delivery attempts, newest first."""
    params: dict[str, Any] = {"limit": limit, **({"event_id": event_id} if event_id else {})}
    data = request(base_url, api_key, "GET", f"webhook_endpoints/{endpoint_id}/deliveries",
                 params=params)
    if as_json:
        _print_json(data)
        return
    table = Table("when", "event type", "attempt", "status", "latency ms", "error")
    table.add_column("event", no_wrap=True)
    for a in data["data"]:
        status = "-" if a["status_code"] is None else str(a["status_code"])
        table.add_row(_when(a["created_at"]), a["event_type"], str(a["attempt"]),
                      ("ok " if a["success"] else "failed ") + status,
                      "-" if a["latency_ms"] is None else str(a["latency_ms"]),
                      escape(a["error"] or ""), a["event_id"])
    console.print(table)


@webhooks_app.command("redeliver")
def redeliver(endpoint_id: str, event_id: str, base_url: BaseUrl = DEFAULT_URL,
              api_key: ApiKey = "batchery") -> None:
    """Queue an event to the endpoint again (same webhook-id)."""
    _print_json(request(base_url, api_key, "POST",
                      f"webhook_endpoints/{endpoint_id}/deliveries/{event_id}/redeliver"))


@webhooks_app.command("delete")
def delete(endpoint_id: str, base_url: BaseUrl = DEFAULT_URL,
           api_key: ApiKey = "batchery") -> None:
    """Delete an endpoint, with its pending deliveries."""
    _print_json(request(base_url, api_key, "DELETE", f"webhook_endpoints/{endpoint_id}"))
