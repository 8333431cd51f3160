"""Shared fixtures: clean environment, databases (SQLite and real PostgreSQL), servers."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

#: The PostgreSQL server tests use; CI and dev machines have one with trust auth.
PG_ADMIN_URL = os.environ.get("BATCHERY_TEST_PG_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
#: In CI (`CI=true`, as CI services set it) every optional part a suite needs is installed
#: (`scripts/install dev`): a test that would skip for want of one fails instead.
def is_ci(value: str) -> bool:
    """Whether the `CI` variable's value says this is a CI run."""
    return value.strip().lower() not in ("", "0", "false", "no")


CI = is_ci(os.environ.get("CI", ""))

#: Modules whose absence stays a skip in CI too, with the reason: CI machines cannot have
#: them. Every other "could not import" skip (`pytest.importorskip`) fails a CI run.
CI_MAY_LACK = {
    "vllm": "vLLM needs a CUDA GPU, which CI machines lack (tests/integration/test_vllm.py)",
}


def _import_skip(longrepr: object) -> str | None:
    """The module a skip's reason says could not be imported, if it is such a skip."""
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
    found = re.search(r"could not import '([^']+)'", str(reason))
    return found.group(1) if found else None


def _fail_import_skip_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    module = _import_skip(report.longrepr)
    if module is None or module.split(".")[0] in CI_MAY_LACK:
        return
    report.outcome = "failed"
    report.longrepr = (f"{module} is missing, and CI must run this test: `scripts/install dev` "
                       f"installs it (a skip for a missing module fails in CI; see CI_MAY_LACK "
                       f"in tests/conftest.py)")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
        collector: pytest.Collector) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    _fail_import_skip_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item,
        call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _fail_import_skip_in_ci(report)
    return report


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BATCHERY_* or OPENAI_* setting from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("BATCHERY_", "OPENAI_")) and name != "BATCHERY_TEST_PG_URL":
            monkeypatch.delenv(name, raising=False)
    # The servers and workers tests start load models on first use, not at start: with the
    # model extras installed, a warm pool would load torch and two models into every worker
    # of every test server. The warm pool's own tests ask for it (`--preload`).
    monkeypatch.setenv("BATCHERY_PRELOAD", "false")


def _pg_available() -> bool:
    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    if not _pg_available():
        if CI:
            pytest.fail(f"PostgreSQL is required in CI but {PG_ADMIN_URL} is unreachable")
        pytest.skip("PostgreSQL is not reachable")
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"batchery_test_{secrets.token_hex(6)}"
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'batchery.db'}"


def free_port() -> int:
    """A port that was free a moment ago: only for an address nothing should answer on, or
    for a program that cannot bind port 0 and say which port it got. Anything that can is
    started on port 0 and asked (`start_server`, `bound_port`): a port picked here may be
    taken by another process before the program binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: How uvicorn (so `batchery serve`) says where it listens, the port it bound included.
UVICORN_LISTENING = re.compile(rb"Uvicorn running on https?://[^\s:]+:(\d+)")


def bound_port(log_path: Path, process: subprocess.Popen[bytes], pattern: re.Pattern[bytes],
               timeout: float = 60.0) -> int:
    """The port a program started on port 0 says, in its log, that it bound."""
    deadline = time.monotonic() + timeout
    while True:
        found = pattern.search(log_path.read_bytes()) if log_path.exists() else None
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"exited before it listened:\n"
                               f"{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"did not say where it listens within {timeout:.0f} s:\n"
                               f"{log_path.read_text(errors='replace')}")
        time.sleep(0.05)


@dataclass
class Server:
    """A `batchery serve` subprocess."""

    base_url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                 name: str = "server", base_env: dict[str, str] | None = None) -> Server:
    """`batchery serve` on port 0 (the port the system gives it, which it reports), ready to
    answer. Its environment is `base_env` (this process's by default) with `env` on top."""
    data_dir = tmp_path / f"{name}-data"
    log_path = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "batchery", "serve", "--port", "0",
           "--data-dir", str(data_dir), *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env={**(os.environ if base_env is None else base_env),
                                        **(env or {})})
    try:
        port = bound_port(log_path, process, UVICORN_LISTENING)
    except RuntimeError as exc:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise RuntimeError(f"server: {exc}") from None
    server = Server(base_url=f"http://127.0.0.1:{port}", data_dir=data_dir, process=process,
                    log_path=log_path, args=list(args))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not start:\n{server.log()}")


def start_provider_pair(tmp: Path, provider_config: str,
                        ours_config: Callable[[Server], str]) -> tuple[Server, Server, str]:
    """A Batchery acting as a hosted provider (with a key of its own), and ours, whose
    config (`ours_config(provider)`) reads that key from `PROVIDER_KEY`: the remote
    connectors' suites run against this pair."""
    from batchery.security.auth import add_key

    keys = tmp / "keys.yaml"
    _, key = add_key(keys, "provider-side")
    (tmp / "provider.yaml").write_text(provider_config)
    provider = start_server(tmp, "--keys-file", str(keys), "--config", str(tmp / "provider.yaml"),
                            "--workers", "2", "--chunk-size", "10", name="provider")
    (tmp / "ours.yaml").write_text(ours_config(provider))
    ours = start_server(tmp, "--config", str(tmp / "ours.yaml"), "--workers", "1",
                        env={"PROVIDER_KEY": key}, name="ours")
    return ours, provider, key


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Server] = []

    def factory(*args: str, env: dict[str, str] | None = None, name: str = "server") -> Server:
        server = start_server(tmp_path, *args, env=env, name=f"{name}{len(started)}")
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
