"""The operator's limits on request bodies, uploads and a project's stored bytes, against a
real `batchery serve`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from batchery.security.auth import add_key
from tests.conftest import Server

MIB = 1 << 20
#: What the client offers in the big-body tests: far over the default JSON limit (16 MiB).
HUGE = 300 * MIB
ServerFactory = Callable[..., Server]


def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident memory so far, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def spaces(total: int, block: int = MIB) -> Iterator[bytes]:
    """`total` bytes of JSON whitespace, a block at a time: never all in memory."""
    chunk = b" " * block
    sent = 0
    while sent < total:
        n = min(block, total - sent)
        yield chunk[:n]
        sent += n


def send_huge(url: str, *, declared: bool) -> httpx.Response:
    headers = {"Authorization": "Bearer sk-any", "Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(HUGE)
    return httpx.post(url, content=spaces(HUGE), headers=headers, timeout=120)


@pytest.fixture
def server(server_factory: ServerFactory) -> Server:
    return server_factory("--workers", "0")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_huge_json_body_gets_413_without_the_server_holding_it(server: Server,
                                                                 declared: bool) -> None:
    before = vm_hwm_kib(server.process.pid)
    openai_style = send_huge(server.v1 + "/batches", declared=declared)
    anthropic_style = send_huge(server.v1 + "/messages/batches", declared=declared)
    grown_mb = (vm_hwm_kib(server.process.pid) - before) / 1024

    assert openai_style.status_code == 413, openai_style.text
    error = openai_style.json()["error"]
    assert error["code"] == "request_too_large"
    assert str(16 * MIB) in error["message"]
    assert anthropic_style.status_code == 413, anthropic_style.text
    body = anthropic_style.json()
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
    assert grown_mb < 100, f"the server's peak memory grew by {grown_mb:.0f} MB"
    # The server is still there, and answers normally.
    assert httpx.get(server.v1 + "/batches").status_code == 200


def limits_config(tmp_path: Path, **security: int) -> Path:
    config = tmp_path / "limits.yaml"
    lines = ["security:"] + [f"  {k}: {v}" for k, v in security.items()]
    config.write_text("\n".join(["deployments:", "  - {name: echo, backend: echo}", *lines])
                      + "\n")
    return config


def test_every_json_route_has_the_limit(server_factory: ServerFactory, tmp_path: Path) -> None:
    config = limits_config(tmp_path, max_json_body_bytes=2048)
    server = server_factory("--workers", "0", "--config", str(config))
    big = b'{"pad": "' + b"x" * 4096 + b'"}'
    small = b'{"pad": "' + b"x" * 1024 + b'"}'
    routes = ["/v1/batches", "/v1/messages/batches", "/api/v1/endpoints",
              "/api/v1/endpoints/echo/jobs"]
    headers = {"Content-Type": "application/json"}
    for route in routes:
        refused = httpx.post(server.base_url + route, content=big, headers=headers)
        assert refused.status_code == 413, (route, refused.text)
        assert "2048" in refused.text
        chunked = httpx.post(server.base_url + route, content=iter([big[:2000], big[2000:]]),
                             headers=headers)
        assert chunked.status_code == 413, (route, chunked.text)
        # Under the limit the body is read, and judged on what it says.
        judged = httpx.post(server.base_url + route, content=small, headers=headers)
        assert judged.status_code == 400, (route, judged.text)


def blobs(server: Server) -> list[Path]:
    root = server.data_dir / "files" / "files"
    return sorted(root.iterdir()) if root.exists() else []


def upload(server: Server, key: str, data: bytes) -> httpx.Response:
    return httpx.post(server.v1 + "/files", headers={"Authorization": f"Bearer {key}"},
                      files={"file": ("in.jsonl", data)}, data={"purpose": "batch"},
                      timeout=60)


def upload_chunked(server: Server, key: str, size: int) -> httpx.Response:
    """A multipart upload without a Content-Length: only counting can stop it."""
    boundary = "batchery-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="in.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n')

    def body() -> Iterator[bytes]:
        yield head.encode()
        yield from spaces(size, 64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    return httpx.post(server.v1 + "/files", content=body(), timeout=60, headers={
        "Authorization": f"Bearer {key}",
        "Content-Type": f"multipart/form-data; boundary={boundary}"})


def file_ids(server: Server, key: str) -> list[str]:
    listing = httpx.get(server.v1 + "/files", headers={"Authorization": f"Bearer {key}"})
    return [f["id"] for f in listing.json()["data"]]


@pytest.mark.parametrize(("size", "chunked"), [(1500, False), (3 * MIB, False), (3 * MIB, True)],
                         ids=["within-slack", "over-declared", "over-chunked"])
def test_an_upload_over_the_limit_leaves_nothing_behind(server_factory: ServerFactory,
                                                        tmp_path: Path, size: int,
                                                        chunked: bool) -> None:
    config = limits_config(tmp_path, max_upload_bytes=1000)
    server = server_factory("--workers", "0", "--config", str(config))
    assert upload(server, "sk-any", b"a" * 1000).status_code == 200
    kept = blobs(server)

    refused = upload_chunked(server, "sk-any", size) if chunked \
        else upload(server, "sk-any", b"b" * size)
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert error["code"] == "request_too_large"
    assert "upload limit of 1000 bytes" in error["message"]
    assert len(file_ids(server, "sk-any")) == 1
    assert blobs(server) == kept


def test_the_project_quota_counts_live_files(server_factory: ServerFactory,
                                             tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    key_a = add_key(keys, "team-a", role="member")[1]
    key_b = add_key(keys, "team-b", role="member")[1]
    config = limits_config(tmp_path, max_upload_bytes=2000, project_quota_bytes=3000)
    server = server_factory("--workers", "0", "--config", str(config),
                            "--keys-file", str(keys))
    first = upload(server, key_a, b"a" * 2000)
    assert first.status_code == 200, first.text
    kept = blobs(server)

    refused = upload(server, key_a, b"b" * 1500)
    assert refused.status_code == 413, refused.text
    message = refused.json()["error"]["message"]
    assert "2000 of 3000 bytes" in message and "1000 more" in message
    assert blobs(server) == kept and len(file_ids(server, key_a)) == 1
    # Another project's usage is its own.
    assert upload(server, key_b, b"c" * 2000).status_code == 200
    # A deleted file no longer counts.
    deleted = httpx.delete(f"{server.v1}/files/{first.json()['id']}",
                           headers={"Authorization": f"Bearer {key_a}"})
    assert deleted.status_code == 200
    assert upload(server, key_a, b"d" * 1500).status_code == 200

