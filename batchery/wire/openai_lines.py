"""The lines of an OpenAI batch's output and error files."""

from __future__ import annotations

from typing import Any

import orjson

from batchery.model import ids
from batchery.ports.backend import Reply

__all__ = ["error_line", "response_line"]

def response_line(custom_id: str, reply: Reply, _model: Any = None) -> bytes:
    """An OpenAI batch output line."""
    return orjson.dumps({
        "id": ids.request_line_id(), "custom_id": custom_id,
        "response": {"status_code": reply.status_code, "request_id": ids.request_id(),
                     "body": reply.body},
        "error": None,
    }, option=orjson.OPT_APPEND_NEWLINE)

def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A line for a request that never got an HTTP answer (cancelled, expired, failed)."""
    return orjson.dumps({"id": ids.request_line_id(), "custom_id": custom_id,
                         "response": None, "error": {"code": code, "message": message}},
                        option=orjson.OPT_APPEND_NEWLINE)
