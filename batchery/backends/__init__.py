"""Model backends, looked up by the name a deployment gives. Heavy ones import lazily."""

from __future__ import annotations

import importlib
from typing import Any

from batchery import secrets
from batchery.backend import ModelBackend
from batchery.deployments import Deployment
from batchery.exceptions import ConfigError

#: backend name -> "module:Class"
REGISTRY = {
    "echo": "batchery.backends.echo:EchoBackend",
    "openai": "batchery.backends.openai_http:OpenAIBackend",
}


def create(deployment: Deployment) -> ModelBackend:
    target = REGISTRY.get(deployment.backend)
    if target is None:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"deployment '{deployment.name}': unknown backend "
                          f"'{deployment.backend}' (known: {known})")
    module_name, class_name = target.split(":")
    cls: Any = getattr(importlib.import_module(module_name), class_name)
    options = secrets.open_options(deployment.options, secrets.SecretBox.from_env())
    try:
        backend: ModelBackend = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"deployment '{deployment.name}': bad options: {exc}") from exc
    return backend
