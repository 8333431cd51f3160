"""`batchery models`, `batchery endpoints …` and `batchery status`: what a running server
offers and what it is doing."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from batchery.cli.client import BATCH_COLUMNS, batch_rows
from batchery.cli.common import (
    BATCH_TERMINAL,
    Api,
    AsJson,
    Col,
    command,
    console,
    print_json,
    print_table,
)
from batchery.cli.jobs import JOB_COLUMNS, job_rows

endpoints_app = typer.Typer(help="The job API's endpoints: list them, show one, pick the "
                                 "deployment that serves it by default.",
                            no_args_is_help=True)
#: Job statuses after which a job changes no more.
JOB_TERMINAL = frozenset({"succeeded", "completed_with_failures", "failed", "timed_out",
                          "stopped"})
#: The newest batches and jobs `status` looks through for the active ones.
STATUS_SCAN = 100


def _models_rows(models: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [(m["id"], m["backend"], " ".join(e.removeprefix("/v1/") for e in m["endpoints"]))
            for m in models]


MODEL_COLUMNS = [Col("model", "id"), Col("backend", "fixed"), Col("endpoints")]


def register(app: typer.Typer) -> None:
    """Add `models` and `status` to `app`; `endpoints` is a group of its own."""
    command(app, "models")(models)
    command(app, "status")(status)
    app.add_typer(endpoints_app, name="endpoints")


def models(api: Api, as_json: AsJson = False) -> None:
    """The models your key may use, each with the batch endpoints it serves.

    The models are the deployments of GET /v1/models."""
    data = api.get("/v1/models")
    if as_json:
        print_json(data, plain=True)
        return
    print_table(MODEL_COLUMNS, _models_rows(data["data"]))


def _endpoint_rows(endpoints: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [(e["name"], e["default_deployment"],
             " ".join(d["name"] for d in e["deployments"]), e.get("project") or "-")
            for e in endpoints]


ENDPOINT_COLUMNS = [Col("endpoint", "id"), Col("default", "status"), Col("deployments"),
                    Col("project", "fixed")]
EndpointName = Annotated[str, typer.Argument(help="The endpoint's name.")]


@command(endpoints_app, "list")
def list_endpoints(api: Api, as_json: AsJson = False) -> None:
    """The endpoints your key may submit jobs to, with their deployments."""
    data = api.get("/api/v1/endpoints")
    if as_json:
        print_json(data, plain=True)
        return
    print_table(ENDPOINT_COLUMNS, _endpoint_rows(data["data"]))


def _deployments(endpoint: dict[str, Any]) -> None:
    print_table([Col("deployment", "id"), Col("backend", "fixed"), Col("default", "status"),
                 Col("workers"), Col("source", "fixed")],
                [(d["name"], d["backend"], "yes" if d["default"] else "",
                  "-" if not d.get("workers") else
                  " ".join(f"{k}={v}" for k, v in d["workers"].items()),
                  d.get("source") or "-") for d in endpoint["deployments"]])


@command(endpoints_app, "get")
def get_endpoint(name: EndpointName, api: Api, as_json: AsJson = False) -> None:
    """An endpoint and its deployments."""
    endpoint = api.get(f"/api/v1/endpoints/{name}")
    if as_json:
        print_json(endpoint, plain=True)
        return
    console.print(f"endpoint {endpoint['name']} (project {endpoint.get('project') or '-'}): "
                  f"jobs run on {endpoint['default_deployment']} unless they name another",
                  markup=False, highlight=False, soft_wrap=True)
    _deployments(endpoint)


@command(endpoints_app, "set-default")
def set_default(name: EndpointName,
                deployment: Annotated[str, typer.Argument(
                    help="The deployment that serves the endpoint's jobs from now on.")],
                api: Api, as_json: AsJson = False) -> None:
    """Make DEPLOYMENT the endpoint's default deployment.

    New jobs that name no deployment run on it; jobs already submitted keep theirs. Only an
    endpoint made over the API changes so; one of the config file changes in the file."""
    endpoint = api.request("PATCH", f"/api/v1/endpoints/{name}",
                           json={"default_deployment": deployment})
    if as_json:
        print_json(endpoint, plain=True)
        return
    typer.echo(f"{endpoint['name']}: default deployment {endpoint['default_deployment']}")


def _active(items: list[dict[str, Any]], terminal: frozenset[str],
            key: str = "status") -> list[dict[str, Any]]:
    return [i for i in items if i.get(key) not in terminal]


def _message_rows(batches: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for b in batches:
        counts = b["request_counts"]
        done = sum(counts.values()) - counts.get("processing", 0)
        rows.append((b["id"], b["processing_status"], f"{done}/{sum(counts.values())}",
                     str(counts.get("errored", 0))))
    return rows


def status(api: Api, as_json: AsJson = False) -> None:
    """The server at a glance: version, workers, models, active work.

    Its version, its live workers by state, its models and endpoints, and the active
    batches, message batches and jobs with their progress."""
    found = {"status": api.get("/api/v1/status"),
             "models": api.get("/v1/models")["data"],
             "endpoints": api.get("/api/v1/endpoints")["data"],
             "batches": _active(api.get("/v1/batches", limit=STATUS_SCAN)["data"],
                                BATCH_TERMINAL),
             "message_batches": _active(
                 api.get("/v1/messages/batches", limit=STATUS_SCAN)["data"],
                 frozenset({"ended"}), "processing_status"),
             "jobs": _active(api.get("/api/v1/jobs", limit=STATUS_SCAN)["data"],
                             JOB_TERMINAL)}
    if as_json:
        print_json(found, plain=True)
        return
    _print_status(api, found)


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"


def _print_status(api: Api, found: dict[str, Any]) -> None:
    info = found["status"]

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    say(f"server    {api.server} (batchery {info['version']})")
    engine = info["workers"]["batches"]
    say(f"workers   batches: {_states(engine)}")
    for pool in info["workers"]["jobs"]:
        say(f"          jobs on {pool['deployment']}: {_states(pool['states'])}")
    if sum(engine.values()) == 0 and not any(p["total"] for p in info["workers"]["jobs"]):
        say("          no worker is alive: batches wait until one starts (`batchery worker`, "
            "or `batchery serve` with --workers above 0)")
    active = info["active"]
    say(f"active    {active['batches']} batches, {active['message_batches']} message "
        f"batches, {active['jobs']} jobs; {info['queue']['depth']} lines or items queued; "
        f"{info['lines_per_second']:.3g} lines/s over the last minute")
    say("")
    print_table(MODEL_COLUMNS, _models_rows(found["models"]))
    if found["endpoints"]:
        say("")
        print_table(ENDPOINT_COLUMNS, _endpoint_rows(found["endpoints"]))
    if found["batches"]:
        say("")
        print_table(BATCH_COLUMNS, batch_rows(found["batches"]))
    if found["message_batches"]:
        say("")
        print_table([Col("message batch", "id"), Col("status", "status"),
                     Col("done", "fixed", "right"), Col("errored", "fixed", "right")],
                    _message_rows(found["message_batches"]))
    if found["jobs"]:
        say("")
        print_table(JOB_COLUMNS, job_rows(found["jobs"]))
