"""The trust model, in one place: who is calling (a `Principal`) and what the operator allows
(a `TrustPolicy`). Framework-free; the API, the job service and the deployment checks ask it.

* A key has a project and a role. `admin` keys manage endpoints, deployments and keys;
  `member` keys use what exists, in their own project.
* The operator's config file says what callers may name: environment variables, upstream
  hosts, input roots and output roots per project, and the limits.
* Open mode (no keys file) is one person on their own machine: everything is allowed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchery.model.exceptions import ConfigError, Forbidden

#: The project of every object in open mode, and of keys created without one.
DEFAULT_PROJECT = "default"
#: Environment variables that no deployment may read or set, whatever the operator allows.
RESERVED_ENV_PREFIX = "BATCHERY_"
MIB = 1024 * 1024


class Role(enum.StrEnum):
    ADMIN = "admin"
    MEMBER = "member"


@dataclass(frozen=True, kw_only=True, slots=True)
class Principal:
    """Who a request acts for."""

    project: str
    role: Role
    #: The key's name; None in open mode.
    key_name: str | None = None
    #: True when the server has no keys file: one local user, who may do anything.
    open: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def require_admin(self, action: str) -> None:
        if not self.is_admin:
            raise Forbidden(f"Only an admin key may {action}; the key in use is a member "
                            f"key of project '{self.project}'.")


OPEN_PRINCIPAL = Principal(project=DEFAULT_PROJECT, role=Role.ADMIN, open=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProjectGrant:
    """What the operator grants one project beyond its own uploaded files."""

    #: Local directories or object-store prefixes (`s3://bucket/prefix/`) its jobs may read.
    input_roots: tuple[str, ...] = ()
    #: Where its jobs may write, besides its own output root in the file store.
    output_roots: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    #: Largest JSON request body, in bytes: larger ones get 413 before they are read whole.
    max_json_body_bytes: int = 16 * MIB
    #: Largest uploaded file, in bytes.
    max_upload_bytes: int = 2048 * MIB
    #: Total bytes of live files one project may keep; None: no quota.
    project_quota_bytes: int | None = None
    #: The largest `workers.max` a deployment may ask for.
    max_workers_per_deployment: int = 16
    #: Worker processes that all REST-created deployments' pools may run together.
    max_api_pool_processes: int = 32


@dataclass(frozen=True, kw_only=True, slots=True)
class TrustPolicy:
    """The operator's choices. Read from the `security:` and `projects:` sections of the
    config file, and from `serve` flags."""

    #: No keys file: every caller is the local admin, every path and deployment allowed.
    open: bool = True
    #: Whether an admin may create `python` (code) deployments over REST.
    allow_code_deployments: bool = False
    #: Environment variables that REST-created deployments may name (`api_key_env`, `env`).
    allowed_env: frozenset[str] = frozenset()
    #: Hosts REST-created connector deployments may reach: `host`, `host:port` or
    #: `*.domain`. Loopback, link-local and private addresses only when listed exactly.
    upstream_hosts: tuple[str, ...] = ()
    projects: Mapping[str, ProjectGrant] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    #: Directories no caller-named path may point into: the data directory, the file store.
    protected_paths: tuple[str, ...] = ()

    def grant(self, project: str) -> ProjectGrant:
        return self.projects.get(project, ProjectGrant())

    def env_allowed(self, name: str) -> bool:
        """Whether a REST-created deployment may name this environment variable."""
        if name.upper().startswith(RESERVED_ENV_PREFIX):
            return False
        return self.open or name in self.allowed_env


def parse_policy(data: Any, source: str = "config") -> TrustPolicy:
    """The `security:` and `projects:` sections of a config document (both optional).
    `open` and the flags are filled in by the caller with `dataclasses.replace`."""
    if not isinstance(data, Mapping):
        return TrustPolicy()
    security = data.get("security") or {}
    if not isinstance(security, Mapping):
        raise ConfigError(f"{source}: security: expected a mapping")
    known = {"allow_code_deployments", "allowed_env", "upstream_hosts", "max_json_body_bytes",
             "max_upload_bytes", "project_quota_bytes", "max_workers_per_deployment",
             "max_api_pool_processes"}
    unknown = sorted(set(security) - known)
    if unknown:
        raise ConfigError(f"{source}: security.{unknown[0]}: unknown setting (known: "
                          f"{', '.join(sorted(known))})")
    defaults = Limits()
    limits = Limits(
        max_json_body_bytes=_positive(security, "max_json_body_bytes",
                                      defaults.max_json_body_bytes, source),
        max_upload_bytes=_positive(security, "max_upload_bytes", defaults.max_upload_bytes,
                                   source),
        project_quota_bytes=_positive(security, "project_quota_bytes", None, source),
        max_workers_per_deployment=_positive(security, "max_workers_per_deployment",
                                             defaults.max_workers_per_deployment, source),
        max_api_pool_processes=_positive(security, "max_api_pool_processes",
                                         defaults.max_api_pool_processes, source))
    allow_code = security.get("allow_code_deployments", False)
    if not isinstance(allow_code, bool):
        raise ConfigError(f"{source}: security.allow_code_deployments: expected true or false")
    return TrustPolicy(
        allow_code_deployments=allow_code,
        allowed_env=frozenset(_strings(security, "allowed_env", f"{source}: security")),
        upstream_hosts=_strings(security, "upstream_hosts", f"{source}: security"),
        projects=_projects(data.get("projects"), source), limits=limits)


def _projects(raw: Any, source: str) -> dict[str, ProjectGrant]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: projects: expected a mapping of project names to "
                          f"{{input_roots, output_roots}}")
    grants: dict[str, ProjectGrant] = {}
    for name, item in raw.items():
        where = f"{source}: projects.{name}"
        item = item or {}
        if not isinstance(item, Mapping) or set(item) - {"input_roots", "output_roots"}:
            raise ConfigError(f"{where}: expected a mapping of input_roots and output_roots")
        grants[str(name)] = ProjectGrant(input_roots=_strings(item, "input_roots", where),
                                         output_roots=_strings(item, "output_roots", where))
    return grants


def _strings(raw: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}.{key}: expected a list of non-empty strings")
    return tuple(value)


def _positive(raw: Mapping[str, Any], key: str, default: int | None, source: str) -> Any:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: security.{key}: expected a whole number >= 1")
    return value
