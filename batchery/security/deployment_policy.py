"""What the operator lets a deployment do, checked when one is declared: in the config file
(at startup, as a `ConfigError`) or over REST (as a 403 or a 400 naming the option).

* Code: deployments whose backend runs user code (`python`) over REST only when the
  operator allows code deployments. Which backends do is the caller's answer (the backend
  registry's `runs_user_code`): this layer sits below the backends and names none.
* `python_path`: never into Batchery's own data directory or file store.
* Environment variables: `BATCHERY_*` never; over REST only those the operator lists.
* Upstreams: over REST, URLs only to hosts the operator lists; addresses inside the network
  only when listed by exact name, not through a wildcard.
* Worker pools: `workers.max` up to the operator's cap.

Also here: `option_type_error`, which checks a backend's options against the types its
constructor declares, so that a wrong type is a configuration error naming the option.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import socket
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from batchery.model.deployments import Deployment
from batchery.model.exceptions import ConfigError, Forbidden, InvalidRequest
from batchery.security.trust import RESERVED_ENV_PREFIX, TrustPolicy

_URL_SCHEMES = {"http": 80, "https": 443, "ws": 80, "wss": 443}
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def check(deployment: Deployment, policy: TrustPolicy, *, via_api: bool,
          runs_user_code: bool) -> None:
    """Raise if the operator's policy refuses this deployment: `Forbidden` or
    `InvalidRequest` over REST (`via_api`), `ConfigError` for the config file.
    `runs_user_code`: whether the deployment's backend runs code the deployment names."""
    try:
        if via_api and not policy.open:
            _check_code(deployment, policy, runs_user_code)
        _check_python_path(deployment, policy)
        _check_env(deployment, policy, via_api=via_api)
        if via_api and not policy.open:
            _check_upstreams(deployment, policy)
        _check_workers(deployment, policy)
    except (Forbidden, InvalidRequest) as exc:
        if via_api:
            raise
        raise ConfigError(f"deployment '{deployment.name}': {exc.message}") from None


# -- code --------------------------------------------------------------------------------


def _check_code(deployment: Deployment, policy: TrustPolicy, runs_user_code: bool) -> None:
    if policy.allow_code_deployments:
        return
    response = deployment.options.get("response")
    if runs_user_code:
        what, param = f"runs user code (backend '{deployment.backend}')", "backend"
    elif isinstance(response, Mapping) and "post_process" in response:
        what, param = "imports a function (options.response.post_process)", \
            "options.response.post_process"
    else:
        return
    raise Forbidden(f"The deployment '{deployment.short_name}' {what}: this server does not "
                    f"let deployments made over the API run code. The operator allows it "
                    f"with security.allow_code_deployments: true in the config file (or "
                    f"`batchery serve --allow-code-deployments`).", param=param)


def _check_python_path(deployment: Deployment, policy: TrustPolicy) -> None:
    paths = deployment.options.get("python_path")
    if not isinstance(paths, list):
        return
    protected = [os.path.realpath(p) for p in policy.protected_paths]
    for i, entry in enumerate(paths):
        if not isinstance(entry, str):
            continue
        real = os.path.realpath(entry)  # symlinks and `..` resolved
        inside = next((p for p in protected if real == p or real.startswith(p + os.sep)),
                      None)
        if inside is not None:
            raise Forbidden(f"options.python_path[{i}]: '{entry}' leads into {inside}, "
                            f"Batchery's own data (its data directory or file store), from "
                            f"which no deployment may load code.",
                            param=f"options.python_path[{i}]")


# -- environment variables ---------------------------------------------------------------


