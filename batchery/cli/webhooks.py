"""`batchery webhooks …`: manage a project's webhook endpoints on a running server (the
API key's project), send test events and read delivery attempts.

Errors are one line on stderr and exit status 1. `create` and `rotate` print the endpoint as
JSON with its signing secret, which the server shows only then."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

from batchery.cli.common import Api, AsJson, Col, command, print_json, print_table, when

webhooks_app = typer.Typer(help="Webhook endpoints: create, list, rotate secrets, send test "
                                "events, read delivery attempts.", no_args_is_help=True)
EndpointId = Annotated[str, typer.Argument(help="The endpoint's id (we_…).")]


def _print_json(data: Any) -> None:
    print_json(data, plain=True)


@command(webhooks_app, "create")
def create(
    url: Annotated[str, typer.Option(help="The receiver's http(s) URL.")],
    event_types: Annotated[list[str], typer.Option(
        "--event-type", "-e", help="An event type to receive; may repeat (see "
                                   "GET /v1/webhook_event_types).")],
    api: Api,
    name: Annotated[str | None, typer.Option(help="A name; default: the URL's host.")] = None,
) -> None:
    """Create an endpoint: prints it with its signing secret (shown this once)."""
    body = {"name": name or httpx.URL(url).host or url, "url": url,
            "event_types": event_types}
    _print_json(api.request("POST", "/v1/webhook_endpoints", json=body))


@command(webhooks_app, "list")
def list_endpoints(api: Api,
                   limit: Annotated[int, typer.Option(min=1, help="The most endpoints to "
                                                                  "list.")] = 100,
                   as_json: AsJson = False) -> None:
    """List the project's endpoints, newest first."""
    data = api.get("/v1/webhook_endpoints", limit=limit)
    if as_json:
        _print_json(data)
        return
    rows: list[tuple[str, ...]] = []
    for e in data["data"]:
        status = e["status"] + (f" ({e['disabled_reason']})" if e["disabled_reason"] else "")
        rows.append((e["id"], e["name"], e["url"], ", ".join(e["event_types"]), status,
                     e["signing_secret_hint"]))
    print_table([Col("id", "id"), Col("name"), Col("url"), Col("event types"),
                 Col("status", "status"), Col("secret", "fixed")], rows)


@command(webhooks_app, "get")
def get(endpoint_id: EndpointId, api: Api, as_json: AsJson = False) -> None:
    """Show an endpoint (JSON; never its secret)."""
    print_json(api.get(f"/v1/webhook_endpoints/{endpoint_id}"), plain=as_json)


@command(webhooks_app, "rotate")
def rotate(
    endpoint_id: EndpointId,
    api: Api,
    keep_old: Annotated[bool, typer.Option(
        "--keep-old", help="Sign with the previous secret too for 24 hours.")] = False,
) -> None:
    """Rotate an endpoint's signing secret: prints the new one (shown this once)."""
    body = {"keep_old_secret_active_for_24_hours": keep_old}
    _print_json(api.request("POST", f"/v1/webhook_endpoints/{endpoint_id}/rotate_secret",
                            json=body))


@command(webhooks_app, "test")
def test(
    endpoint_id: EndpointId,
    api: Api,
    event_type: Annotated[str, typer.Option("--event-type", "-e",
                                            help="The sample event's type.")] =
    "batch.completed",
) -> None:
    """Send a sample event through a worker; print the receiver's status (exit 1 if not 2xx)."""
    result = api.request("POST", f"/v1/webhook_endpoints/{endpoint_id}/test",
                         json={"event_type": event_type})
    code = result["status_code"]
    typer.echo(f"{event_type} -> {endpoint_id}: HTTP {code}")
    if not 200 <= code < 300:
        raise typer.Exit(1)


@command(webhooks_app, "deliveries")
def deliveries(
    endpoint_id: EndpointId,
    api: Api,
    event_id: Annotated[str | None, typer.Option(help="Only this event's attempts.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="The most attempts to list.")] = 20,
    as_json: AsJson = False,
) -> None:
    """The endpoint's recent delivery attempts, newest first."""
    data = api.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries", limit=limit,
                   event_id=event_id)
    if as_json:
        _print_json(data)
        return
    rows: list[tuple[str, ...]] = []
    for a in data["data"]:
        status = "-" if a["status_code"] is None else str(a["status_code"])
        rows.append((a["event_id"], when(a["created_at"]), a["event_type"], str(a["attempt"]),
                     ("ok " if a["success"] else "failed ") + status,
                     "-" if a["latency_ms"] is None else str(a["latency_ms"]),
                     a["error"] or ""))
    print_table([Col("event", "id"), Col("when", "fixed"), Col("event type"),
                 Col("try", "fixed", "right"), Col("status", "status"),
                 Col("ms", "fixed", "right"), Col("error")], rows)


@command(webhooks_app, "redeliver")
def redeliver(endpoint_id: EndpointId,
              event_id: Annotated[str, typer.Argument(help="The event's id (evt_…).")],
              api: Api) -> None:
    """Queue an event to the endpoint again (same webhook-id)."""
    _print_json(api.request(
        "POST", f"/v1/webhook_endpoints/{endpoint_id}/deliveries/{event_id}/redeliver"))


@command(webhooks_app, "delete")
def delete(endpoint_id: EndpointId, api: Api) -> None:
    """Delete an endpoint, with its pending deliveries."""
    _print_json(api.request("DELETE", f"/v1/webhook_endpoints/{endpoint_id}"))
