"""`llama-cpp`: a GGUF model inside the worker process, through llama-cpp-python.

Install with `pip install 'batchery[llama]'` (llama.cpp is compiled on install: about
8 minutes on 2 cores, once; pip keeps the wheel). Options:

- `model_path` (required): the GGUF file; `pkg://package/file.gguf` names a file shipped
  inside an installed Python package, found on each worker's own host.
- `n_threads`: CPU threads for generation, and `n_threads_batch`: for reading prompts
  (default for both: the host's cores shared out among the workers `batchery serve` runs
  on it, at least 1: `batchery.backends.threads`).
- `preload` (true): load the model when the worker starts, before it claims work.
- `n_ctx`: context length in tokens (default 0: the model's own); `n_batch` (512).
- `n_gpu_layers`: layers to offload with a GPU build (default 0).
- `chat_format`: a llama-cpp-python chat format name, when the GGUF's own template is wrong.
- `default_max_tokens`: the cap when a line gives no `max_tokens` (default: none, up to the
  context length).
- `reuse_prefix` (false): start each prompt from the cache of the one before, skipping the
  tokens they share. Faster for long shared prefixes, but llama.cpp's numbers then depend
  on which line came before, so the same line may get another answer at temperature 0.

One model instance per worker process answers one request at a time: llama.cpp already
spreads one request over `n_threads` cores, so parallelism comes from worker processes.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchery.backends import generation
from batchery.backends.generation import Choice, Generation
from batchery.backends.threads import default_threads
from batchery.model.exceptions import ConfigError
from batchery.ports.backend import ModelBackend, Reply, Request, error_reply

#: llama.cpp reads this seed as "pick one at random".
_RANDOM_SEED = 0xFFFFFFFF


class LlamaCppBackend(ModelBackend):
    endpoints = generation.ENDPOINTS
    #: Loaded when a worker starts (a deployment's `preload` option overrides it).
    preloads = True

    def __init__(self, *, model_path: str, n_ctx: int = 0, n_threads: int | None = None,
                 n_threads_batch: int | None = None, n_batch: int = 512,
                 n_gpu_layers: int = 0, chat_format: str | None = None,
                 default_max_tokens: int | None = None, reuse_prefix: bool = False) -> None:
        for name, value in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch),
                            ("default_max_tokens", default_max_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer")
        if not isinstance(n_ctx, int) or n_ctx < 0:
            raise ConfigError("n_ctx must be 0 (the model's own) or a positive integer")
        self.model_path = model_path
        self.default_max_tokens = default_max_tokens
        self.reuse_prefix = reuse_prefix
        self._settings: dict[str, Any] = {
            "n_ctx": n_ctx, "n_threads": n_threads, "n_threads_batch": n_threads_batch,
            "n_batch": n_batch, "n_gpu_layers": n_gpu_layers, "chat_format": chat_format}
        self._llm: Any = None
        # A llama.cpp context is not safe to share between threads.
        self._lock = threading.Lock()

    async def start(self) -> None:
        if self._llm is None:
            self._llm = await asyncio.to_thread(self._load)

    def _load(self) -> Any:
        from llama_cpp import Llama  # lazy: only workers that serve this deployment need it

        path = generation.resolve_path(self.model_path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"llama-cpp: no GGUF file at {path}")
        settings = dict(self._settings)
        for name in ("n_threads", "n_threads_batch"):
            settings[name] = settings[name] or default_threads()
        return Llama(model_path=path, verbose=False, **settings)

    async def aclose(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.close)

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        if endpoint not in self.endpoints:
            return [error_reply(404, f"Invalid URL (POST {endpoint})") for _ in requests]
        await self.start()
        # One thread hop per request, not per chunk: the worker can cancel between two.
        return [await asyncio.to_thread(self._answer, endpoint, r.body) for r in requests]

    def _answer(self, endpoint: str, body: dict[str, Any]) -> Reply:
        gen = generation.parse(endpoint, body)
        if isinstance(gen, Reply):
            return gen
        try:
            with self._lock:
                if gen.messages is not None:
                    answer = generation.chat_body(body.get("model"), self._chat(gen))
                else:
                    answer = generation.completion_body(
                        body.get("model"), [self._complete(gen, p) for p in gen.prompts])
        except Exception as exc:
            # A request llama-cpp-python cannot take is a 400; anything else is the model
            # failing, and the chunk is retried.
            refused = generation.refusal(exc)
            if refused is None:
                raise
            return refused
        return Reply(status_code=200, body=answer)

    def _sampling(self, gen: Generation) -> dict[str, Any]:
        seed = random.getrandbits(32) if gen.seed is None else gen.seed
        return {
            "max_tokens": gen.max_tokens or self.default_max_tokens,
            "temperature": gen.temperature, "top_p": gen.top_p,
            # OpenAI samples with temperature and top_p alone: switch off llama.cpp's
            # default top_k and min_p filters.
            "top_k": 0, "min_p": 0.0,
            "presence_penalty": gen.presence_penalty,
            "frequency_penalty": gen.frequency_penalty,
            "stop": gen.stop,
            # Always a seed: without one llama-cpp-python derives it from the last request's.
            "seed": seed % _RANDOM_SEED,
        }

    def _fresh(self) -> None:
        if not self.reuse_prefix:
            self._llm.reset()  # each answer from an empty cache: see `reuse_prefix`

    def _chat(self, gen: Generation) -> Choice:
        self._fresh()
        response_format = None
        if gen.json_schema is not None:
            response_format = {"type": "json_object", **(
                {"schema": gen.json_schema} if gen.json_schema else {})}
        result = self._llm.create_chat_completion(
            messages=gen.messages, response_format=response_format, **self._sampling(gen))
        first = result["choices"][0]
        return _choice(first["message"].get("content") or "", first, result["usage"])

    def _complete(self, gen: Generation, prompt: str) -> Choice:
        self._fresh()
        result = self._llm.create_completion(prompt=prompt, **self._sampling(gen))
        first = result["choices"][0]
        return _choice(first["text"], first, result["usage"])


def _choice(text: str, choice: dict[str, Any], usage: dict[str, int]) -> Choice:
    return Choice(text=text, finish_reason=choice.get("finish_reason") or "stop",
                  prompt_tokens=usage["prompt_tokens"],
                  completion_tokens=usage["completion_tokens"])
