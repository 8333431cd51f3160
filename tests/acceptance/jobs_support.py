"""Helpers for the job API tests: a config of test predictors, and a small HTTP client
that waits for jobs (the tests of `batchery.Client` itself are elsewhere)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"


def deployment(name: str, cls: str, config: dict[str, Any] | None = None,
               workers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "backend": "python",
            "options": {"predictor": f"job_predictors:{cls}", "python_path": [str(PREDICTORS)],
                        "config": config or {}},
            "workers": workers or {"min": 0, "max": 3, "idle_seconds": 3}}


def write_config(path: Path, endpoints: list[dict[str, Any]],
                 deployments: list[dict[str, Any]] | None = None) -> Path:
    document: dict[str, Any] = {"endpoints": endpoints}
    if deployments:
        document["deployments"] = deployments
    path.write_text(yaml.safe_dump(document))
    return path


class Jobs:
    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url + "/api/v1", timeout=30)

    def submit(self, endpoint: str, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
        response = self.http.post(f"/endpoints/{endpoint}/jobs", json=body)
        assert response.status_code == expect, response.text
        result: dict[str, Any] = response.json()
        return result

    def get(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def wait(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if job["ended_at"] is not None:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not end: {job}\n{self.logs(job_id)}")

    def wait_for(self, job_id: str, check: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if check(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached the state: {job}")

    def results(self, job_id: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/jobs/{job_id}/results")
        assert response.status_code == 200, response.text
        return [orjson.loads(line) for line in response.content.splitlines() if line]

    def logs(self, job_id: str) -> str:
        return self.http.get(f"/jobs/{job_id}/logs").text

    def logs_with(self, job_id: str, text: str, timeout: float = 30) -> str:
        """The job's log once it holds `text`: workers flush their lines a moment after
        the work they describe, so a line may land after the job has ended."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.logs(job_id)
            if text in log or time.monotonic() > deadline:
                return log
            time.sleep(0.2)

    def listing(self, path: str) -> list[dict[str, Any]]:
        response = self.http.get(path)
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"]
        return data
