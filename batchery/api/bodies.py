"""Reading JSON request bodies with errors in our envelope (not FastAPI's 422)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from batchery.exceptions import InvalidRequest


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest("We could not parse the JSON body of your request. (HINT: "
                             "the body must be a JSON object.)") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body
