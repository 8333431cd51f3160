"""One data directory, one owner: what a config declares belongs to the server that
declared it. Real `batchery serve` processes on one SQLite data directory and on one
PostgreSQL database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, start_server

pytestmark = pytest.mark.slow

CHAT = """
deployments:
  - name: chat
    backend: echo
    options: {latency_ms: %s}
"""
OTHER = """
deployments:
  - name: other
    backend: echo
"""
JOBS = """
endpoints:
  - name: scoring
    deployments:
      - name: v1
        backend: echo
        options: {dimensions: %s}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    """`batchery serve ARGS` that is expected to stop by itself (refused)."""
    return subprocess.run([sys.executable, "-m", "batchery", "serve", "--port", str(free_port()),
                           "--workers", "0", *args],
                          capture_output=True, text=True, timeout=120)


def models(base_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(base_url + "/v1/models", timeout=30).json()["data"]}


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def test_a_second_server_on_one_sqlite_data_dir_keeps_off_what_the_first_declared(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    a_config = write(tmp_path / "a.yaml", CHAT % 0 + JOBS % 8)
    b_config = write(tmp_path / "b.yaml", CHAT % 5 + JOBS % 16)
    first = start_server(tmp_path, "--config", str(a_config), "--workers", "0",
                         "--data-dir", str(data), name="a")
    try:
        # Declared differently while the owner runs: refused, one line per conflict.
        done = serve_once("--config", str(b_config), "--data-dir", str(data))
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        lines = error_lines(done)
        assert len(lines) == 2, done.stderr
        assert any("deployment 'chat'" in line for line in lines)
        assert any("endpoint 'scoring'" in line for line in lines)
        assert all(str(a_config) in line and "--take-over" in line for line in lines)
        assert models(first.base_url) >= {"chat"}

        # Other names, or the same names declared the same way, start beside it; the
        # first server's declarations stay.
        c_config = write(tmp_path / "c.yaml", CHAT % 0 + OTHER.replace("deployments:\n", ""))
        second = start_server(tmp_path, "--config", str(c_config), "--workers", "0",
                              "--data-dir", str(data), name="c")
        try:
            assert models(second.base_url) >= {"chat", "other", "scoring"}
            assert models(first.base_url) >= {"chat", "other", "scoring"}
        finally:
            second.stop()

        # A restart of the first server, with its config edited, is never refused, and
        # what it no longer declares goes.
        first.stop()
        write(a_config, CHAT % 1)
        first = start_server(tmp_path, "--config", str(a_config), "--workers", "0",
                             "--data-dir", str(data), name="a2")
        assert "scoring" not in models(first.base_url)
        assert {"chat", "other"} <= models(first.base_url)

        # --take-over takes what a running server declared, and says so.
        taker = start_server(tmp_path, "--config", str(b_config), "--workers", "0",
                             "--take-over", "--data-dir", str(data), name="b")
        try:
            assert "taking over deployment 'chat'" in taker.log()
        finally:
            taker.stop()
    finally:
        first.stop()


def test_what_a_stopped_server_declared_is_taken_over_without_asking(tmp_path: Path) -> None:
    data = tmp_path / "data"
    a_config = write(tmp_path / "a.yaml", CHAT % 0)
    b_config = write(tmp_path / "b.yaml", CHAT % 5)
    first = start_server(tmp_path, "--config", str(a_config), "--workers", "0",
                         "--data-dir", str(data), name="a")
    first.stop()
    second = start_server(tmp_path, "--config", str(b_config), "--workers", "0",
                          "--data-dir", str(data), name="b")
    try:
        log = second.log()
        assert "taking over deployment 'chat'" in log and "which stopped" in log, log
        # Now the first server is the one refused, while the second runs.
        done = serve_once("--config", str(a_config), "--data-dir", str(data))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        (line,) = error_lines(done)
        assert "deployment 'chat'" in line and str(b_config) in line
    finally:
        second.stop()


def test_two_hosts_on_one_postgresql_database(tmp_path: Path, pg_url: str) -> None:
    """Two servers with data directories of their own (two hosts) on one database."""
    same = write(tmp_path / "same.yaml", CHAT % 0)
    # Trust auth takes any password: the banner shows the real stores, the password hidden.
    with_password = pg_url.replace("://postgres@", "://postgres:s3cr3t-pw@", 1)
    assert with_password != pg_url
    files = tmp_path / "shared-files"
    first = start_server(tmp_path, "--config", str(same), "--workers", "0",
                         "--database-url", with_password, "--files-url", str(files), name="h1")
    try:
        banner = next(line for line in first.log().splitlines() if "database:" in line)
        assert f"database: {pg_url.replace('://postgres@', '://postgres:***@')};" in banner
        assert f"files: {files}" in banner and "s3cr3t-pw" not in first.log()
        copy = write(tmp_path / "copy.yaml", CHAT % 0)  # the same config, elsewhere
        second = start_server(tmp_path, "--config", str(copy), "--workers", "0",
                              "--database-url", pg_url, name="h2")
        second.stop()
        other = write(tmp_path / "other.yaml", CHAT % 7)
        done = serve_once("--config", str(other), "--database-url", pg_url,
                          "--data-dir", str(tmp_path / "h3-data"))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        (line,) = error_lines(done)
        assert "deployment 'chat'" in line and str(same) in line
        assert "chat" in models(first.base_url)
    finally:
        first.stop()


def test_a_server_not_seen_for_a_minute_is_taken_over_and_one_seen_is_not(
        tmp_path: Path) -> None:
    """The heartbeat's rule, on the store's clock (`now`): no waiting a minute here."""
    from batchery.model.deployments import Deployment
    from batchery.model.owners import STALE_AFTER_S, OwnershipConflict, ServerIdentity
    from batchery.stores.sql.store import SqlStore

    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'batchery.db'}")
    try:
        a = ServerIdentity(id="a", host="host-a", config="/etc/a.yaml", pid=1)
        b = ServerIdentity(id="b", host="host-b", config="/etc/b.yaml", pid=2)
        store.publish_config([Deployment(name="chat", backend="echo")], [], a, now=1000.0)
        store.heartbeat_server("a", now=1000.0 + STALE_AFTER_S / 2)
        differs = [Deployment(name="chat", backend="echo", options={"latency_ms": 5})]
        with pytest.raises(OwnershipConflict) as refused:
            store.publish_config(differs, [], b, now=1000.0 + STALE_AFTER_S)
        (line,) = refused.value.lines
        assert "host-a" in line and "/etc/a.yaml" in line and "--take-over" in line
        notes = store.publish_config(differs, [], b, now=1000.0 + 2 * STALE_AFTER_S)
        assert notes == [f"taking over deployment 'chat' from the server on host-a (config "
                         f"/etc/a.yaml, pid 1), not seen for {1.5 * STALE_AFTER_S:.0f} s"]
        (chat,) = [d for d in store.list_deployments() if d.name == "chat"]
        assert chat.options == {"latency_ms": 5}
    finally:
        store.close()
