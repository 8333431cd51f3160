"""moto's S3 server as a real subprocess: the S3 protocol over HTTP, for tests that go
through s3fs exactly as they would against AWS or MinIO."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import bound_port


def s3_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the server: botocore (so s3fs) reads the endpoint
    from AWS_ENDPOINT_URL, so no Batchery setting is involved."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


#: How moto's server (werkzeug) says where it listens, the port it bound included.
_LISTENING = re.compile(rb"Running on http://[^\s:]+:(\d+)")


@contextlib.contextmanager
def moto_server(log_dir: Path | None = None) -> Iterator[str]:
    """moto's server on port 0, and the endpoint of the port it says it bound."""
    with tempfile.TemporaryDirectory(prefix="moto-") as scratch:
        log_path = Path(log_dir or scratch) / "moto.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", "0"],
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            port = bound_port(log_path, process, _LISTENING, timeout=30)
            endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(endpoint, timeout=1)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("moto's server did not start") from None
                    time.sleep(0.1)
            yield endpoint
        finally:
            process.terminate()
            process.wait(10)
