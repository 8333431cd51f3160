"""The `batchery` command line, run as a user would: real processes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import Server
from tests.helpers import chat_file, chat_line, jsonl

ROOT = Path(__file__).resolve().parents[2]


def batchery(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchery", *args], capture_output=True,
                          text=True, timeout=timeout)


def custom_ids(path: Path) -> list[str]:
    return [orjson.loads(x)["custom_id"] for x in path.read_bytes().splitlines()]


def test_run_writes_output_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    result = batchery("run", str(ROOT / "examples" / "requests.jsonl"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(custom_ids(out)) == ["request-1", "request-2"]
    errors = tmp_path / "results.jsonl.errors.jsonl"
    assert custom_ids(errors) == ["request-3"]
    assert "1 line(s) failed" in result.stderr
    assert not (tmp_path / ".results.jsonl.batchery").exists()  # state cleaned up


def test_run_reports_invalid_lines(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([chat_line("a"), "{broken", chat_line("a")]))
    result = batchery("run", str(source), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 1
    assert "line 2: invalid_json_line" in result.stderr
    assert "line 3: duplicate_custom_id" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_run_resumes_after_being_killed(tmp_path: Path) -> None:
    config = tmp_path / "slow.yaml"
    config.write_text("deployments:\n  - name: echo\n    backend: echo\n"
                      "    options: {latency_ms: 10}\n")
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_file(600))
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "batchery", "run", str(source), "-o", str(out),
            "--config", str(config), "--chunk-size", "50"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / ".out.jsonl.batchery" / "batchery.db"
    deadline = time.monotonic() + 60
    while _done_chunks(db) < 3:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = _done_chunks(db)
    assert 3 <= done_before < 12 and not out.exists()

    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr
    ids = custom_ids(out)
    assert len(ids) == 600 and set(ids) == {f"req-{i}" for i in range(600)}


def _done_chunks(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM chunks WHERE state = 'done'")
                       .fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_client_commands(tmp_path: Path, server_factory: Any) -> None:
    server: Server = server_factory("--workers", "1")
    common = ["--server", server.base_url, "--api-key", "k"]
    uploaded = batchery("files", "upload", str(ROOT / "examples" / "requests.jsonl"), *common)
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = orjson.loads(uploaded.stdout)["id"]
    created = batchery("batches", "create", "-i", file_id, "-m", "team=nlp", *common)
    assert created.returncode == 0, created.stderr
    batch = orjson.loads(created.stdout)
    assert batch["metadata"] == {"team": "nlp"}
    waited = batchery("batches", "wait", batch["id"], "--interval", "0.2", *common)
    assert waited.returncode == 0, waited.stderr
    final = orjson.loads(waited.stdout)
    assert final["status"] == "completed"
    assert final["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert "completed" in waited.stderr  # the progress bar's status column

    target = tmp_path / "out.jsonl"
    downloaded = batchery("files", "download", final["output_file_id"], "-o", str(target),
                          *common)
    assert downloaded.returncode == 0 and sorted(custom_ids(target)) == ["request-1",
                                                                          "request-2"]
    listed = batchery("batches", "list", *common)
    assert batch["id"][:8] in listed.stdout and batch["id"][-6:] in listed.stdout
    assert " completed " in listed.stdout
    assert batchery("files", "list", *common).returncode == 0
    refused = batchery("batches", "cancel", batch["id"], *common)
    assert refused.returncode == 1
    assert "Cannot cancel a batch with status 'completed'" in refused.stderr
    missing = batchery("batches", "get", "batch_nope", *common)
    assert missing.returncode == 1 and "error 404" in missing.stderr
    deleted = batchery("files", "delete", file_id, *common)
    assert deleted.returncode == 0 and orjson.loads(deleted.stdout)["deleted"] is True


def test_unreachable_server_is_a_clear_error() -> None:
    result = batchery("batches", "list", "--server", "http://127.0.0.1:9")
    assert result.returncode == 1 and "cannot reach" in result.stderr


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("deployments:\n  - name: x\n    backend: echo\n    options: [1]\n")
    result = batchery("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                      "--port", "9")
    assert result.returncode == 2
    assert "deployments[0].options: expected a mapping" in result.stderr
