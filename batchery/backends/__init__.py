"""Model backends, looked up by the name a deployment gives. Heavy ones import lazily.

What a backend is (whether it runs user code, whether it serves jobs, how its options are
checked) is declared on its class and read here, so that no other module tests a backend's
name."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from batchery.model.deployments import Deployment
from batchery.model.exceptions import ConfigError
from batchery.ports.backend import ModelBackend, served_endpoints
from batchery.ports.remote import RemoteBatchBackend
from batchery.security import deployment_policy, secrets

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


def _backend_class(backend: str) -> type[Any] | None:
    """The class registered under a backend name (imported now: the heavy libraries are
    imported by the classes themselves, later); None for an unknown name."""
    target = REGISTRY.get(backend) or REMOTE_REGISTRY.get(backend)
    if target is None:
        return None
    module_name, class_name = target.split(":")
    cls: type[Any] = getattr(importlib.import_module(module_name), class_name)
    return cls


def runs_user_code(backend: str) -> bool:
    """Whether the backend runs code that its deployment names (see
    `ModelBackend.runs_user_code`); False for an unknown name, which fails elsewhere."""
    return bool(getattr(_backend_class(backend), "runs_user_code", False))


def serves_jobs(backend: str) -> bool:
    """Whether deployments of the backend can run native jobs."""
    return bool(getattr(_backend_class(backend), "serves_jobs", False))


def job_backends() -> list[str]:
    """The names of the backends that serve jobs, for messages."""
    return sorted(name for name in REGISTRY if serves_jobs(name))


def check_options(backend: str, options: dict[str, Any], where: str,
                  base_dir: Path | None) -> dict[str, Any]:
    """A deployment's options as its backend checks and normalises them when a config is
    read (`ModelBackend.check_options`); an unknown backend's are kept, and `create`
    reports the name. This is the `OptionsCheck` that config parsing is given."""
    own = {k: v for k, v in options.items() if k != PRELOAD}
    if PRELOAD in options:
        _check_preload(options[PRELOAD], where)
    check = getattr(_backend_class(backend), "check_options", None)
    if check is None:
        return dict(options)
    checked: dict[str, Any] = check(own, where, base_dir)
    return checked | ({PRELOAD: options[PRELOAD]} if PRELOAD in options else {})


#: The option, of every backend, that says whether workers load the model when they start.
PRELOAD = "preload"


def _check_preload(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: options.{PRELOAD} must be true or false, not "
                          f"{value!r}")


def preloads(deployment: Deployment) -> bool:
    """Whether a worker loads the deployment's model when it starts, before it claims
    work: its `preload` option, else its backend's default (true for the in-process
    models: `sentence-transformers`, `llama-cpp`, `vllm`; false for the others)."""
    value = deployment.options.get(PRELOAD)
    if isinstance(value, bool):
        return value
    return bool(getattr(_backend_class(deployment.backend), "preloads", False))


def remote_endpoints(backend: str) -> frozenset[str] | None:
    """The endpoints a remote batch backend accepts; None for backends that run lines."""
    if backend not in REMOTE_REGISTRY:
        return None
    cls = _backend_class(backend)
    assert cls is not None
    endpoints: frozenset[str] = cls.endpoints
    return endpoints


def endpoints_of(deployment: Deployment) -> frozenset[str]:
    """The endpoints a deployment serves, read from its backend class and options without
    building it: what it answers itself, and what Batchery translates onto that."""
    remote = remote_endpoints(deployment.backend)
    if remote is not None:
        return remote
    cls = _backend_class(deployment.backend)
    if cls is None:
        return frozenset()
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
    where = f"deployment '{deployment.name}'"
    if PRELOAD in deployment.options:
        _check_preload(deployment.options[PRELOAD], where)
    options = secrets.open_options({k: v for k, v in deployment.options.items()
                                    if k != PRELOAD}, secrets.SecretBox.from_env())
    # An unknown name or a wrong type fails here, naming the option and what is valid,
    # rather than deep in the constructor.
    unknown = _unknown_option(cls, options, deployment.backend)
    if unknown is not None:
        raise ConfigError(f"{where}: {unknown}")
    wrong = deployment_policy.option_type_error(cls, options)
    if wrong is not None:
        raise ConfigError(f"{where}: {wrong}")
    try:
        return cls(**options)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") \
            from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad options: {exc}") from exc


#: Constructor parameters that tests pass and a config file never does.
_NOT_OPTIONS = frozenset({"transport"})


def _unknown_option(cls: Any, options: dict[str, Any], backend: str) -> str | None:
    """A sentence naming the first option that `cls`'s constructor does not take, with
    those it does; None when all are known (or it takes any keyword)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    valid = [p.name for p in parameters
             if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.name not in _NOT_OPTIONS]
    unknown = [name for name in options if name not in valid]
    if not unknown:
        return None
    return (f"options.{unknown[0]}: the '{backend}' backend has no such option "
            f"(valid: {', '.join(valid) or 'none'})")
