"""The README's SDK quickstarts, taken from the Markdown as written and run against a real
server (only the port is rewritten), so that the README cannot drift from what works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def snippet(heading: str) -> str:
    """The first Python block under the `## heading` of the README."""
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, f"no Python block under '{heading}'"
    return found.group(1)


def run(code: str, server: Server) -> str:
    code = code.replace("http://127.0.0.1:8000", server.base_url)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def server(server_factory: object) -> Server:
    started: Server = server_factory("--workers", "1")  # type: ignore[operator]
    return started


def test_the_openai_quickstart_runs_as_written(server: Server) -> None:
    out = run(snippet("Quickstart with the openai SDK"), server)
    assert "total=3" in out and "completed=2" in out and "failed=1" in out
    assert out.count('"status_code":200') + out.count('"status_code": 200') == 2
    assert "400" in out  # the error file's line for the invalid role


def test_the_anthropic_quickstart_runs_as_written(server: Server) -> None:
    out = run(snippet("Quickstart with the anthropic SDK"), server)
    assert out.split() == ["q1", "succeeded"]
