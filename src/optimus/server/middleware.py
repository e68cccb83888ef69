"""Pure ASGI middleware (no BaseHTTPMiddleware: it would hide client disconnects from the
handlers): API-key check and request-body size limit."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optimus.server.errors import APIError

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/tokenizer_info", "/detokenize", "/ui/generate")


class ApiKeyAuth:
    """Require ``Authorization: Bearer KEY`` on the routes that generate or tokenize; health,
    version, metrics and the web page's static parts stay open for probes, scrapers and browsers.
    The key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            if not self._authorized(scope):
                error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest even on a wrong scheme, so timing does not tell the two apart
        return hmac.compare_digest(token.strip(), self._key) and scheme.lower() == b"bearer"


class BodyTooLarge(HTTPException):
    """Raised from ``receive``; FastAPI re-raises HTTPExceptions met while reading a body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                await APIError(400, "invalid Content-Length header").response()(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await APIError(413, BodyTooLarge(self.max_bytes).detail).response()(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # chunked bodies carry no Content-Length
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
