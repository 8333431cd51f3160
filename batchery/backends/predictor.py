"""Loading users' predictor classes: the `python` backend's runtime, shared with the jobs
runner (which runs a predictor per job). It sits with the backends, below the products, so
that both the backend and the jobs product can use it.

A predictor is the user's class with `predict` and, optionally, `on_job_complete`.
Arguments are bound by name, so a method receives only the parameters it declares. Sync
code runs on one dedicated thread per predictor (so thread-bound state keeps working and
the caller's event loop stays free for heartbeats), in a copy of the caller's context (so
the job a log record belongs to is known there too)."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchery.model.exceptions import BatcheryError, ConfigError

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_KNOWN = ("predictor", "python_path", "config", "env")
#: Names a parameter may use for each value we pass (Cortex's names included).
_INIT_ALIASES = {"config": "config", "job": "job", "job_spec": "job"}
_PREDICT_ALIASES = {"batch": "batch", "payload": "batch", "batch_id": "batch_id"}


class PredictorError(BatcheryError):
    """A predictor cannot be loaded, or returned something we cannot use."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PredictorOptions:
    predictor: str
    python_path: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def parse_options(options: Mapping[str, Any], where: str,
                  base_dir: Path | None = None) -> PredictorOptions:
    """Check a `python` deployment's options; imports nothing."""
    unknown = sorted(set(options) - set(_KNOWN))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown option (known: {', '.join(_KNOWN)})")
    target = options.get("predictor")
    if not isinstance(target, str) or not _TARGET.match(target):
        raise ConfigError(f"{where}.predictor: expected 'module.path:ClassName'")
    paths = options.get("python_path") or []
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{where}.python_path: expected a list of directories")
    base = base_dir or Path.cwd()
    config = options.get("config") or {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}.config: expected a mapping")
    return PredictorOptions(predictor=target,
                            python_path=tuple(str((base / p).resolve()) for p in paths),
                            config=dict(config), env=_env(options.get("env"), where))


def _env(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.env: expected a mapping of names to strings")
    env: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{where}.env.{name}: expected a string")
        env[str(name)] = str(value)
    return env


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings merge; everything else from `override` wins."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def _bind(function: Callable[..., Any], values: Mapping[str, Any],
          aliases: Mapping[str, str], what: str) -> dict[str, Any]:
    """The keyword arguments `function` declares, from `values` by (aliased) name."""
    kwargs: dict[str, Any] = {}
    parameters = inspect.signature(function).parameters
    for name, parameter in parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return {**{k: v for k, v in values.items()}, **kwargs}
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if name in aliases:
            kwargs[name] = values[aliases[name]]
        elif parameter.default is inspect.Parameter.empty:
            known = ", ".join(sorted(aliases))
            raise PredictorError(f"{what} requires the argument '{name}', which Batchery "
                                 f"does not supply (it passes, by name: {known})")
    return kwargs


class LoadedPredictor:
    def __init__(self, instance: Any, executor: ThreadPoolExecutor) -> None:
        self._instance = instance
        self._executor = executor
        self._predict = getattr(instance, "predict", None)
        if not callable(self._predict):
            raise PredictorError(f"{type(instance).__name__} has no predict method")
        self.is_async = inspect.iscoroutinefunction(self._predict)
        hook = getattr(instance, "on_job_complete", None)
        self._hook = hook if callable(hook) else None
        self.has_on_job_complete = self._hook is not None

    async def predict(self, batch: list[Any], batch_id: str) -> list[Any] | None:
        assert self._predict is not None
        kwargs = _bind(self._predict, {"batch": batch, "batch_id": batch_id},
                       _PREDICT_ALIASES, "predict")
        if self.is_async:
            result = await self._predict(**kwargs)
        else:
            result = await _on_thread(self._executor, self._predict, kwargs)
        return _predictions(result)

    async def on_job_complete(self) -> None:
        if self._hook is None:
            return
        if inspect.iscoroutinefunction(self._hook):
            await self._hook()
        else:
            await _on_thread(self._executor, self._hook, {})

    def close(self) -> None:
        # Never wait: a predict that hung (past its batch_timeout) may never return.
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _on_thread(executor: ThreadPoolExecutor, function: Callable[..., Any],
                     kwargs: dict[str, Any]) -> Any:
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, lambda: context.run(function, **kwargs))


def _predictions(result: Any) -> list[Any] | None:
    if result is None or isinstance(result, list):
        return result
    if isinstance(result, tuple):
        return list(result)
    if hasattr(result, "tolist") and callable(result.tolist):  # a NumPy array
        converted = result.tolist()
        if isinstance(converted, list):
            return converted
    raise PredictorError(f"predict returned {type(result).__name__}; expected a list with "
                         f"one prediction per item, or None")


def _load_class(options: PredictorOptions) -> type[Any]:
    for path in reversed(options.python_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    module_name, class_name = options.predictor.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PredictorError(f"cannot import the predictor module '{module_name}' "
                             f"(python_path: {list(options.python_path)}): {exc}") from exc
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise PredictorError(f"the module '{module_name}' has no class '{class_name}'")
    return cls


async def load_predictor(options: PredictorOptions, job: Mapping[str, Any]
                         ) -> LoadedPredictor:
    """Import the class and build it, on the predictor's own thread."""
    os.environ.update(options.env)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor")
    config = merge_config(options.config, job.get("config") or {})

    def build() -> Any:
        cls = _load_class(options)
        # The class's signature is its __init__'s without `self` (and `()` if it has none).
        kwargs = _bind(cls, {"config": config, "job": dict(job)}, _INIT_ALIASES,
                       f"{cls.__name__}.__init__")
        return cls(**kwargs)

    try:
        instance = await _on_thread(executor, build, {})
        return LoadedPredictor(instance, executor)
    except BaseException:
        executor.shutdown(wait=False)
        raise
