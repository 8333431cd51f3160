"""(extension) `batchery batches retry|results` and `batchery jobs retry|results`: rerun
what failed, and read results while the work runs."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated

import orjson
import typer

from batchery.cli import client as batches_cli
from batchery.cli import jobs as jobs_cli
from batchery.client import ResultPage

Output = Annotated[Path | None, typer.Option("-o", "--output", help="Write to a file.")]
After = Annotated[str | None, typer.Option(
    "--after", help="Start after this cursor (printed by an earlier call).")]
Follow = Annotated[bool, typer.Option(
    "--follow", "-f", help="Keep reading as lines are committed, until the work has ended "
                           "and every line came.")]
Limit = Annotated[int, typer.Option("--limit", min=1, max=10_000, help="Lines per request.")]
Interval = Annotated[float, typer.Option(help="Seconds between reads when --follow waits.")]


@contextlib.contextmanager
def _writing(output: Path | None) -> Iterator[IO[bytes]]:
    if output is None:
        yield sys.stdout.buffer
        return
    with output.open("wb") as out:
        yield out


def _drain(read: Callable[[str | None], ResultPage], after: str | None, follow: bool,
           interval: float, out: IO[bytes]) -> ResultPage:
    """Write the lines after `after`: those committed so far, or with `follow` all of them;
    returns the last page read."""
    while True:
        page = read(after)
        for row in page.rows:
            out.write(orjson.dumps(row) + b"\n")
        out.flush()
        after = page.next_cursor
        if page.final or (not page.has_more and not follow):
            return page
        if not page.has_more:
            time.sleep(interval)


def _report(page: ResultPage) -> None:
    """Where to carry on: on stderr, so stdout holds only the lines."""
    if page.final:
        jobs_cli.errors.print("every line has been read: the work has ended")
    else:
        jobs_cli.errors.print(f"next cursor: {page.next_cursor}")


def batch_retry(batch_id: str,
                include: Annotated[list[str] | None, typer.Option(
                    "--include", help="Rerun the lines that failed with this code (may "
                                      "repeat): an error code, an HTTP status ('429') or its "
                                      "class ('5xx'). By default, the retriable ones.")] = None,
                base_url: batches_cli.BaseUrl = batches_cli.DEFAULT_URL,
                api_key: batches_cli.ApiKey = "batchery") -> None:
    """Rerun the failed lines of an ended batch in a new batch (prints it)."""
    with jobs_cli._client(base_url, api_key) as client:
        batch = client.retry_batch(batch_id, include)
    batches_cli.console.print_json(json.dumps(batch))


def batch_results(batch_id: str, after: After = None, follow: Follow = False,
                  limit: Limit = 1000, interval: Interval = 1.0, output: Output = None,
                  base_url: batches_cli.BaseUrl = batches_cli.DEFAULT_URL,
                  api_key: batches_cli.ApiKey = "batchery") -> None:
    """A batch's output and error lines committed so far, one JSON line each, even while it
    runs; the cursor to carry on from goes to stderr."""
    with jobs_cli._client(base_url, api_key) as client, _writing(output) as out:
        last = _drain(lambda at: client.batch_results_page(batch_id, after=at, limit=limit),
                      after, follow, interval, out)
    _report(last)


def job_retry(job_id: str, server: jobs_cli.ServerUrl = jobs_cli.DEFAULT_SERVER,
              api_key: jobs_cli.ApiKey = None) -> None:
    """Rerun the dead-letter batches of an ended job in a new job (prints its id)."""
    with jobs_cli._client(server, api_key) as client:
        typer.echo(client.retry_job(job_id)["id"])


def job_results(job_id: str, after: After = None, follow: Follow = False,
                limit: Limit = 1000, interval: Interval = 1.0, output: Output = None,
                server: jobs_cli.ServerUrl = jobs_cli.DEFAULT_SERVER,
                api_key: jobs_cli.ApiKey = None) -> None:
    """The job's results, one JSON line per item: those written so far, even while it runs;
    with --follow, all of them."""
    with jobs_cli._client(server, api_key) as client, _writing(output) as out:
        last = _drain(lambda at: client.results_page(job_id, after=at, limit=limit),
                      after, follow, interval, out)
    if not last.final:
        _report(last)


def register() -> None:
    """Add the commands to `batchery batches` and `batchery jobs`."""
    batches_cli.batches_app.command("retry")(batch_retry)
    batches_cli.batches_app.command("results")(batch_results)
    jobs_cli.jobs_app.command("results")(job_results)
    jobs_cli.jobs_app.command("retry")(job_retry)
