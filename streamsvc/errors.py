"""Errors answered as JSON before a stream starts."""

from typing import Any

from .sse import dumps


class ApiError(Exception):
    """A request we refuse: ``status`` and a public ``code`` (README table)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: int | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.extra_headers = headers or []

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "error": {
                "code": self.code,
                "message": self.message,
                "retry_after": self.retry_after,
            }
        }
        return dumps(payload).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"Content-Type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"Retry-After", str(self.retry_after).encode()))
        return headers + self.extra_headers
