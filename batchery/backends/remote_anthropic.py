"""`anthropic_batch`: hand a whole Message Batch to an Anthropic-compatible Message Batches
API (Anthropic, or another Batchery), and bring its results back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import httpx
import orjson

from batchery.backends import remote_common
from batchery.backends.remote_common import call
from batchery.model.batches import Batch
from batchery.model.exceptions import BackendError
from batchery.ports.remote import Progress, RemoteBatchBackend
from batchery.wire.anthropic import MESSAGES_ENDPOINT

API_VERSION = "2023-06-01"


class AnthropicBatchBackend(RemoteBatchBackend):
    endpoints = frozenset({MESSAGES_ENDPOINT})

    def __init__(self, *, base_url: str, api_key_env: str | None = None,
                 api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        key = remote_common.api_key(api_key_env, api_key)
        headers = {"anthropic-version": API_VERSION, **({"x-api-key": key} if key else {})}
        self.model = model
        self._client = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers,
                                    timeout=timeout_s, transport=transport)

    def submit(self, batch: Batch, lines: Iterator[bytes]) -> dict[str, Any]:
        # The Message Batches API takes one JSON body (up to 256 MB at Anthropic).
        requests = []
        for raw in lines:
            line = orjson.loads(raw)
            params = line["body"]
            if self.model is not None:
                params = {**params, "model": self.model}
            requests.append({"custom_id": line["custom_id"], "params": params})
        job: dict[str, Any] = call(self._client, "POST", "v1/messages/batches",
                                   content=orjson.dumps({"requests": requests}),
                                   headers={"Content-Type": "application/json"})
        return job

    def refresh(self, job: dict[str, Any]) -> dict[str, Any]:
        fresh: dict[str, Any] = call(self._client, "GET", f"v1/messages/batches/{job['id']}")
        return fresh

    def cancel(self, job: dict[str, Any]) -> dict[str, Any]:
        try:
            cancelled: dict[str, Any] = call(self._client, "POST",
                                             f"v1/messages/batches/{job['id']}/cancel")
        except BackendError:
            return self.refresh(job)  # it may have ended meanwhile
        return cancelled

    def progress(self, job: dict[str, Any]) -> Progress:
        counts = job.get("request_counts") or {}
        if job.get("processing_status") != "ended":
            return Progress(ended=False)
        failed = sum(int(counts.get(k) or 0) for k in ("errored", "canceled", "expired"))
        return Progress(ended=True, completed=int(counts.get("succeeded") or 0), failed=failed)

    def fetch(self, job: dict[str, Any], out: IO[bytes], err: IO[bytes]) -> None:
        url = job.get("results_url") or f"v1/messages/batches/{job['id']}/results"
        try:
            with self._client.stream("GET", url) as response:
                if not response.is_success:
                    response.read()
                    raise BackendError(f"fetching results of {job['id']}: the provider "
                                       f"answered {response.status_code}: "
                                       f"{response.text[:500]}")
                for line in response.iter_lines():
                    if line.strip():
                        out.write(line.encode() + b"\n")
        except httpx.HTTPError as exc:
            raise BackendError(f"fetching results of {job['id']}: {type(exc).__name__}: "
                               f"{exc}") from exc

    def close(self) -> None:
        self._client.close()
