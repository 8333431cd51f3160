"""(extension) `batchery batches retry|results` and `batchery jobs retry|results`: rerun
what failed, and read results while the work runs."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated

import orjson
import typer

from batchery.cli import client as batches_cli
from batchery.cli import jobs as jobs_cli
from batchery.cli.common import Api, command, errors, print_json
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
        errors.print("every line has been read: the work has ended")
    else:
        errors.print(f"next cursor: {page.next_cursor}")


def batch_retry(batch_id: Annotated[str, typer.Argument(help="The batch's id.")], api: Api,
                include: Annotated[list[str] | None, typer.Option(
                    "--include", help="Rerun the lines that failed with this code (may "
                                      "repeat): an error code, an HTTP status ('429') or its "
                                      "class ('5xx'). By default, the retriable ones.")] = None,
                ) -> None:
    """Rerun the failed lines of an ended batch in a new batch (prints it)."""
    with api.client() as client:
        batch = client.retry_batch(batch_id, include)
    print_json(batch)


def batch_results(batch_id: Annotated[str, typer.Argument(help="The batch's id.")], api: Api,
                  after: After = None, follow: Follow = False,
                  limit: Limit = 1000, interval: Interval = 1.0, output: Output = None,
                  ) -> None:
    """A batch's output and error lines so far, one JSON line each, even while it runs.

    The cursor to carry on from goes to stderr."""
    with api.client() as client, _writing(output) as out:
        last = _drain(lambda at: client.batch_results_page(batch_id, after=at, limit=limit),
                      after, follow, interval, out)
    _report(last)


def job_retry(job_id: jobs_cli.JobId, api: Api) -> None:
    """Rerun the dead-letter batches of an ended job in a new job (prints its id)."""
    with api.client() as client:
        typer.echo(client.retry_job(job_id)["id"])


def job_results(job_id: jobs_cli.JobId, api: Api, after: After = None, follow: Follow = False,
                limit: Limit = 1000, interval: Interval = 1.0, output: Output = None,
                ) -> None:
    """The job's results, one JSON line per item, even while it runs.

    Those written so far; with --follow, all of them."""
    with api.client() as client, _writing(output) as out:
        last = _drain(lambda at: client.results_page(job_id, after=at, limit=limit),
                      after, follow, interval, out)
    if not last.final:
        _report(last)


def register() -> None:
    """Add the commands to `batchery batches` and `batchery jobs`."""
    command(batches_cli.batches_app, "retry")(batch_retry)
    command(batches_cli.batches_app, "results")(batch_results)
    command(jobs_cli.jobs_app, "results")(job_results)
    command(jobs_cli.jobs_app, "retry")(job_retry)
