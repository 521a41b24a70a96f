"""API keys: with ``--api-key`` (or ``FLORA_API_KEY``, or vLLM's ``VLLM_API_KEY``) every route but
`OPEN_PATHS` answers 401, in OpenAI's error shape, to a request without ``Authorization: Bearer KEY``.

An ASGI middleware, so a request is refused before its body is read, and routes added later are
covered without being listed. Keys are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from flora.serve.protocol import error_body

OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})  # liveness probes and Prometheus scrapers


class APIKeyMiddleware:
    """Refuse requests without ``Authorization: Bearer <api_key>`` (but to `OPEN_PATHS`)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("--api-key: expected a non-empty key")
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            await self.app(scope, receive, send)
            return
        message = "Incorrect API key provided." if scheme else "Missing API key: send 'Authorization: Bearer <key>'."
        response = JSONResponse(error_body(401, message), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
