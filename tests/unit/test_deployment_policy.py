"""The operator's deployment policy: code, python_path, environment variables, upstream
hosts, worker caps, and option types."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from batchery import backends
from batchery.cli import server as server_cli
from batchery.model import deployments
from batchery.model.deployments import API, CONFIG, Deployment, WorkerPoolSpec
from batchery.model.exceptions import ConfigError, Forbidden, InvalidRequest
from batchery.queue.pool import Supervisor
from batchery.security import deployment_policy
from batchery.security.trust import Limits, TrustPolicy

SHARED = TrustPolicy(open=False, allowed_env=frozenset({"OPENAI_API_KEY"}),
                     upstream_hosts=("api.openai.com", "127.0.0.1:9000", "*.example.com",
                                     "intranet.example.com"))


def connector(**options: Any) -> Deployment:
    return Deployment(name="ep/v1", backend="openai", endpoint="ep",
                      options={"base_url": "https://api.openai.com/v1", **options})


def check(deployment: Deployment, policy: TrustPolicy, *, via_api: bool) -> None:
    """The policy, told what the backend registry says of the deployment's backend (as
    the jobs service and the runtime tell it)."""
    deployment_policy.check(deployment, policy, via_api=via_api,
                            runs_user_code=backends.runs_user_code(deployment.backend))


def check_api(deployment: Deployment, policy: TrustPolicy = SHARED) -> None:
    check(deployment, policy, via_api=True)


def fake_dns(monkeypatch: pytest.MonkeyPatch, names: dict[str, str]) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# -- upstream hosts ------------------------------------------------------------------------


def test_listed_hosts_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"eu.example.com": "93.184.216.34"})
    check_api(connector())
    check_api(connector(base_url="http://127.0.0.1:9000/v1"))  # listed exactly, with port
    check_api(connector(base_url="https://eu.example.com/v1"))  # the wildcard, public


def test_unlisted_hosts_are_refused_naming_option_host_and_setting() -> None:
    with pytest.raises(Forbidden) as refused:
        check_api(connector(base_url="https://evil.test/v1"))
    message = refused.value.message
    assert "options.base_url" in message and "'evil.test'" in message
    assert "security.upstream_hosts" in message
    # A listed host on another port, the bare domain of a wildcard, a trick with userinfo.
    for url in ("http://127.0.0.1:9001/v1", "https://example.com/v1",
                "https://api.openai.com@evil.test/v1"):
        with pytest.raises(Forbidden):
            check_api(connector(base_url=url))


def test_every_url_in_the_options_is_checked_recursively() -> None:
    http = Deployment(name="h", backend="http", options={
        "url": "https://api.openai.com/x", "headers": {"X-Next": "wss://evil.test/socket"}})
    with pytest.raises(Forbidden, match=r"options\.headers\.X-Next.*evil\.test"):
        check_api(http)


def test_private_addresses_need_an_exact_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    wide = dataclasses.replace(SHARED, upstream_hosts=("*.example.com", "*.internal"))
    # An IP literal is not matched by any wildcard; listed exactly it is allowed.
    with pytest.raises(Forbidden):
        check_api(connector(base_url="http://10.0.0.5/v1"), wide)
    check_api(connector(base_url="http://10.0.0.5/v1"),
              dataclasses.replace(wide, upstream_hosts=("10.0.0.5",)))
    # A name under a wildcard that resolves inside the network is refused...
    fake_dns(monkeypatch, {"intranet.example.com": "10.1.2.3", "db.example.com": "127.0.0.1",
                           "meta.example.com": "169.254.169.254"})
    for host in ("intranet.example.com", "db.example.com", "meta.example.com"):
        with pytest.raises(Forbidden, match="inside the network"):
            check_api(connector(base_url=f"https://{host}/v1"), wide)
    # ...unless an entry names it exactly.
    check_api(connector(base_url="https://intranet.example.com/v1"))


def test_urls_must_name_their_host_plainly() -> None:
    with pytest.raises(InvalidRequest, match=r"options\.url"):
        check_api(Deployment(name="h", backend="http", options={"url": "${body.target}"}))
    with pytest.raises(InvalidRequest, match="no placeholder"):
        check_api(Deployment(name="h", backend="http",
                             options={"url": "https://${body.x}.example.com/"}))


def test_open_mode_and_the_config_file_reach_any_host() -> None:
    anywhere = connector(base_url="http://10.9.9.9:1234/v1")
    check_api(anywhere, TrustPolicy())  # open mode
    check(anywhere, SHARED, via_api=False)  # the operator's own file


# -- environment variables -----------------------------------------------------------------


def test_env_names_must_be_allowed_over_rest() -> None:
    check_api(connector(api_key_env="OPENAI_API_KEY"))
    with pytest.raises(Forbidden, match=r"options\.api_key_env.*'AWS_SECRET'.*allowed_env"):
        check_api(connector(api_key_env="AWS_SECRET"))
    http = Deployment(name="h", backend="http", options={
        "url": "https://api.openai.com/x", "credential": {"token_env": "HOME_TOKEN"}})
    with pytest.raises(Forbidden, match=r"options\.credential\.token_env"):
        check_api(http)
    code = Deployment(name="p", backend="python", options={
        "predictor": "m:P", "python_path": [], "env": {"LD_PRELOAD": "/x.so"}})
    with pytest.raises(Forbidden, match=r"options\.env\.LD_PRELOAD"):
        check_api(code, dataclasses.replace(SHARED, allow_code_deployments=True))
    check_api(connector(api_key_env="ANYTHING"), TrustPolicy())  # open mode


def test_batchery_variables_are_refused_everywhere() -> None:
    secret = connector(api_key_env="BATCHERY_SECRET_KEY")
    for policy in (SHARED, TrustPolicy(), dataclasses.replace(
            SHARED, allowed_env=frozenset({"BATCHERY_SECRET_KEY"}))):
        with pytest.raises(Forbidden, match="BATCHERY_SECRET_KEY"):
            check_api(secret, policy)
    with pytest.raises(ConfigError, match=r"deployment 'ep/v1': options\.api_key_env.*reserved"):
        check(secret, TrustPolicy(), via_api=False)
    with pytest.raises(ConfigError, match=r"options\.env\.batchery_data_dir"):
        check(Deployment(name="p", backend="python", options={
            "predictor": "m:P", "env": {"batchery_data_dir": "/tmp"}}), SHARED, via_api=False)


# -- code and python_path ------------------------------------------------------------------


def test_code_deployments_over_rest_need_the_operators_consent() -> None:
    code = Deployment(name="p", backend="python", options={"predictor": "m:P"})
    with pytest.raises(Forbidden, match=r"security\.allow_code_deployments"):
        check_api(code)
    check_api(code, dataclasses.replace(SHARED, allow_code_deployments=True))
    check_api(code, TrustPolicy())  # open mode
    check(code, SHARED, via_api=False)  # the config file
    post = Deployment(name="h", backend="http", options={
        "url": "https://api.openai.com/x", "response": {"post_process": "os:system"}})
    with pytest.raises(Forbidden, match=r"options\.response\.post_process"):
        check_api(post)


def test_code_consent_follows_what_the_backend_declares_not_its_name() -> None:
    """The policy names no backend: it asks whether this one runs user code."""
    some = Deployment(name="p", backend="anything", options={})
    with pytest.raises(Forbidden, match=r"runs user code \(backend 'anything'\)"):
        deployment_policy.check(some, SHARED, via_api=True, runs_user_code=True)
    deployment_policy.check(some, SHARED, via_api=True, runs_user_code=False)


def test_the_registry_reads_what_each_backend_declares() -> None:
    assert backends.runs_user_code("python") and backends.serves_jobs("python")
    for name in ("echo", "openai", "http", "openai_batch", "no-such-backend"):
        assert not backends.runs_user_code(name) and not backends.serves_jobs(name)
    assert backends.job_backends() == ["python"]


def test_python_path_may_not_lead_into_protected_paths(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    (tmp_path / "code").mkdir()
    (tmp_path / "sneaky").symlink_to(data / "files")
    policy = TrustPolicy(protected_paths=(str(data),))

    def code(path: str) -> Deployment:
        return Deployment(name="p", backend="python",
                          options={"predictor": "m:P", "python_path": [path]})

    check(code(str(tmp_path / "code")), policy, via_api=True)
    through_dots = str(tmp_path / "code" / ".." / "data" / "files")
    for path in (through_dots, str(tmp_path / "sneaky"), str(data)):
        with pytest.raises(Forbidden, match=r"options\.python_path\[0\]"):
            check(code(path), policy, via_api=True)
        with pytest.raises(ConfigError, match=r"python_path\[0\].*data"):
            check(code(path), policy, via_api=False)
    # A sibling whose name merely starts with the protected one is not inside it.
    (tmp_path / "data-other").mkdir()
    check(code(str(tmp_path / "data-other")), policy, via_api=True)


def test_config_python_path_is_checked_after_resolution(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    parsed = deployments.parse({"deployments": [{
        "name": "p", "backend": "python",
        "options": {"predictor": "m:P", "python_path": ["sub/../data"]}}]},
        base_dir=tmp_path, check_options=backends.check_options).deployments[0]
    assert parsed.options["python_path"] == [str(data.resolve())]
    with pytest.raises(ConfigError, match="python_path"):
        check(parsed, TrustPolicy(protected_paths=(str(data),)),
                                via_api=False)


# -- workers and option types --------------------------------------------------------------


def test_workers_max_is_capped() -> None:
    policy = dataclasses.replace(SHARED, limits=Limits(max_workers_per_deployment=4))
    big = dataclasses.replace(connector(), workers=WorkerPoolSpec(min=1, max=5))
    with pytest.raises(InvalidRequest, match=r"workers\.max: 5 .* cap of 4") as refused:
        check_api(big, policy)
    assert refused.value.param == "workers.max"
    with pytest.raises(ConfigError, match=r"workers\.max"):
        check(big, policy, via_api=False)
    check_api(dataclasses.replace(big, workers=WorkerPoolSpec(min=4, max=4)), policy)


def test_options_of_the_wrong_type_are_config_errors_naming_the_option() -> None:
    for backend, options, named in (
            ("openai", {"base_url": 123}, "options.base_url: expected a string, not 123"),
            ("openai", {"base_url": "http://x", "timeout_s": "slow"}, "options.timeout_s"),
            ("openai_batch", {"base_url": ["x"]}, "options.base_url"),
            ("http", {"url": 5}, "options.url"),
            ("echo", {"dimensions": True}, "options.dimensions")):
        with pytest.raises(ConfigError) as wrong:
            backends.check(Deployment(name="d", backend=backend, options=options))
        assert named in str(wrong.value)


@pytest.mark.parametrize("options", [{"latency_ms": -1}, {"latency_ms": float("nan")},
                                     {"failure_rate": 1.5}, {"concurrency": 0}])
def test_echo_refuses_impossible_timings(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(options))):
        backends.check(Deployment(name="e", backend="echo", options=options))


def test_config_file_projects_are_parsed() -> None:
    catalog = deployments.parse({
        "deployments": [{"name": "m", "backend": "echo", "projects": ["a", "b"]},
                        {"name": "all", "backend": "echo"}],
        "endpoints": [{"name": "ep", "projects": ["a"], "deployments": [
            {"name": "v1", "backend": "echo"}]}]})
    by_name = {d.name: d for d in catalog.deployments}
    assert by_name["m"].projects == ("a", "b") and by_name["m"].usable_by("b")
    assert not by_name["m"].usable_by("c") and by_name["all"].usable_by("c")
    assert by_name["ep/v1"].projects == ("a",) and catalog.endpoints[0].usable_by("a")
    assert not catalog.endpoints[0].usable_by("b")
    owned = dataclasses.replace(by_name["all"], project="a")
    assert owned.usable_by("a") and not owned.usable_by("b")
    for bad, where in (({"name": "m", "backend": "echo", "projects": "a"}, "projects"),
                       ({"name": "m", "backend": "echo", "project": "a"}, "project")):
        with pytest.raises(ConfigError, match=rf"deployments\[0\]\.{where}:"):
            deployments.parse({"deployments": [bad]})
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.projects: .* on the endpoint"):
        deployments.parse({"endpoints": [{"name": "ep", "deployments": [
            {"name": "v1", "backend": "echo", "projects": ["a"]}]}]})


def test_protected_paths_compare_real_paths(tmp_path: Path) -> None:
    """The operator's protected path may itself be given through a symlink."""
    real = tmp_path / "real-data"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    policy = TrustPolicy(protected_paths=(str(tmp_path / "link"),))
    with pytest.raises(Forbidden):
        check(Deployment(name="p", backend="python", options={
            "predictor": "m:P", "python_path": [os.fspath(real)]}), policy, via_api=True)


