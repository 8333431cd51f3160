"""The `batchery` command line."""

from __future__ import annotations

from typing import Annotated

import typer

from batchery import __version__
from batchery.cli import (
    catalog,
    client,
    jobs,
    keys,
    message_batches,
    offline,
    reruns,
    server,
    trying,
    webhooks,
)
from batchery.cli.common import command

app = typer.Typer(help="Batchery: self-hosted batch inference.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=True)
server.register(app)
offline.register(app)
catalog.register(app)  # `status`, `models`, `endpoints`
trying.register(app)  # `try`
app.add_typer(client.files_app, name="files")
app.add_typer(client.batches_app, name="batches")
app.add_typer(message_batches.message_batches_app, name="message-batches")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(webhooks.webhooks_app, name="webhooks")
command(app, "logs")(jobs.logs)
reruns.register()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"batchery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
) -> None:
    """Batchery: self-hosted batch inference."""


def main() -> None:
    app()
