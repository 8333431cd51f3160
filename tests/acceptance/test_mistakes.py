"""Mistakes a user can make with `batchery serve`, `worker`, `run` and the client commands,
run as real processes: each ends with a sentence that names the culprit and what is valid,
never a traceback; usage and configuration mistakes exit with code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.acceptance.jobs_support import PREDICTORS
from tests.conftest import Server, free_port, start_server
from tests.helpers import chat_line, jsonl

pytestmark = pytest.mark.slow

#: Exit codes: 2 for usage and configuration mistakes; ANY_FAILURE for what a server
#: refused (a 4xx answer) or a run whose input failed.
USAGE, ANY_FAILURE = 2, -1


def batchery(*args: str, env: dict[str, str] | None = None,
             timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchery", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "80", **(env or {})})


def check(done: subprocess.CompletedProcess[str], code: int, *named: str) -> None:
    """Failed with `code` (any non-zero one for ANY_FAILURE), no traceback, and every
    string of `named` in what it printed."""
    said = done.stderr + done.stdout
    if code == ANY_FAILURE:
        assert done.returncode != 0, said
    else:
        assert done.returncode == code, said
    assert "Traceback" not in said, said
    for text in named:
        assert text in said, f"{text!r} not in:\n{said}"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- mistakes that stop `serve`, `worker` or `run` before anything starts ------------------

@dataclass(frozen=True)
class Mistake:
    """A command line (built in a fresh directory) and what its error must name."""

    id: str
    argv: Callable[[Path], list[str]]
    code: int
    named: tuple[str, ...]
    env: dict[str, str] | None = None


def serve(*args: str) -> list[str]:
    return ["serve", "--port", "0", "--workers", "0", *args]


def serve_config(text: str, *args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: serve("--config", write(tmp / "config.yaml", text),
                             "--data-dir", str(tmp / "data"), *args)


ECHO = "deployments:\n  - name: chat\n    backend: echo\n"

MISTAKES = [
    Mistake("config-not-yaml", serve_config("deployments: [\n  - name: a\n"), USAGE,
            ("config.yaml", "not valid YAML")),
    Mistake("config-not-a-mapping", serve_config("- just\n- a list\n"), USAGE,
            ("config.yaml", "'deployments'", "'endpoints'")),
    Mistake("misspelt-deployment-key", serve_config(ECHO + "    optoins: {}\n"), USAGE,
            ("config.yaml", "deployments[0]", "'optoins'", "options")),
    Mistake("unknown-backend", serve_config(
        "deployments:\n  - name: chat\n    backend: ecko\n"), USAGE,
        ("deployment 'chat'", "'ecko'", "echo", "openai")),
    Mistake("unknown-echo-option", serve_config(ECHO + "    options: {latency: 5}\n"), USAGE,
            ("config.yaml", "deployment 'chat'", "options.latency", "latency_ms",
             "failure_rate")),
    Mistake("unknown-openai-option", serve_config(
        "deployments:\n  - name: up\n    backend: openai\n"
        "    options: {base_url: 'http://127.0.0.1:9', modle: x}\n"), USAGE,
        ("deployment 'up'", "options.modle", "'openai'", "model", "base_url")),
    Mistake("option-of-the-wrong-type", serve_config(
        ECHO + "    options: {latency_ms: fast}\n"), USAGE,
        ("deployment 'chat'", "options.latency_ms", "a number", "'fast'")),
    Mistake("unset-api-key-env", serve_config(
        "deployments:\n  - name: up\n    backend: openai\n"
        "    options: {base_url: 'http://127.0.0.1:9', api_key_env: NO_SUCH_KEY_VAR}\n"),
        USAGE, ("deployment 'up'", "api_key_env", "NO_SUCH_KEY_VAR", "is not set")),
    Mistake("deployment-declared-twice", serve_config(ECHO + ECHO.split("\n", 1)[1]), USAGE,
            ("deployments[1].name", "'chat'", "declared twice")),
    Mistake("endpoint-default-not-a-member", serve_config(
        "endpoints:\n  - name: scoring\n    default_deployment: v2\n    deployments:\n"
        "      - name: v1\n        backend: echo\n"), USAGE,
        ("endpoints[0].default_deployment", "'v2'", "v1")),
    Mistake("pool-min-over-max", serve_config(ECHO + "    workers: {min: 3, max: 1}\n"),
            USAGE, ("deployments[0].workers", "min <= max")),
    Mistake("config-file-missing", lambda tmp: serve("--config", str(tmp / "nope.yaml")),
            USAGE, ("--config", "nope.yaml")),
    Mistake("keys-file-missing", lambda tmp: serve(
        "--keys-file", str(tmp / "keys.yaml"), "--data-dir", str(tmp / "data")), USAGE,
        ("keys.yaml", "does not exist", "batchery keys create")),
    Mistake("keys-file-broken", lambda tmp: serve(
        "--keys-file", write(tmp / "keys.yaml", "keys:\n  - {project: p, sha256: abc}\n"),
        "--data-dir", str(tmp / "data")), USAGE,
        ("keys.yaml", "keys[0]", "sha256", "64 hexadecimal digits")),
    Mistake("database-url-not-a-database", lambda tmp: serve(
        "--database-url", "postgress://u:pw@localhost/db", "--data-dir", str(tmp / "data")),
        USAGE, ("--database-url postgress://u:***@localhost/db", "postgresql://", "sqlite:///")),
    Mistake("database-unreachable", lambda tmp: serve(
        "--database-url", f"postgresql://u:pw@127.0.0.1:{free_port()}/db",
        "--data-dir", str(tmp / "data")), USAGE,
        ("--database-url postgresql://u:***@127.0.0.1:", "cannot connect")),
    Mistake("worker-database-unreachable", lambda tmp: [
        "worker", "--database-url", f"postgresql://u@127.0.0.1:{free_port()}/db"], USAGE,
        ("--database-url postgresql://u@127.0.0.1:", "cannot connect")),
    Mistake("data-dir-under-a-file", lambda tmp: serve(
        "--data-dir", write(tmp / "plain-file", "") + "/data"), USAGE,
        ("--data-dir", "plain-file")),
    Mistake("port-out-of-range", lambda tmp: serve("--port", "70000"), USAGE,
            ("--port", "65535")),
    Mistake("port-not-a-number", lambda tmp: serve("--port", "eighty"), USAGE,
            ("--port", "integer")),
    Mistake("chunk-size-zero", lambda tmp: serve("--chunk-size", "0"), USAGE,
            ("--chunk-size",)),
    Mistake("open-mode-beyond-loopback", lambda tmp: serve(
        "--host", "0.0.0.0", "--data-dir", str(tmp / "data")), USAGE,
        ("--host 0.0.0.0", "--keys-file", "--insecure")),
    Mistake("unknown-host", lambda tmp: serve(
        "--host", "no-such-host.invalid", "--insecure", "--data-dir", str(tmp / "data")),
        USAGE, ("--host no-such-host.invalid",)),
    Mistake("run-input-missing", lambda tmp: [
        "run", str(tmp / "in.jsonl"), "-o", str(tmp / "out.jsonl")], USAGE, ("in.jsonl",)),
    Mistake("run-bad-config", lambda tmp: [
        "run", write(tmp / "in.jsonl", orjson.dumps(chat_line("a")).decode() + "\n"),
        "-o", str(tmp / "out.jsonl"), "--config",
        write(tmp / "c.yaml", ECHO + "    options: {latency: 5}\n")], USAGE,
        ("deployment 'chat'", "options.latency", "latency_ms")),
    Mistake("run-line-not-json", lambda tmp: [
        "run", write(tmp / "in.jsonl", "{not json\n"), "-o", str(tmp / "out.jsonl")],
        ANY_FAILURE, ("line 1", "invalid_json_line")),
    Mistake("run-unknown-model", lambda tmp: [
        "run", write(tmp / "in.jsonl", jsonl([chat_line("a", model="gpt-nope")]).decode()),
        "-o", str(tmp / "out.jsonl")], ANY_FAILURE, ("line 1", "gpt-nope")),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_a_start_up_mistake_is_one_sentence(mistake: Mistake, tmp_path: Path) -> None:
    done = batchery(*mistake.argv(tmp_path), env=mistake.env)
    check(done, mistake.code, *mistake.named)
    if mistake.code == USAGE:
        errors = [line for line in done.stderr.splitlines() if "rror" in line]
        assert errors, done.stderr


def test_a_port_another_process_holds_is_named(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        done = batchery("serve", "--port", str(port), "--workers", "0",
                        "--data-dir", str(tmp_path / "data"))
    check(done, USAGE, f"--port {port}", "another process", "choose another")
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("error:")


def test_a_long_error_stays_on_one_line_in_a_narrow_terminal(tmp_path: Path) -> None:
    done = batchery(*serve("--keys-file", str(tmp_path / "missing-keys-file.yaml"),
                           "--data-dir", str(tmp_path / "data")))
    check(done, USAGE, "missing-keys-file.yaml")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) > 80, done.stderr


# -- mistakes against a running server: one server for all --------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mistakes")
    config = write(root / "config.yaml", ECHO + (
        "endpoints:\n  - name: nums\n    deployments:\n      - name: v1\n"
        "        backend: python\n        options: {predictor: 'job_predictors:Doubler', "
        f"python_path: ['{PREDICTORS}']}}\n"))
    server = start_server(root, "--config", config, "--workers", "1")
    yield server
    server.stop()


def client(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return batchery(*args, env={"BATCHERY_SERVER": server.base_url})


def created_id(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    found: str = orjson.loads(done.stdout)["id"]
    return found


def wait_for_end(server: Server, batch_id: str) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + 90
    while True:
        done = client(server, "batches", "get", batch_id)
        assert done.returncode == 0, done.stderr
        if orjson.loads(done.stdout)["status"] in ("failed", "completed", "cancelled",
                                                   "expired") or time.monotonic() > deadline:
            return done
        time.sleep(0.3)


def test_an_unreachable_server_is_named() -> None:
    port = free_port()
    done = batchery("files", "list", "--server", f"http://127.0.0.1:{port}")
    check(done, ANY_FAILURE, f"127.0.0.1:{port}")


def test_a_server_url_without_a_scheme_is_named() -> None:
    done = batchery("files", "list", "--server", "localhost-8000")
    check(done, ANY_FAILURE, "localhost-8000", "http://")


def test_a_file_id_that_does_not_exist_is_named(server: Server) -> None:
    check(client(server, "files", "get", "file-nosuchfile"), ANY_FAILURE, "file-nosuchfile")


def test_uploading_a_path_that_does_not_exist_is_a_usage_error(
        server: Server, tmp_path: Path) -> None:
    check(client(server, "files", "upload", str(tmp_path / "gone.jsonl")), USAGE, "gone.jsonl")


def test_a_batch_over_a_file_that_does_not_exist_fails_naming_it(server: Server) -> None:
    batch = created_id(client(server, "batches", "create", "-i", "file-nosuchfile"))
    done = wait_for_end(server, batch)
    batch_json = orjson.loads(done.stdout)
    assert batch_json["status"] == "failed"
    assert "file-nosuchfile" in batch_json["errors"]["data"][0]["message"]


def test_a_batch_naming_an_unknown_model_fails_naming_it(server: Server, tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", jsonl([chat_line("a", model="gpt-nope")]).decode())
    file_id = created_id(client(server, "files", "upload", path))
    done = wait_for_end(server, created_id(client(server, "batches", "create", "-i", file_id)))
    (error,) = orjson.loads(done.stdout)["errors"]["data"]
    assert error["line"] == 1 and "gpt-nope" in error["message"]


def test_a_batch_for_an_unknown_endpoint_lists_the_valid_ones(server: Server) -> None:
    done = client(server, "batches", "create", "-i", "file-x", "--endpoint", "/v1/chat")
    check(done, ANY_FAILURE, "/v1/chat", "/v1/chat/completions", "/v1/embeddings")


def test_items_that_are_not_json_are_a_usage_error(server: Server) -> None:
    check(client(server, "jobs", "submit", "nums", "--items", "[1, 2", "--batch-size", "1"),
          USAGE, "--items", "JSON")


def test_a_batch_size_of_zero_is_a_usage_error(server: Server) -> None:
    check(client(server, "jobs", "submit", "nums", "--items", "[1]", "--batch-size", "0"),
          USAGE, "--batch-size")


def test_a_job_for_an_unknown_endpoint_is_named(server: Server) -> None:
    check(client(server, "jobs", "submit", "numz", "--items", "[1]", "--batch-size", "1"),
          ANY_FAILURE, "'numz'")


def test_a_job_for_an_unknown_deployment_lists_the_endpoints_deployments(server: Server) -> None:
    check(client(server, "jobs", "submit", "nums", "--items", "[1]", "--batch-size", "1",
                 "--deployment", "v9"), ANY_FAILURE, "'v9'", "v1")


def test_a_job_id_that_does_not_exist_is_named(server: Server) -> None:
    check(client(server, "jobs", "get", "job_nosuchjob"), ANY_FAILURE, "job_nosuchjob")