# -- the pools of deployments made over the API --------------------------------------------


class FakeRegistry:
    """What the job pools' plan reads from the store: the deployments, and no job demand."""

    def __init__(self, deployments: list[Deployment]) -> None:
        self.deployments = deployments

    def job_demand(self) -> dict[str, int]:
        return {}

    def list_deployments(self) -> list[Deployment]:
        return list(self.deployments)


def pooled(name: str, source: str, size: int) -> Deployment:
    return Deployment(name=name, backend="python", endpoint=name.split("/")[0], source=source,
                      workers=WorkerPoolSpec(min=size, max=size), options={"predictor": "m:P"})


def test_api_pools_are_capped_and_deleted_deployments_stopped(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    spawned: dict[str, list[subprocess.Popen[bytes]]] = {}

    def spawn(args: Sequence[str]) -> subprocess.Popen[bytes]:
        name = args[args.index("--deployment") + 1]
        # The stubborn ones ignore SIGTERM, as a worker stuck in a predictor might.
        script = "trap '' TERM; exec sleep 60" if "stubborn" in name else "exec sleep 60"
        proc = subprocess.Popen(["sh", "-c", script])
        spawned.setdefault(name, []).append(proc)
        return proc

    registry = FakeRegistry([pooled("one/v1", API, 3), pooled("stubborn/v1", API, 3),
                             pooled("conf/v1", CONFIG, 2)])
    policy = TrustPolicy(open=False, limits=Limits(max_api_pool_processes=4))
    pools = Supervisor(spawn, lambda: server_cli.job_pools(cast(Any, registry)),
                       cap=policy.limits.max_api_pool_processes, retire_grace_s=0.5)
    try:
        pools.scale()
        pools.scale()
        counts = {name: len(procs) for name, procs in spawned.items()}
        # The API's pools share 4 processes; the config file's pool is not counted.
        assert counts == {"one/v1": 3, "stubborn/v1": 1, "conf/v1": 2}
        assert sum("max_api_pool_processes" in r.message for r in caplog.records) == 1

        registry.deployments = registry.deployments[1:]  # `one` deleted
        pools.scale()
        assert len(spawned["stubborn/v1"]) == 3  # the room it left is used
        for proc in spawned["one/v1"]:
            proc.wait(30)  # SIGTERM ended it at once

        for proc in spawned["stubborn/v1"]:
            ignoring_term(proc)
        registry.deployments = registry.deployments[1:]  # `stubborn` deleted
        pools.scale()
        time.sleep(0.7)
        pools.scale()  # past the grace: SIGKILL, and reaped
        for proc in spawned["one/v1"] + spawned["stubborn/v1"]:
            assert proc.returncode is not None and not Path(f"/proc/{proc.pid}").exists()
        assert {p.returncode for p in spawned["stubborn/v1"]} == {-signal.SIGKILL}
        assert all(p.poll() is None for p in spawned["conf/v1"])
    finally:
        pools.stop(grace_s=5)
    assert all(p.returncode is not None for procs in spawned.values() for p in procs)


def ignoring_term(proc: subprocess.Popen[bytes]) -> None:
    """Wait until the shell has set SIGTERM aside and become `sleep`."""
    deadline = time.monotonic() + 30
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep"):
        assert time.monotonic() < deadline, "the stubborn worker never started"
        time.sleep(0.01)
