"""`batchery keys …`: create, list and revoke API keys in the keys file.

Errors are one line on stderr and exit status 2, so scripts can rely on the output:
`keys create` prints the new key, and only it, on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from batchery.model.exceptions import BatcheryError
from batchery.security import auth

keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
T = TypeVar("T")

KeysFile = Annotated[Path, typer.Option(
    "--keys-file", envvar="BATCHERY_KEYS_FILE", dir_okay=False,
    help="The YAML keys file `serve --keys-file` reads.")]


def _or_exit(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (BatcheryError, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None


@keys_app.command("create")
def create_key(
    project: Annotated[str, typer.Option(help="The project the key belongs to.")],
    keys_file: KeysFile,
    role: Annotated[str, typer.Option(
        help="admin (manages endpoints, deployments and keys) or member.")] = "member",
    name: Annotated[str | None, typer.Option(
        help="A unique name, to list and revoke the key by. Default: <project>-<n>.")] = None,
) -> None:
    """Create an API key: prints it (and nothing else) once, and stores only its hash."""
    entry, key = _or_exit(lambda: auth.add_key(keys_file, project, role=role, name=name))
    typer.echo(key)
    typer.echo(f"created {entry.role.value} key '{entry.name}' of project '{entry.project}' "
               f"in {keys_file}", err=True)


@keys_app.command("list")
def list_keys(
    keys_file: KeysFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List the keys: name, project, role, when created and revoked (never a key)."""
    entries = _or_exit(lambda: auth.list_keys(keys_file))
    if as_json:
        typer.echo(json.dumps([e.public() for e in entries], indent=2))
        return
    rows = [("NAME", "PROJECT", "ROLE", "CREATED", "REVOKED")]
    rows += [(e.name, e.project, e.role.value, auth.iso_time(e.created_at) or "-",
              auth.iso_time(e.revoked_at) or "-") for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                   .rstrip())


@keys_app.command("revoke")
def revoke_key(
    name: Annotated[str, typer.Argument(help="The key's name (see `batchery keys list`).")],
    keys_file: KeysFile,
) -> None:
    """Revoke a key: a running server refuses it within seconds."""
    entry = _or_exit(lambda: auth.revoke_key(keys_file, name))
    typer.echo(f"revoked key '{entry.name}' of project '{entry.project}' "
               f"(at {auth.iso_time(entry.revoked_at)})")
