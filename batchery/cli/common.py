"""What every client command of `batchery` shares: where the server is (`--server`,
`--api-key`), calling it, printing its answers (JSON, tables that fit the terminal) and
one-line errors.

A client command is declared with `@command(app, name)` and a parameter `api: Api`: the
decorator gives it the options `--server` (`BATCHERY_SERVER`), `--api-key`
(`BATCHERY_API_KEY`) and the deprecated `--base-url` (`BATCHERY_BASE_URL`), and passes the
`Api` they make."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from batchery.client import APIError, Client

console = Console()
errors = Console(stderr=True)

DEFAULT_SERVER = "http://127.0.0.1:8000"
#: Statuses that end an OpenAI batch.
BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

ServerUrl = Annotated[str | None, typer.Option(
    "--server", envvar="BATCHERY_SERVER", show_default=False,
    help=f"The server's root URL (default: {DEFAULT_SERVER}).")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar="BATCHERY_API_KEY", show_default=False,
    help="API key (any value, or none, when the server has no keys).")]
BaseUrl = Annotated[str | None, typer.Option(
    "--base-url", envvar="BATCHERY_BASE_URL", hidden=True, show_default=False,
    help="Deprecated: use --server (the /v1 suffix is dropped).")]
AsJson = Annotated[bool, typer.Option(
    "--json", help="Print the server's JSON answer as it came (a list: the whole list "
                   "object, `data` and all).")]


@dataclass(frozen=True, slots=True)
class Api:
    """A running server: its root URL and the key to call it with."""

    server: str
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, timeout: float = 600.0) -> httpx.Client:
        return httpx.Client(base_url=self.server, headers=self.headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call `path` (from the root: `/v1/…`, `/api/v1/…`); the JSON answer, or None for
        an answer of another type. An error ends the command: one line, exit status 1."""
        with self.reaching(), self.http() as http:
            return check(http.request(method, path, **kwargs))

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path,
                            params={k: v for k, v in params.items() if v is not None})

    @contextlib.contextmanager
    def reaching(self) -> Iterator[None]:
        """Turns a server out of reach into one line and exit status 1."""
        try:
            yield
        except httpx.TransportError as exc:
            fail(f"cannot reach {self.server}: {exc}")

    @contextlib.contextmanager
    def client(self) -> Iterator[Client]:
        """A `batchery.Client` whose errors end the command with one line."""
        try:
            with self.reaching(), Client(self.server, self.api_key or "") as client:
                yield client
        except APIError as exc:
            where = f" (param: {exc.param})" if exc.param else ""
            fail(f"{exc.message}{where}", f"error {exc.status_code}")


def fail(message: str, label: str = "error", code: int = 1) -> NoReturn:
    """End the command: `label: message` on stderr, exit status `code`."""
    errors.print(f"[red]{escape(label)}:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def check(response: httpx.Response) -> Any:
    """The answer's JSON (None if it is not JSON); an error answer ends the command."""
    if response.is_success:
        return response.json() if "json" in response.headers.get("content-type", "") else None
    try:
        error = response.json()["error"]
        message = error["message"]
        where = f" (param: {error['param']})" if error.get("param") else ""
    except (ValueError, KeyError, TypeError):
        message, where = response.text.strip() or response.reason_phrase, ""
    fail(message + where, f"error {response.status_code}")


def connect(server: str | None, base_url: str | None, api_key: str | None) -> Api:
    """The server the options name: `--server`; else the deprecated `--base-url`, with a
    warning; else the default."""
    if base_url and not server:
        errors.print("[yellow]warning:[/yellow] --base-url and BATCHERY_BASE_URL are "
                     "deprecated: use --server or BATCHERY_SERVER (the root URL, without "
                     "/v1).", soft_wrap=True)
        server = base_url.rstrip("/").removesuffix("/v1")
    elif base_url:
        errors.print("[yellow]warning:[/yellow] --base-url (BATCHERY_BASE_URL) is deprecated "
                     "and ignored, as --server (BATCHERY_SERVER) is set.", soft_wrap=True)
    return Api((server or DEFAULT_SERVER).rstrip("/"), api_key or None)


F = TypeVar("F", bound=Callable[..., Any])
_CONNECTION = (("server", ServerUrl), ("api_key", ApiKey), ("base_url", BaseUrl))


def command(app: typer.Typer, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register `fn`, whose parameter `api: Api` is filled from the connection options,
    as the command `name` of `app`."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != "api"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=a) for n, a in _CONNECTION]

        @functools.wraps(fn)
        def run(*args: Any, **values: Any) -> Any:
            api = connect(values.pop("server"), values.pop("base_url"), values.pop("api_key"))
            return fn(*args, api=api, **values)

        run.__annotations__ = {**{p.name: p.annotation for p in kept}, **dict(_CONNECTION)}
        run.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*kept, *added])
        app.command(name, **kwargs)(run)
        return fn
    return decorate


