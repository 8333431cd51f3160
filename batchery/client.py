"""`batchery.Client`: a Python client of the native job API.

    client = batchery.Client("http://127.0.0.1:8000", api_key="…")
    job = client.submit_job("iris", item_list={"items": [[5.1, 3.5, 1.4, 0.2]], "batch_size": 1})
    client.wait(job["id"], progress=True)
    rows = list(client.results(job["id"]))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson

#: Statuses after which a job changes no more (once `ended_at` is set, its results exist).
TERMINAL = frozenset({"succeeded", "completed_with_failures", "failed", "timed_out",
                      "stopped"})


#: Rows asked for per page of results.
PAGE_ROWS = 1000


@dataclass(frozen=True, slots=True)
class ResultPage:
    """(extension) A page of result rows, and where the next one starts."""

    rows: list[dict[str, Any]]
    #: Pass it as `after` for the rows after this page.
    next_cursor: str
    #: The page stopped at its limit: more rows can be read now.
    has_more: bool
    #: The batch or job has ended and no row comes after this page.
    final: bool


class APIError(Exception):
    """The server answered with an error envelope."""

    def __init__(self, status_code: int, message: str, param: str | None = None) -> None:
        super().__init__(f"{status_code}: {message}" + (f" (param: {param})" if param else ""))
        self.status_code, self.message, self.param = status_code, message, param


def _root(base_url: str) -> str:
    """The server's root, whether given as it, as `…/v1` or as `…/api/v1`."""
    url = base_url.rstrip("/")
    for suffix in ("/api/v1", "/v1"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        key = api_key if api_key is not None else os.environ.get("BATCHERY_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._root = _root(base_url)
        self._http = httpx.Client(base_url=self._root + "/api/v1", headers=headers,
                                  timeout=timeout, transport=transport)

    # -- plumbing ----------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- jobs --------------------------------------------------------------------------

    def submit_job(self, endpoint: str, *, item_list: dict[str, Any] | None = None,
                   file_path_lister: dict[str, Any] | None = None,
                   delimited_files: dict[str, Any] | None = None, dry_run: bool = False,
                   idempotency_key: str | None = None, **options: Any) -> dict[str, Any]:
        """Submit a job with one input; `options` are the job's options (`workers`,
        `config`, `timeout`, `max_retries`, `output_path`, …). With `idempotency_key`
        (extension), submitting again with the same key and body returns the same job."""
        body: dict[str, Any] = {**options}
        for name, value in (("item_list", item_list), ("file_path_lister", file_path_lister),
                            ("delimited_files", delimited_files)):
            if value is not None:
                body[name] = value
        if dry_run:
            body["dry_run"] = True
        return self.submit(endpoint, body, idempotency_key=idempotency_key)

    def submit(self, endpoint: str, body: dict[str, Any], *,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a whole submission body as it is (a job, or a dry run's plan)."""
        result: dict[str, Any] = self._call("POST", f"/endpoints/{endpoint}/jobs", json=body,
                                            headers=_idempotency(idempotency_key))
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/jobs/{job_id}")
        return result

    def list_jobs(self, *, endpoint: str | None = None, status: str | None = None,
                  limit: int = 20, after: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("endpoint", endpoint), ("status", status),
                                    ("limit", limit), ("after", after)) if v is not None}
        result: dict[str, Any] = self._call("GET", "/jobs", params=params)
        return result

    def stop(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/jobs/{job_id}")
        return result

    def pause_job(self, job_id: str) -> dict[str, Any]:
        """(extension) Claim none of the job's batches until it is resumed; batches in
        flight finish. Its timeout keeps running."""
        result: dict[str, Any] = self._call("POST", f"/jobs/{job_id}/pause")
        return result

    def resume_job(self, job_id: str) -> dict[str, Any]:
        """(extension) Run a paused job's remaining batches."""
        result: dict[str, Any] = self._call("POST", f"/jobs/{job_id}/resume")
        return result

    # -- batches (the OpenAI-compatible API's extensions) ------------------------------

    def pause_batch(self, batch_id: str) -> dict[str, Any]:
        """(extension) Claim no new chunk of an OpenAI batch (or, by its `msgbatch_` id, a
        message batch) until it is resumed; chunks running finish. Returns the batch."""
        result: dict[str, Any] = self._call("POST", self._batch_url(batch_id, "pause"))
        return result

    def resume_batch(self, batch_id: str) -> dict[str, Any]:
        """(extension) Run a paused batch's remaining chunks. Returns the batch."""
        result: dict[str, Any] = self._call("POST", self._batch_url(batch_id, "resume"))
        return result

    def _batch_url(self, batch_id: str, action: str) -> str:
        # Absolute: the batch APIs live beside the job API, under /v1.
        kind = "messages/batches" if batch_id.startswith("msgbatch_") else "batches"
        return f"{self._root}/v1/{kind}/{batch_id}/{action}"

    def create_batch(self, input_file_id: str, *, endpoint: str = "/v1/chat/completions",
                     completion_window: str = "24h", idempotency_key: str | None = None,
                     max_cost: float | None = None, max_total_tokens: int | None = None,
                     **fields: Any) -> dict[str, Any]:
        """Create an OpenAI batch from an uploaded file; `fields` are more of the create
        body (`metadata`, `priority`, …). Extensions: with `idempotency_key`, creating
        again with the same key and parameters returns the same batch; `max_cost` (US
        dollars) and `max_total_tokens` stop the batch once its lines reach them."""
        body = {"input_file_id": input_file_id, "endpoint": endpoint,
                "completion_window": completion_window, **fields}
        for name, value in (("max_cost", max_cost), ("max_total_tokens", max_total_tokens)):
            if value is not None:
                body[name] = value
        result: dict[str, Any] = self._call("POST", f"{self._root}/v1/batches", json=body,
                                            headers=_idempotency(idempotency_key))
        return result

    def cost_estimate(self, file_id: str, model: str | None = None) -> dict[str, Any]:
        """(extension) A batch input file's input tokens and cost, estimated before a
        batch is made: at `model`'s prices, or each line's own model's."""
        params = {"model": model} if model is not None else None
        result: dict[str, Any] = self._call(
            "GET", f"{self._root}/v1/files/{file_id}/cost_estimate", params=params)
        return result

    def workers(self, job_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/jobs/{job_id}/workers")["data"]
        return result

    def failed_batches(self, job_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call(
            "GET", f"/jobs/{job_id}/failed_batches")["data"]
        return result

    def wait(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
             progress: bool = False) -> dict[str, Any]:
        """Poll until the job has ended and its results are written; returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _JobProgress() if progress else None
        try:
            while True:
                job = self.get_job(job_id)
                if bar is not None:
                    bar.update(job)
                if job["status"] in TERMINAL and job.get("ended_at") is not None:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {job['status']}")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        """The job's log lines in time order, whichever worker wrote them; with `follow`,
        as they are written (a couple of seconds behind, so that every worker's lines of
        that time are in), until the job ends."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=None) if follow else None
        with self._http.stream("GET", f"/jobs/{job_id}/logs",
                               params={"follow": str(follow).lower()},
                               timeout=timeout or self._http.timeout) as response:
            if response.is_error:
                response.read()
                _raise_for(response)
            yield from response.iter_lines()

    def results(self, job_id: str, *, follow: bool = False,
                poll: float = 1.0) -> Iterator[dict[str, Any]]:
        """The job's results, a dict per item: batch_id, index, item, prediction. Those
        written so far; with `follow`, more as they are written, until the job has ended
        and every row came (extension: rows of a running job)."""
        yield from self._follow(lambda after: self.results_page(job_id, after=after),
                                follow, poll)

    def results_page(self, job_id: str, *, after: str | None = None,
                     limit: int | None = None) -> ResultPage:
        """(extension) One page of the job's result rows after the cursor `after` (a page's
        `next_cursor`), while it runs or after it has ended."""
        return self._page(f"/jobs/{job_id}/results", after, limit)

    def retry_job(self, job_id: str) -> dict[str, Any]:
        """(extension) A new job that reruns the items of an ended job's dead-letter
        batches; its results start with the rows of the job it retries."""
        result: dict[str, Any] = self._call("POST", f"/jobs/{job_id}/retry")
        return result

    def retry_batch(self, batch_id: str, include: list[str] | None = None) -> dict[str, Any]:
        """(extension) A new batch that reruns the failed lines of an ended OpenAI batch
        (or, by its `msgbatch_` id, message batch): those with a retriable error, or with
        one of the codes in `include`. Returns the new batch."""
        body = {"include": include} if include is not None else {}
        result: dict[str, Any] = self._call("POST", self._batch_url(batch_id, "retry"),
                                            json=body)
        return result

    def batch_results(self, batch_id: str, *, follow: bool = False,
                      poll: float = 1.0) -> Iterator[dict[str, Any]]:
        """(extension) An OpenAI batch's output and error lines committed so far; with
        `follow`, more as they are committed, until the batch has ended and every line
        came."""
        yield from self._follow(lambda after: self.batch_results_page(batch_id, after=after),
                                follow, poll)

    def batch_results_page(self, batch_id: str, *, after: str | None = None,
                           limit: int | None = None) -> ResultPage:
        """(extension) One page of an OpenAI batch's result lines after the cursor `after`."""
        return self._page(self._batch_url(batch_id, "results"), after, limit)

    def _page(self, url: str, after: str | None, limit: int | None) -> ResultPage:
        # `limit` always: without it, an ended job's route streams its whole file, uncursored.
        params: dict[str, Any] = {"limit": limit or PAGE_ROWS}
        if after is not None:
            params["after"] = after
        response = self._http.get(url, params=params)
        _raise_for(response)
        headers = response.headers
        return ResultPage(
            rows=[orjson.loads(line) for line in response.content.splitlines() if line.strip()],
            next_cursor=headers.get("batchery-next-cursor", after or ""),
            has_more=headers.get("batchery-has-more") == "true",
            final=headers.get("batchery-results-final") == "true")

    @staticmethod
    def _follow(read: Callable[[str | None], ResultPage], follow: bool,
                poll: float) -> Iterator[dict[str, Any]]:
        after: str | None = None
        while True:
            page = read(after)
            yield from page.rows
            after = page.next_cursor
            if page.final or (not page.has_more and not follow):
                return
            if not page.has_more:
                time.sleep(poll)

    # -- endpoints ---------------------------------------------------------------------

    def list_endpoints(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/endpoints")["data"]
        return result

    def set_default_deployment(self, endpoint: str, deployment: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PATCH", f"/endpoints/{endpoint}",
                                            json={"default_deployment": deployment})
        return result


def _idempotency(key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": key} if key else None


def _raise_for(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        error = response.json()["error"]
        raise APIError(response.status_code, error["message"], error.get("param"))
    except (ValueError, KeyError, TypeError):
        raise APIError(response.status_code, response.text) from None


class _JobProgress:
    """A rich progress bar over a job's batches, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.fields[status]:<23}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("dead letters {task.fields[dead]}"), TimeElapsedColumn(),
            console=Console(stderr=True))
        self._progress.start()
        self._task = self._progress.add_task("job", total=None, status="pending", dead=0)

    def update(self, job: dict[str, Any]) -> None:
        metrics = job["batch_metrics"]
        total = job["total_batch_count"] if job.get("enqueuing_done") else None
        self._progress.update(self._task, total=total, status=job["status"],
                              completed=metrics["succeeded"] + metrics["dead_letters"],
                              dead=metrics["dead_letters"])

    def close(self) -> None:
        self._progress.stop()
