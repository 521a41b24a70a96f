"""A bound on the size of a request's body (``--max-request-bytes``): a larger one is answered 413 in
OpenAI's error shape before any of it is parsed or kept.

A body whose ``Content-Length`` is over the bound is read and thrown away (up to `DRAIN_FACTOR` times
the bound, so that the client, which sends the whole body before it reads the answer, gets the 413
rather than a reset connection) and answered at once; a body sent in chunks is counted as it comes
and refused the moment it passes the bound. Either way the server holds at most one chunk of it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from flora.serve.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_FACTOR = 8


class BodyLimitMiddleware:
    """ASGI middleware refusing bodies of more than ``max_bytes`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> str:
        return (f"the request body is {size} bytes, more than this server accepts ({self.max_bytes} bytes, "
                "--max-request-bytes)")  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive, min(int(declared), DRAIN_FACTOR * self.max_bytes))
            body = json.dumps(error_body(413, self._message(declared.decode()), None)).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _drain(receive: Receive, limit: int) -> None:
        """Read and drop the body, at most ``limit`` bytes of it."""
        read = 0
        while read < limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