def _hide_flag_types() -> None:
    """Typer's help shows a type beside every option, `<bool>` beside a flag too, where it
    means nothing: flags show none."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if option is None or shown is None:
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        result: str | None = shown(self, ctx)
        return result

    option.display_type_rich = display_type_rich


_hide_flag_types()


# -- printing -----------------------------------------------------------------------------

def print_json(data: Any, plain: bool = False) -> None:
    """`data` as indented JSON on stdout: highlighted on a terminal unless `plain`."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    if plain or not console.is_terminal:
        typer.echo(text)
    else:
        console.print_json(text)


def print_warnings(found: dict[str, Any]) -> None:
    """A batch's or job's `warnings` (extension), a line each, on stderr."""
    for warning in found.get("warnings") or []:
        errors.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True,
                     highlight=False)


def when(stamp: float | None) -> str:
    """A time, short: the time of day if today, else the date."""
    if not stamp:
        return "-"
    local = time.localtime(stamp)
    if time.strftime("%Y-%m-%d", local) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d", local)


@dataclass(frozen=True, slots=True)
class Col:
    """A table column. `kind`: `id` (shortened in the middle when the table must narrow),
    `status` (never cut or wrapped), `text` (wraps) or `fixed` (short; never wraps)."""

    header: str
    kind: str = "text"
    justify: str = "left"


#: The fewest characters an id is shortened to, and a text column is given before it wraps.
MIN_ID = 13
MIN_TEXT = 12


def shorten(value: str, width: int) -> str:
    """`value` cut in the middle to `width` characters: its start and its end stay."""
    if len(value) <= width:
        return value
    head = (width - 1) // 2
    return value[:head] + "…" + value[len(value) - (width - 1 - head):]


def _natural(col: Col, rows: Sequence[Sequence[str]], i: int) -> int:
    return max([len(col.header), *(len(r[i]) for r in rows)])


def print_table(cols: Sequence[Col], rows: Sequence[Sequence[str]]) -> None:
    """A table as wide as the terminal (COLUMNS, or 80 in a pipe) allows: when it must
    narrow, text columns wrap, then ids are shortened in the middle; a status, a number or
    a time never is."""
    natural = [_natural(c, rows, i) for i, c in enumerate(cols)]
    widths = list(natural)
    # No edges, a space between columns and a space of padding on either side of it.
    overhead = 3 * (len(cols) - 1)
    floor = [min(n, MIN_TEXT) if c.kind == "text" else n for c, n in zip(cols, natural,
                                                                          strict=True)]
    excess = sum(floor) + overhead - console.width
    ids = [i for i, c in enumerate(cols) if c.kind == "id"]
    while excess > 0 and any(widths[i] > MIN_ID for i in ids):
        for i in ids:
            if excess > 0 and widths[i] > MIN_ID:
                widths[i] -= 1
                excess -= 1
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for i, col in enumerate(cols):
        justify: Any = col.justify
        if col.kind == "text":
            table.add_column(col.header, overflow="fold", justify=justify,
                             min_width=floor[i])
        else:
            # Never wrapped, never narrower than its longest cell: a status stays whole.
            table.add_column(col.header, no_wrap=True, min_width=widths[i],
                             max_width=widths[i], justify=justify)
    for row in rows:
        table.add_row(*(Text(shorten(cell, widths[i]) if cols[i].kind == "id" else cell)
                        for i, cell in enumerate(row)))
    console.print(table)
