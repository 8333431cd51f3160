"""Deployments: named models that batch lines select with `body.model`, and endpoints:
named groups of deployments that jobs are submitted to, with a default deployment (as in
Azure ML batch endpoints). A deployment of endpoint `iris` named `v1` is stored as
`iris/v1`; a batch line whose model is `iris` goes to the endpoint's default deployment."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchery.model.exceptions import ConfigError
from batchery.model.spend import parse_prices

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z")


#: Checks and normalises a backend's options as a config is read:
#: `(backend, options, where, base_dir) -> options`. The backend registry supplies it
#: (`batchery.backends.check_options`): the model knows no backend. Without one, options
#: are kept as given, and each backend checks its own when it is built.
OptionsCheck = Callable[[str, dict[str, Any], str, Path | None], dict[str, Any]]


#: Who declared a deployment or endpoint: the config file (replaced at every start) or the
#: REST API (kept until deleted).
CONFIG, API = "config", "api"


@dataclass(frozen=True, kw_only=True, slots=True)
class Resources:
    """What each worker of a deployment's pool needs from a Ray cluster, which places it
    only on a node that has it: CPUs and GPUs (fractions allowed), memory in bytes, and
    the cluster's custom resources by name. Ignored without Ray."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None
    custom: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {key: getattr(self, key)
                                 for key in ("num_cpus", "num_gpus", "memory")
                                 if getattr(self, key) is not None}
        return found | ({"custom": dict(self.custom)} if self.custom else {})


def widest(found: Iterable[Resources]) -> Resources | None:
    """What a worker that may run any of several deployments needs: the most of each
    resource that one of them asks for (None if none asks for anything)."""
    items = list(found)
    if not items:
        return None

    def most(key: str) -> Any:
        values = [getattr(r, key) for r in items if getattr(r, key) is not None]
        return max(values) if values else None

    custom: dict[str, float] = {}
    for r in items:
        for name, amount in r.custom.items():
            custom[name] = max(amount, custom.get(name, 0.0))
    return Resources(num_cpus=most("num_cpus"), num_gpus=most("num_gpus"),
                     memory=most("memory"), custom=custom)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerPoolSpec:
    """How many worker processes `batchery serve` runs for a deployment's jobs: at least
    `min`, growing with the queue up to `max`; extra workers exit after `idle_seconds`.
    The deployment's `resources` travel with its pool: they are what each worker needs."""

    min: int = 0
    max: int = 1
    idle_seconds: float = 120.0
    resources: Resources | None = None

    def to_dict(self) -> dict[str, Any]:
        found = {"min": self.min, "max": self.max, "idle_seconds": self.idle_seconds}
        return found | ({"resources": self.resources.to_dict()} if self.resources else {})


@dataclass(frozen=True, kw_only=True, slots=True)
class Deployment:
    name: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    #: The endpoint this deployment belongs to, if any; `name` is then `<endpoint>/<short>`.
    endpoint: str | None = None
    workers: WorkerPoolSpec | None = None
    source: str = CONFIG
    #: Set on the alias that makes an endpoint's name usable as a model: the deployment
    #: it stands for.
    alias_of: str | None = None
    #: The project that owns it (made over REST); None for the config file's.
    project: str | None = None
    #: The config file's allow-list of projects that may use it; None: every project.
    projects: tuple[str, ...] | None = None
    #: Prices per million tokens (`input`, `output`), for the cost of batches and jobs.
    prices: dict[str, float] | None = None

    @property
    def short_name(self) -> str:
        return self.name.split("/", 1)[1] if self.endpoint else self.name

    def usable_by(self, project: str) -> bool:
        return _usable(self.project, self.projects, project)


@dataclass(frozen=True, kw_only=True, slots=True)
class Endpoint:
    name: str
    default_deployment: str  #: the short name of one of its deployments
    source: str = CONFIG
    created_at: float = 0.0
    #: The project that owns it (made over REST); None for the config file's.
    project: str | None = None
    #: The config file's allow-list of projects that may use it; None: every project.
    projects: tuple[str, ...] | None = None

    def usable_by(self, project: str) -> bool:
        return _usable(self.project, self.projects, project)


def _usable(owner: str | None, allowed: tuple[str, ...] | None, project: str) -> bool:
    """An owned object serves its project alone; the config file's serve every project, or
    those it lists."""
    if owner is not None:
        return project == owner
    return allowed is None or project in allowed


@dataclass(frozen=True, kw_only=True, slots=True)
class Catalog:
    """Everything a config file declares."""

    deployments: list[Deployment]
    endpoints: list[Endpoint] = field(default_factory=list)


def qualified(endpoint: str, deployment: str) -> str:
    return f"{endpoint}/{deployment}"


