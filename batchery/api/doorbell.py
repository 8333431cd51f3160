"""Rings the doorbell after each request that may have made work for the workers: any
POST (or DELETE) that succeeded, such as a new batch, a job, a resume, a retry or a cancel.
Ringing after an upload too costs idle workers one early poll; telling the routes apart
would cost more. The ring runs in a thread: it never delays the answer."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchery.ports.doorbell import Doorbell

_METHODS = frozenset({"POST", "DELETE"})


class RingOnWork:
    def __init__(self, app: ASGIApp, doorbell: Doorbell) -> None:
        self.app = app
        self.doorbell = doorbell
        #: A ring in flight: creates arriving together ring once, not once each.
        self._ringing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS:
            await self.app(scope, receive, send)
            return
        status: dict[str, Any] = {}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, sending)
        if 200 <= status.get("code", 500) < 300 and not self._ringing:
            self._ringing = True
            asyncio.get_running_loop().run_in_executor(None, self._ring)

    def _ring(self) -> None:
        # Cleared before ringing: work made while the ring is on its way rings again.
        self._ringing = False
        self.doorbell.ring()
