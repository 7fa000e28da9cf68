"""Request bodies over `MOONQ_MAX_BODY_BYTES` get a 413 before they are read into memory."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError, error_response


class BodyLimit:
    """Pure ASGI: rejects a too-large Content-Length up front, and stops reading a chunked
    body at the limit (the 413 then comes from the app's error handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        message = f"The request body is larger than {self.max_bytes} bytes (MOONQ_MAX_BODY_BYTES)."
        return APIError(413, message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = self._error()
            response = error_response(413, str(error.detail), error.type)
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)
