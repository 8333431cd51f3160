"""Model backends, looked up by the name a deployment gives. Heavy ones import lazily."""

from __future__ import annotations

import importlib
from typing import Any

from batchery import deployment_policy, secrets
from batchery.backend import ModelBackend, served_endpoints
from batchery.deployments import Deployment
from batchery.exceptions import ConfigError
from batchery.remote import RemoteBatchBackend

#: backend name -> "module:Class"
REGISTRY = {
    "echo": "batchery.backends.echo:EchoBackend",
    "openai": "batchery.backends.openai_http:OpenAIBackend",
    "http": "batchery.backends.http_template:HttpBackend",
    "sentence-transformers": "batchery.backends.sentence_transformers:SentenceTransformersBackend",
    "llama-cpp": "batchery.backends.llama_cpp:LlamaCppBackend",
    "vllm": "batchery.backends.vllm:VllmBackend",
    "python": "batchery.backends.python_predictor:PythonPredictorBackend",
}


#: Backends that hand a whole batch to a provider's batch API instead of running lines.
REMOTE_REGISTRY = {
    "openai_batch": "batchery.backends.remote_openai:OpenAIBatchBackend",
    "anthropic_batch": "batchery.backends.remote_anthropic:AnthropicBatchBackend",
    "gemini_batch": "batchery.backends.remote_gemini:GeminiBatchBackend",
}


def remote_endpoints(backend: str) -> frozenset[str] | None:
    """The endpoints a remote batch backend accepts; None for backends that run lines."""
    target = REMOTE_REGISTRY.get(backend)
    if target is None:
        return None
    module_name, class_name = target.split(":")
    endpoints: frozenset[str] = getattr(importlib.import_module(module_name),
                                        class_name).endpoints
    return endpoints


def endpoints_of(deployment: Deployment) -> frozenset[str]:
    """The endpoints a deployment serves, read from its backend class and options without
    building it: what it answers itself, and what Batchery translates onto that."""
    remote = remote_endpoints(deployment.backend)
    if remote is not None:
        return remote
    target = REGISTRY.get(deployment.backend)
    if target is None:
        return frozenset()
    module_name, class_name = target.split(":")
    cls: type[ModelBackend] = getattr(importlib.import_module(module_name), class_name)
    return served_endpoints(cls.declared_endpoints(deployment.options))


def create_remote(deployment: Deployment) -> RemoteBatchBackend:
    backend: RemoteBatchBackend = _construct(deployment, REMOTE_REGISTRY[deployment.backend])
    return backend


def check(deployment: Deployment) -> None:
    """Build the deployment's backend once and drop it: bad options fail at startup, not
    when a worker first meets the model."""
    if deployment.backend in REMOTE_REGISTRY:
        create_remote(deployment).close()
    else:
        create(deployment)


def create(deployment: Deployment) -> ModelBackend:
    target = REGISTRY.get(deployment.backend)
    if target is None:
        known = ", ".join(sorted(REGISTRY | REMOTE_REGISTRY))
        raise ConfigError(f"deployment '{deployment.name}': unknown backend "
                          f"'{deployment.backend}' (known: {known})")
    backend: ModelBackend = _construct(deployment, target)
    return backend


def _construct(deployment: Deployment, target: str) -> Any:
    module_name, class_name = target.split(":")
    cls: Any = getattr(importlib.import_module(module_name), class_name)
    options = secrets.open_options(deployment.options, secrets.SecretBox.from_env())
    # A wrong type fails here, naming the option, rather than deep in the constructor.
    wrong = deployment_policy.option_type_error(cls, options)
    if wrong is not None:
        raise ConfigError(f"deployment '{deployment.name}': {wrong}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"deployment '{deployment.name}': bad options: {exc}") from exc
