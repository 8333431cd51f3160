"""`batchery.Client`: a Python client of the native job API.

    client = batchery.Client("http://127.0.0.1:8000", api_key="…")
    job = client.submit_job("iris", item_list={"items": [[5.1, 3.5, 1.4, 0.2]], "batch_size": 1})
    client.wait(job["id"], progress=True)
    rows = list(client.results(job["id"]))
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx
import orjson

#: Statuses after which a job changes no more (once `ended_at` is set, its results exist).
TERMINAL = frozenset({"succeeded", "completed_with_failures", "failed", "timed_out",
                      "stopped"})


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
        self._http = httpx.Client(base_url=_root(base_url) + "/api/v1", headers=headers,
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
                   **options: Any) -> dict[str, Any]:
        """Submit a job with one input; `options` are the job's options (`workers`,
        `config`, `timeout`, `max_retries`, `output_path`, …)."""
        body: dict[str, Any] = {**options}
        for name, value in (("item_list", item_list), ("file_path_lister", file_path_lister),
                            ("delimited_files", delimited_files)):
            if value is not None:
                body[name] = value
        if dry_run:
            body["dry_run"] = True
        return self.submit(endpoint, body)

    def submit(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Submit a whole submission body as it is (a job, or a dry run's plan)."""
        result: dict[str, Any] = self._call("POST", f"/endpoints/{endpoint}/jobs", json=body)
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

    def results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's results, a dict per item: batch_id, index, item, prediction."""
        with self._http.stream("GET", f"/jobs/{job_id}/results") as response:
            if response.is_error:
                response.read()
                _raise_for(response)
            for line in response.iter_lines():
                if line:
                    yield orjson.loads(line)

    # -- endpoints ---------------------------------------------------------------------

    def list_endpoints(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/endpoints")["data"]
        return result

    def set_default_deployment(self, endpoint: str, deployment: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PATCH", f"/endpoints/{endpoint}",
                                            json={"default_deployment": deployment})
        return result


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
