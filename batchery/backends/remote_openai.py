"""`openai_batch`: hand a whole batch to an OpenAI-compatible Batch API (OpenAI, Azure,
or another Batchery), and bring its output and error files back."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO, Any

import httpx
import orjson

from batchery.backends import remote_common
from batchery.backends.remote_common import call
from batchery.model.batches import (
    SUPPORTED_ENDPOINTS,
    TERMINAL,
    Batch,
    BatchError,
    BatchStatus,
    canonical_endpoint,
)
from batchery.model.exceptions import BackendError
from batchery.ports.remote import Progress, RemoteBatchBackend


class OpenAIBatchBackend(RemoteBatchBackend):
    endpoints = frozenset(SUPPORTED_ENDPOINTS)

    def __init__(self, *, base_url: str, api_key_env: str | None = None,
                 api_key: str | None = None, model: str | None = None,
                 completion_window: str = "24h", timeout_s: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        key = remote_common.api_key(api_key_env, api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = model
        self.completion_window = completion_window
        self._client = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers,
                                    timeout=timeout_s, transport=transport)

    def submit(self, batch: Batch, lines: Iterator[bytes]) -> dict[str, Any]:
        with tempfile.TemporaryFile() as upload:
            for raw in lines:
                upload.write(self._rewrite(raw))
            upload.seek(0)
            uploaded = call(self._client, "POST", "files", data={"purpose": "batch"},
                            files={"file": (f"{batch.id}.jsonl", upload, "application/jsonl")})
        job: dict[str, Any] = call(self._client, "POST", "batches", json={
            "input_file_id": uploaded["id"], "endpoint": canonical_endpoint(batch.endpoint),
            "completion_window": self.completion_window,
            "metadata": {"batchery_batch_id": batch.id}})
        return job

    def _rewrite(self, raw: bytes) -> bytes:
        line = orjson.loads(raw)
        # The provider gets the `/v1` spelling: it may not know Azure's (`/chat/completions`).
        line["url"] = canonical_endpoint(line["url"])
        if self.model is not None:
            line["body"]["model"] = self.model
        return orjson.dumps(line) + b"\n"

    def refresh(self, job: dict[str, Any]) -> dict[str, Any]:
        fresh: dict[str, Any] = call(self._client, "GET", f"batches/{job['id']}")
        return fresh

    def cancel(self, job: dict[str, Any]) -> dict[str, Any]:
        try:
            cancelled: dict[str, Any] = call(self._client, "POST",
                                             f"batches/{job['id']}/cancel")
        except BackendError:
            # The provider may have ended meanwhile (409): its state is what counts.
            return self.refresh(job)
        return cancelled

    def progress(self, job: dict[str, Any]) -> Progress:
        counts = job.get("request_counts") or {}
        status = job.get("status")
        if status == BatchStatus.FAILED.value:
            errors = (job.get("errors") or {}).get("data") or [
                {"code": "remote_failed", "message": "The provider failed the batch."}]
            return Progress(ended=True, errors=[
                BatchError(code=str(e.get("code") or "remote_failed"),
                           message=str(e.get("message") or ""), param=e.get("param"),
                           line=e.get("line")) for e in errors])
        return Progress(ended=status in {s.value for s in TERMINAL},
                        completed=int(counts.get("completed") or 0),
                        failed=int(counts.get("failed") or 0))

    def fetch(self, job: dict[str, Any], out: IO[bytes], err: IO[bytes]) -> None:
        for file_id, target in ((job.get("output_file_id"), out),
                                (job.get("error_file_id"), err)):
            if file_id:
                self._download(file_id, target)

    def _download(self, file_id: str, target: IO[bytes]) -> None:
        try:
            with self._client.stream("GET", f"files/{file_id}/content") as response:
                if not response.is_success:
                    response.read()
                    raise BackendError(f"downloading {file_id}: the provider answered "
                                       f"{response.status_code}: {response.text[:500]}")
                # A broken download raises; the batch's next step fetches again from scratch.
                for block in response.iter_bytes(1 << 20):
                    target.write(block)
        except httpx.HTTPError as exc:
            raise BackendError(f"downloading {file_id}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._client.close()