def _env_names(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(option path, variable name) for every `*_env` string and `env:` mapping key."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}"
            if isinstance(key, str) and key.endswith("_env") and isinstance(item, str):
                yield where, item
            if key == "env" and isinstance(item, Mapping):
                yield from ((f"{where}.{name}", str(name)) for name in item)
            else:
                yield from _env_names(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _env_names(item, f"{path}[{i}]")


def _check_env(deployment: Deployment, policy: TrustPolicy, *, via_api: bool) -> None:
    for where, name in _env_names(deployment.options, "options"):
        if name.upper().startswith(RESERVED_ENV_PREFIX):
            raise Forbidden(f"{where}: the environment variable '{name}' is reserved for "
                            f"Batchery's own settings ({RESERVED_ENV_PREFIX}*); no deployment "
                            f"may read or set it.", param=where)
        if via_api and not policy.env_allowed(name):
            raise Forbidden(f"{where}: deployments made over the API may not name the "
                            f"environment variable '{name}'. The operator allows it by "
                            f"listing it in security.allowed_env of the config file.",
                            param=where)


# -- upstream hosts ----------------------------------------------------------------------


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def _check_upstreams(deployment: Deployment, policy: TrustPolicy) -> None:
    for where, value in _strings(deployment.options, "options"):
        text = value.strip()
        scheme = text.split(":", 1)[0].lower() if ":" in text else ""
        names_url = where.rsplit(".", 1)[-1].endswith("url")
        if scheme not in _URL_SCHEMES:
            if names_url:  # a URL made of placeholders would let batch lines pick the host
                raise InvalidRequest(f"{where}: expected an http(s) URL that names its host, "
                                     f"such as 'https://api.example.com/v1'.", param=where)
            continue
        host, port = _host_port(text, where, _URL_SCHEMES[scheme])
        _check_host(host, port, policy, where)


def _host_port(url: str, where: str, default_port: int) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRequest(f"{where}: '{url}' is not a valid URL.", param=where) from None
    host = (parts.hostname or "").rstrip(".")
    if not host or "$" in parts.netloc or "{" in parts.netloc:
        raise InvalidRequest(f"{where}: the URL must name its host plainly (no placeholder), "
                             f"such as 'https://api.example.com/v1'.", param=where)
    return host, port or default_port


def check_url(url: str, policy: TrustPolicy, where: str, *, who: str) -> None:
    """The same allow-list for one http(s) URL that is no deployment's (a webhook
    receiver's); `who` says in a refusal whose URLs may not reach the host."""
    default_port = _URL_SCHEMES.get(url.split(":", 1)[0].lower(), 443)
    host, port = _host_port(url, where, default_port)
    _check_host(host, port, policy, where, who=who)


def _check_host(host: str, port: int, policy: TrustPolicy, where: str, *,
                who: str = "deployments made over the API") -> None:
    exact, wildcard = False, False
    for entry in policy.upstream_hosts:
        found = _entry_matches(entry, host, port)
        exact = exact or found == "exact"
        wildcard = wildcard or found == "wildcard"
    how = (f"The operator allows it by listing '{host}' (or '{host}:{port}') in "
           f"security.upstream_hosts of the config file.")
    if exact:
        return
    if not wildcard:
        raise Forbidden(f"{where}: {who} may not reach the host '{host}'. {how}",
                        param=where)
    internal = _internal_address(host, port)
    if internal is not None:
        raise Forbidden(f"{where}: the host '{host}' is an address inside the network "
                        f"({internal}), which a wildcard entry does not allow. {how}",
                        param=where)


def _entry_matches(entry: str, host: str, port: int) -> str | None:
    """'exact', 'wildcard' or None: how an `upstream_hosts` entry (`host`, `host:port`,
    `*.domain`, `*.domain:port`) matches."""
    wildcard = entry.startswith("*.")
    try:
        parts = urlsplit("//" + (entry[2:] if wildcard else entry))
        entry_port = parts.port
    except ValueError:
        return None
    entry_host = (parts.hostname or "").rstrip(".")
    if not entry_host or (entry_port is not None and entry_port != port):
        return None
    if wildcard:
        return "wildcard" if host.endswith("." + entry_host) else None
    return "exact" if host == entry_host else None


def _internal_address(host: str, port: int) -> str | None:
    """The first address `host` is (an IP literal) or resolves to that is not public:
    loopback, link-local, private, unspecified, multicast or reserved; else None."""
    try:
        addresses: list[IpAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return None  # it resolves to nothing: nothing inside the network either
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                     for info in infos]
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast or address.is_reserved:
            return str(address)
    return None


# -- worker pools ------------------------------------------------------------------------


def _check_workers(deployment: Deployment, policy: TrustPolicy) -> None:
    cap = policy.limits.max_workers_per_deployment
    if deployment.workers is not None and deployment.workers.max > cap:
        raise InvalidRequest(f"workers.max: {deployment.workers.max} is above this server's "
                             f"cap of {cap} worker processes per deployment "
                             f"(security.max_workers_per_deployment).", param="workers.max")


# -- option types ------------------------------------------------------------------------


def option_type_error(cls: Any, options: Mapping[str, Any]) -> str | None:
    """A sentence naming the first option whose value does not have the type that `cls`'s
    constructor declares for it; None when all do (or the types cannot be read)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
        parameters = inspect.signature(cls.__init__).parameters
    except Exception:  # annotations we cannot evaluate: the constructor checks for itself
        return None
    for name, value in options.items():
        hint = hints.get(name)
        parameter = parameters.get(name)
        if hint is None or parameter is None or parameter.kind is parameter.VAR_KEYWORD:
            continue
        if not _has_type(value, hint):
            return f"options.{name}: expected {_describe(hint)}, not {value!r}"
    return None


_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
          dict: "a mapping", list: "a list", type(None): "nothing (null)"}


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arm) for arm in typing.get_args(hint))
    if origin is not None:
        hint = origin
    if hint is type(None) or hint is None:
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    target = origin or hint
    return _NAMES.get(target, getattr(target, "__name__", str(target)))

