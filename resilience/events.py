"""The events a stream produces, as plain data.

The HTTP side turns them into SSE; the queue worker publishes them to the
request's group. Names and payloads are the public contract (README).
"""

from dataclasses import dataclass
from typing import Any

START = "start"
TOKEN = "token"
DONE = "done"
ERROR = "error"
QUEUED = "queued"

TERMINAL = frozenset({DONE, ERROR})


@dataclass(frozen=True)
class StreamEvent:
    name: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL


def start(request_id: str, provider: str, model: str) -> StreamEvent:
    return StreamEvent(
        START, {"request_id": request_id, "provider": provider, "model": model}
    )


def token(text: str) -> StreamEvent:
    return StreamEvent(TOKEN, {"text": text})


def done(finish_reason: str, usage: dict[str, int]) -> StreamEvent:
    return StreamEvent(DONE, {"finish_reason": finish_reason, "usage": usage})


def error(code: str, message: str, retry_after: int | None = None) -> StreamEvent:
    return StreamEvent(
        ERROR, {"code": code, "message": message, "retry_after": retry_after}
    )


def queued(request_id: str, position: int) -> StreamEvent:
    return StreamEvent(QUEUED, {"request_id": request_id, "position": position})
