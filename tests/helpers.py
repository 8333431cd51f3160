"""Builders of batch input files for tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson


def chat_line(custom_id: str, text: str = "hello", model: str = "echo",
              **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}}


def jsonl(lines: Iterable[dict[str, Any] | str | bytes]) -> bytes:
    out = bytearray()
    for line in lines:
        if isinstance(line, dict):
            out += orjson.dumps(line)
        elif isinstance(line, str):
            out += line.encode()
        else:
            out += line
        out += b"\n"
    return bytes(out)


def chat_file(n: int, prefix: str = "req", model: str = "echo") -> bytes:
    return jsonl(chat_line(f"{prefix}-{i}", f"hello number {i}", model=model) for i in range(n))