def parse(data: Any, source: str = "config", base_dir: Path | None = None, *,
          check_options: OptionsCheck | None = None) -> Catalog:
    """Read the `deployments:` and `endpoints:` lists of a config document, with errors that
    say where. `check_options` checks each backend's options (relative paths in them
    resolve against `base_dir`)."""
    if not isinstance(data, dict) or not (isinstance(data.get("deployments"), list)
                                          or isinstance(data.get("endpoints"), list)):
        raise ConfigError(f"{source}: expected a mapping with a 'deployments' or an "
                          f"'endpoints' list")
    _known_keys(data, _CONFIG_KEYS, source)
    result: list[Deployment] = []
    for i, item in enumerate(data.get("deployments") or []):
        _known_keys(item, _DEPLOYMENT_KEYS, f"{source}: deployments[{i}]")
        deployment = parse_deployment(item, f"{source}: deployments[{i}]", base_dir=base_dir,
                                      check_options=check_options)
        if any(d.name == deployment.name for d in result):
            raise ConfigError(f"{source}: deployments[{i}].name: '{deployment.name}' is "
                              f"declared twice")
        result.append(deployment)
    endpoints: list[Endpoint] = []
    for i, item in enumerate(data.get("endpoints") or []):
        _known_keys(item, _ENDPOINT_KEYS, f"{source}: endpoints[{i}]")
        for j, member in enumerate(item.get("deployments") or []
                                   if isinstance(item, dict) else []):
            _known_keys(member, _DEPLOYMENT_KEYS, f"{source}: endpoints[{i}].deployments[{j}]")
        endpoint, members = parse_endpoint(item, f"{source}: endpoints[{i}]", base_dir,
                                           check_options=check_options)
        taken = {d.name for d in result} | {e.name for e in endpoints}
        if endpoint.name in taken:
            raise ConfigError(f"{source}: endpoints[{i}].name: '{endpoint.name}' is "
                              f"declared twice")
        endpoints.append(endpoint)
        result.extend(members)
    return Catalog(deployments=result, endpoints=endpoints)


_CONFIG_KEYS = ("deployments", "endpoints", "security", "projects")
_DEPLOYMENT_KEYS = ("name", "backend", "options", "workers", "resources", "project",
                    "projects", "prices")
_ENDPOINT_KEYS = ("name", "deployments", "default_deployment", "project", "projects")


def _known_keys(item: Any, known: tuple[str, ...], where: str) -> None:
    """A misspelt key of a config file is an error, not a setting silently ignored."""
    if not isinstance(item, dict):
        return
    unknown = [k for k in item if k not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (valid: {', '.join(known)})")


def parse_deployment(item: Any, where: str, *, endpoint: str | None = None,
                     base_dir: Path | None = None, source: str = CONFIG,
                     check_options: OptionsCheck | None = None) -> Deployment:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping")
    name, backend = item.get("name"), item.get("backend")
    if not isinstance(name, str) or not _NAME.match(name) or (endpoint and "/" in name):
        raise ConfigError(f"{where}.name: expected a name of letters, digits and ._:-"
                          + ("" if endpoint else "/"))
    if not isinstance(backend, str):
        raise ConfigError(f"{where}.backend: expected a backend name such as 'echo'")
    options = item.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.options: expected a mapping")
    if check_options is not None:
        options = check_options(backend, options, f"{where}.options", base_dir)
    workers = _with_resources(_pool(item.get("workers"), f"{where}.workers"),
                              item.get("resources"), f"{where}.resources", source)
    full = qualified(endpoint, name) if endpoint else name
    for key in ("project", "projects"):
        if endpoint and key in item:
            raise ConfigError(f"{where}.{key}: an endpoint's deployments serve the "
                              f"projects of their endpoint; set '{key}' on the endpoint")
    return Deployment(name=full, backend=backend, options=options, endpoint=endpoint,
                      workers=workers, source=source,
                      projects=_projects(item, where, source),
                      prices=parse_prices(item.get("prices"), f"{where}.prices"))


def parse_endpoint(item: Any, where: str, base_dir: Path | None = None,
                   source: str = CONFIG, *, check_options: OptionsCheck | None = None
                   ) -> tuple[Endpoint, list[Deployment]]:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or "/" in name:
        raise ConfigError(f"{where}.name: expected a name of letters, digits and ._:-")
    items = item.get("deployments")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}.deployments: expected a non-empty list")
    members: list[Deployment] = []
    for i, raw in enumerate(items):
        member = parse_deployment(raw, f"{where}.deployments[{i}]", endpoint=name,
                                  base_dir=base_dir, source=source,
                                  check_options=check_options)
        if any(m.name == member.name for m in members):
            raise ConfigError(f"{where}.deployments[{i}].name: '{member.short_name}' is "
                              f"declared twice")
        members.append(member)
    default = item.get("default_deployment", members[0].short_name)
    if default not in {m.short_name for m in members}:
        raise ConfigError(f"{where}.default_deployment: '{default}' is not one of its "
                          f"deployments ({', '.join(m.short_name for m in members)})")
    projects = _projects(item, where, source)
    members = [dataclasses.replace(m, projects=projects) for m in members]
    return Endpoint(name=name, default_deployment=default, source=source,
                    projects=projects), members


