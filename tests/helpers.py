"""Builders of batch input files for tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

#: Deployments for the SDK suites: a fast model, and a slow one to catch batches mid-run.
SDK_DEPLOYMENTS = """
deployments:
  - name: echo
    backend: echo
  - name: echo-slow
    backend: echo
    options: {latency_ms: 40}
"""


def chat_line(custom_id: str, text: str = "hello", model: str = "echo",
              **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}}


def jsonl(lines: Iterable[Any]) -> bytes:
    """One line per item: strings and bytes as they are, anything else as JSON."""
    out = bytearray()
    for line in lines:
        if isinstance(line, str):
            out += line.encode()
        elif isinstance(line, bytes):
            out += line
        else:
            out += orjson.dumps(line)
        out += b"\n"
    return bytes(out)


def chat_file(n: int, prefix: str = "req", model: str = "echo") -> bytes:
    return jsonl(chat_line(f"{prefix}-{i}", f"hello number {i}", model=model) for i in range(n))
