"""`vllm`: a vLLM engine inside the worker process, for GPUs.

Install with `pip install 'batchery[vllm]'` on a machine with CUDA. Options:

- `model` (required): a Hugging Face model directory or a name already in the local cache
  (`pkg://package/dir` for one shipped inside an installed Python package).
- `tensor_parallel_size` (1), `gpu_memory_utilization` (0.9), `max_model_len` (the
  model's), `dtype` (`auto`): the engine arguments most deployments set.
- `engine_args`: any other `vllm.AsyncEngineArgs` field, as a mapping.
- `default_max_tokens`: the cap when a line gives no `max_tokens` (default: none, up to
  the context length).
- `preload` (true): load the engine when the worker starts, before it claims work.

Every line of a call (a chunk's lines for this deployment) is handed to the engine at
once, so its scheduler batches them continuously, as vLLM's own server would under load.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from batchery.backends import generation
from batchery.backends.generation import Choice, Generation
from batchery.model.exceptions import ConfigError
from batchery.ports.backend import ModelBackend, Reply, Request, error_reply

#: Builds the engine's sampling parameters from plain keyword arguments.
ParamsFactory = Callable[[dict[str, Any]], Any]


class VllmBackend(ModelBackend):
    endpoints = generation.ENDPOINTS
    #: Loaded when a worker starts (a deployment's `preload` option overrides it).
    preloads = True

    def __init__(self, *, model: str, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 dtype: str = "auto", engine_args: dict[str, Any] | None = None,
                 default_max_tokens: int | None = None) -> None:
        if default_max_tokens is not None and (not isinstance(default_max_tokens, int)
                                               or default_max_tokens < 1):
            raise ConfigError("default_max_tokens must be a positive integer")
        self.model = model
        self.default_max_tokens = default_max_tokens
        self.engine_args: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len, "dtype": dtype, **(engine_args or {})}
        self._engine: Any = None
        self._tokenizer: Any = None
        self._params: ParamsFactory = dict

    async def start(self) -> None:
        if self._engine is not None:
            return
        # In the event loop's own thread: the engine ties its output loop to it. Loading
        # blocks the loop meanwhile; the worker's heartbeat runs on a thread of its own.
        self._engine, self._params = self._open()
        tokenizer = self._engine.get_tokenizer()
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer

    def _open(self) -> tuple[Any, ParamsFactory]:
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # lazy: GPU machines only

        args = AsyncEngineArgs(model=generation.resolve_path(self.model), **self.engine_args)
        return AsyncLLMEngine.from_engine_args(args), _sampling_params

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        if endpoint not in self.endpoints:
            return [error_reply(404, f"Invalid URL (POST {endpoint})") for _ in requests]
        await self.start()
        return list(await asyncio.gather(*(self._answer(endpoint, r.body) for r in requests)))

    async def _answer(self, endpoint: str, body: dict[str, Any]) -> Reply:
        gen = generation.parse(endpoint, body)
        if isinstance(gen, Reply):
            return gen
        try:
            return await self._run(gen, body.get("model"))
        except Exception as exc:
            # vLLM's ValueError for a prompt longer than the context, or a chat template
            # refusing the messages, is a 400; anything else fails the call.
            refused = generation.refusal(exc)
            if refused is None:
                raise
            return refused

    async def _run(self, gen: Generation, model: Any) -> Reply:
        if gen.messages is not None:
            text = self._tokenizer.apply_chat_template(gen.messages, tokenize=False,
                                                       add_generation_prompt=True)
            # The template already wrote the special tokens: don't add a second BOS.
            ids = self._tokenizer.encode(text, add_special_tokens=False)
            choice = await self._generate({"prompt_token_ids": ids}, gen)
            return Reply(status_code=200, body=generation.chat_body(model, choice))
        choices = await asyncio.gather(*(self._generate(p, gen) for p in gen.prompts))
        return Reply(status_code=200, body=generation.completion_body(model, list(choices)))

    async def _generate(self, prompt: Any, gen: Generation) -> Choice:
        params = self._params({
            "n": 1, "max_tokens": gen.max_tokens or self.default_max_tokens,
            "temperature": gen.temperature, "top_p": gen.top_p, "stop": gen.stop,
            "seed": gen.seed, "presence_penalty": gen.presence_penalty,
            "frequency_penalty": gen.frequency_penalty, "json_schema": gen.json_schema})
        final: Any = None
        async for output in self._engine.generate(prompt, params,
                                                  request_id=uuid.uuid4().hex):
            final = output
        if final is None:
            raise RuntimeError("vLLM ended a request without any output")
        out = final.outputs[0]
        return Choice(text=out.text, finish_reason=out.finish_reason or "stop",
                      prompt_tokens=len(final.prompt_token_ids or ()),
                      completion_tokens=len(out.token_ids))


def _sampling_params(kwargs: dict[str, Any]) -> Any:
    """`vllm.SamplingParams`, with a JSON schema as the structured-output option of the
    installed vLLM: `structured_outputs` since 0.10, `guided_decoding` before."""
    from vllm import SamplingParams

    schema = kwargs.pop("json_schema")
    if schema is None:
        return SamplingParams(**kwargs)
    spec: dict[str, Any] = {"json": schema} if schema else {"json_object": True}
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams
        return SamplingParams(guided_decoding=GuidedDecodingParams(**spec), **kwargs)
    return SamplingParams(structured_outputs=StructuredOutputsParams(**spec), **kwargs)
