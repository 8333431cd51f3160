from __future__ import annotations

from pathlib import Path

import pytest

from batchery.backends import check_options, create
from batchery.model import deployments
from batchery.model.batches import window_seconds
from batchery.model.exceptions import ConfigError, Unauthorized
from batchery.model.retry import RetryPolicy
from batchery.security import auth


def test_deployments_parse_and_errors_say_where(tmp_path: Path) -> None:
    good = deployments.parse({"deployments": [{"name": "a", "backend": "echo",
                                                "options": {"latency_ms": 1}}]})
    assert good.deployments == [
        deployments.Deployment(name="a", backend="echo", options={"latency_ms": 1})]
    with pytest.raises(ConfigError, match=r"deployments\[1\].name: 'a' is declared twice"):
        deployments.parse({"deployments": [{"name": "a", "backend": "echo"}] * 2})
    with pytest.raises(ConfigError, match="a 'deployments' or an 'endpoints' list"):
        deployments.parse([])
    broken = tmp_path / "d.yaml"
    broken.write_text("deployments: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        deployments.load(broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        deployments.load(tmp_path / "missing.yaml")


def test_each_backend_checks_its_options_as_the_config_is_read(tmp_path: Path) -> None:
    python = {"deployments": [{"name": "p", "backend": "python",
                               "options": {"predictor": "m:P", "python_path": ["code"]}}]}
    parsed = deployments.parse(python, base_dir=tmp_path, check_options=check_options)
    assert parsed.deployments[0].options["python_path"] == [str((tmp_path / "code").resolve())]
    bad = {"endpoints": [{"name": "ep", "deployments": [
        {"name": "v1", "backend": "python", "options": {"predictor": "no-class"}}]}]}
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.deployments\[0\]\.options\."
                                          r"predictor: expected 'module.path:ClassName'"):
        deployments.parse(bad, check_options=check_options)
    # The model knows no backend: without the registry's check, options stay as given.
    assert deployments.parse(python).deployments[0].options["python_path"] == ["code"]


def test_backend_registry_errors() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'magic'"):
        create(deployments.Deployment(name="x", backend="magic"))
    with pytest.raises(ConfigError, match=r"deployment 'x': options.nope: the 'echo' backend "
                                          r"has no such option \(valid: latency_ms, "):
        create(deployments.Deployment(name="x", backend="echo", options={"nope": 1}))


def test_openai_backend_needs_its_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPSTREAM_KEY", raising=False)
    with pytest.raises(ConfigError, match="UPSTREAM_KEY"):
        create(deployments.Deployment(name="x", backend="openai", options={
            "base_url": "http://127.0.0.1:1/v1", "api_key_env": "UPSTREAM_KEY"}))


def test_keys_are_hashed_and_map_to_projects(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    _, a = auth.add_key(keys, "team-a")
    ring = auth.KeyRing.load(keys)
    assert ring.project_for(a) == "team-a"
    assert a not in keys.read_text() and auth.hash_key(a) in keys.read_text()
    with pytest.raises(Unauthorized):
        ring.project_for("sk-other")
    with pytest.raises(Unauthorized):
        ring.project_for(None)
    assert auth.KeyRing.load(None).project_for(None) == auth.DEFAULT_PROJECT


def test_completion_windows() -> None:
    assert window_seconds("24h") == 86400
    assert window_seconds("90s") == 90
    assert window_seconds("7d") == 7 * 86400
    for bad in ("", "24", "0h", "31d", "1w", "-1h"):
        assert window_seconds(bad) is None


def test_retry_policy() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=5.0)
    assert policy.should_retry(1) and policy.should_retry(2) and not policy.should_retry(3)
    assert 0.5 <= policy.delay(1) <= 1.0 and 1.0 <= policy.delay(2) <= 2.0
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=60.0) == 5.0