def _projects(item: dict[str, Any], where: str, source: str) -> tuple[str, ...] | None:
    """The config file's `projects:` allow-list (absent: every project)."""
    if "project" in item and source == CONFIG:
        raise ConfigError(f"{where}.project: what the config file declares belongs to no "
                          f"project; name the projects that may use it in 'projects'")
    if "projects" not in item:
        return None
    if source != CONFIG:
        raise ConfigError(f"{where}.projects: only the config file lists projects; what is "
                          f"made over the API belongs to one project ('project')")
    raw = item["projects"]
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise ConfigError(f"{where}.projects: expected a list of project names")
    return tuple(raw)


def _pool(raw: Any, where: str) -> WorkerPoolSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"min", "max", "idle_seconds"}:
        raise ConfigError(f"{where}: expected a mapping of min, max and idle_seconds")
    low, high = raw.get("min", 0), raw.get("max", max(1, raw.get("min", 0) or 0))
    idle = raw.get("idle_seconds", 120)
    if not isinstance(low, int) or not isinstance(high, int) or not 0 <= low <= high \
            or high < 1:
        raise ConfigError(f"{where}: expected whole numbers with 0 <= min <= max and max >= 1")
    if not isinstance(idle, int | float) or idle <= 0:
        raise ConfigError(f"{where}.idle_seconds: expected a positive number of seconds")
    return WorkerPoolSpec(min=low, max=high, idle_seconds=float(idle))


def _with_resources(pool: WorkerPoolSpec | None, raw: Any, where: str,
                    source: str) -> WorkerPoolSpec | None:
    """The pool, with the deployment's `resources` (the default pool if none was given)."""
    if raw is None:
        return pool
    if source != CONFIG:
        raise ConfigError(f"{where}: only the config file declares what a deployment's "
                          f"workers need from a Ray cluster")
    return dataclasses.replace(pool or WorkerPoolSpec(), resources=parse_resources(raw, where))


_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "custom")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_resources(raw: Any, where: str) -> Resources:
    """`resources:`: `num_cpus`, `num_gpus` (numbers, fractions allowed), `memory` (bytes,
    or a size such as `4GiB`) and `custom` (Ray's custom resources: name to amount)."""
    if not isinstance(raw, dict) or not raw or set(raw) - set(_RESOURCE_KEYS):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(_RESOURCE_KEYS)} "
                          f"(a cluster's own resources go under 'custom')")
    for key in ("num_cpus", "num_gpus"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or value < 0):
            raise ConfigError(f"{where}.{key}: expected a number of at least 0")
    custom = raw.get("custom") or {}
    if not isinstance(custom, dict) or not all(
            isinstance(k, str) and k and isinstance(v, int | float) and not isinstance(v, bool)
            and v > 0 for k, v in custom.items()):
        raise ConfigError(f"{where}.custom: expected a mapping of resource names to "
                          f"positive amounts")
    cpus, gpus = raw.get("num_cpus"), raw.get("num_gpus")
    return Resources(num_cpus=None if cpus is None else float(cpus),
                     num_gpus=None if gpus is None else float(gpus),
                     memory=_memory(raw.get("memory"), f"{where}.memory"),
                     custom={k: float(v) for k, v in custom.items()})


def _memory(raw: Any, where: str) -> int | None:
    """Bytes, from a whole number or a size such as `512MiB` or `4GB`."""
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
        return raw
    found = _MEMORY.match(raw.strip()) if isinstance(raw, str) else None
    if found is None or float(found[1]) <= 0:
        raise ConfigError(f"{where}: expected a number of bytes, or a size such as 4GiB")
    return int(float(found[1]) * _UNITS[(found[2] or "").lower()])


def pool_from_dict(raw: dict[str, Any] | None) -> WorkerPoolSpec | None:
    if not raw:
        return None
    resources = raw.get("resources")
    return WorkerPoolSpec(**{**raw, "resources": Resources(**resources) if resources else None})


def load(path: str | Path, *, check_options: OptionsCheck | None = None) -> Catalog:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, str(path), Path(path).resolve().parent, check_options=check_options)
